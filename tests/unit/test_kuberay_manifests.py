"""deploy/kuberay/ agrees with the code it deploys: the names a joined node reads from its
environment, the resource that makes a Ray node a Corral node, where the at-rest key and the
data directories are, and how the front reaches the head. (No Kubernetes runs here: this only
keeps the manifests from drifting away from the code; docs/cluster.md says what was run.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from corral.server.cluster.joining import DATA_ENV, KEY_ENV, NAME_ENV, RESOURCE, STORE_ENV

KUBERAY = Path(__file__).parents[2] / "deploy" / "kuberay"


def _load(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((KUBERAY / name).read_text()) if doc]


def _options(command: list[str]) -> dict[str, str]:
    return dict(arg.removeprefix("--").split("=", 1) for arg in command if "=" in arg)


def test_the_workers_are_corral_nodes_with_their_secrets_from_the_pod() -> None:
    (cluster,) = _load("raycluster.yaml")
    assert cluster["kind"] == "RayCluster"
    (workers,) = cluster["spec"]["workerGroupSpecs"]
    resources = json.loads(json.loads(workers["rayStartParams"]["resources"]))
    assert resources == {RESOURCE: 1}
    assert "resources" not in cluster["spec"]["headGroupSpec"]["rayStartParams"]
    pod = workers["template"]["spec"]
    (container,) = pod["containers"]
    assert container["securityContext"]["privileged"] is True
    env = {item["name"]: item for item in container["env"]}
    assert env[NAME_ENV]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env[STORE_ENV]["valueFrom"]["secretKeyRef"] == {"name": "corral", "key": "database-url"}
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    # A file of its own: Corral does not follow the symlinks of a secret volume.
    assert mounts["keys"]["mountPath"] == env[KEY_ENV]["value"]
    assert mounts["keys"]["subPath"] == "at-rest-key"
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["data"]["hostPath"]["path"] == mounts["data"]["mountPath"]


def test_the_front_joins_the_head_and_shares_the_nodes_paths() -> None:
    (cluster,) = _load("raycluster.yaml")
    front = next(doc for doc in _load("front.yaml") if doc["kind"] == "StatefulSet")
    (container,) = front["spec"]["template"]["spec"]["containers"]
    options = _options(container["command"])
    head = cluster["metadata"]["name"]
    assert options["cluster"] == f"ray://{head}-head-svc:10001"
    worker = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    worker_env = {item["name"]: item for item in worker["env"]}
    # The nodes keep their data on their machine's volume, whichever front found them.
    worker_mounts = {mount["name"]: mount for mount in worker["volumeMounts"]}
    assert worker_env[DATA_ENV]["value"].startswith(worker_mounts["data"]["mountPath"] + "/")
    # Each front its own data directory (its id and key): a volume per replica.
    (claim,) = front["spec"]["volumeClaimTemplates"]
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]]["mountPath"] == options["data-dir"]
    assert options["at-rest-key"] == worker_env[KEY_ENV]["value"]
    env = {item["name"]: item for item in container["env"]}
    assert env[STORE_ENV] == worker_env[STORE_ENV]
    (secret,) = _load("secret.yaml")
    assert set(secret["stringData"]) == {"database-url", "at-rest-key"}
