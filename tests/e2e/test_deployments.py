"""Deployments: a real service from an image, served at a stable URL; restarted after a
crash; updated under a steady request loop with no failed request; asleep when idle and
woken by a request; adopted again after a server restart; promoted from a sandbox; logs and
events; every refusal."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

import corral
from corral import Client, Deployment, Sandbox
from tests.conftest import require_runtime
from tests.e2e.conftest import SERVER_DIR, Server, start_server
from tests.e2e.test_cli import corral as corral_command

SERVICE = (Path(__file__).parent / "apps" / "service.py").read_text()


def service(port: int = 8000) -> list[str]:
    return ["python3", "-c", SERVICE, str(port)]


def until(check: Callable[[], bool], what: str, bound: float = 60.0) -> None:
    """Wait for `check` (a hang bound, not a timing)."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"never: {what}")


def logs(deployed: Deployment) -> str:
    return "".join(deployed.logs())


@pytest.fixture
def own_server(data_dir: Path) -> Iterator[Server]:
    require_runtime("namespaces")
    running = start_server(SERVER_DIR.with_name(SERVER_DIR.name + "-deploy"), data_dir / "images")
    yield running
    running.stop_and_clean()


def test_a_service_is_served_restarted_and_updated_without_a_failed_request(
    server: Server, client: Client
) -> None:
    deployed = Deployment.create(
        "hello",
        image="debian",
        command=service(),
        port=8000,
        runtime="namespaces",
        health_path="/",
        client=client,
    )
    try:
        assert deployed.url == f"{server.url}/deploy/hello/"
        assert (deployed.status, deployed.version) == ("running", 1)
        assert httpx.get(deployed.url).text == "version 1"
        assert httpx.get(deployed.url.rstrip("/"), follow_redirects=True).text == "version 1"
        first = deployed.instance
        assert first is not None and Sandbox.connect(first, client=client).state.value == "running"

        # Its output is kept on the server, and followed as it is written.
        until(lambda: "served /" in logs(deployed), "the request in the logs")
        assert "listening on 8000" in logs(deployed)
        follow = deployed.logs(follow=True)
        next(follow)
        httpx.get(deployed.url + "after")
        seen = ""
        while "served /after" not in seen:
            seen += next(follow)
        follow.close()

        # A crash: a new instance serves again, and the events say why.
        assert httpx.get(deployed.url + "crash").status_code == 502  # it died answering
        until(lambda: deployed.refresh().restarts == 1, "a restart")
        assert httpx.get(deployed.url, timeout=60).text == "version 1"  # waits for it
        again = deployed.refresh()
        assert again.instance != first and again.status == "running"
        crashed = [e for e in again.events() if e["kind"] == "crashed"]
        assert "exited with code 3" in crashed[0]["message"]
        assert Sandbox.connect(first, client=client).state.value == "terminated"

        # An update under a steady stream of requests: none fails, and v2 takes over.
        answers: list[str] = []
        failures: list[str] = []
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(timeout=30) as http:
                while not stop.is_set():
                    try:
                        reply = http.get(deployed.url + "slow")
                        (answers if reply.status_code == 200 else failures).append(reply.text)
                    except httpx.HTTPError as error:
                        failures.append(repr(error))

        loops = [threading.Thread(target=load) for _ in range(4)]
        for loop in loops:
            loop.start()
        try:
            until(lambda: len(answers) >= 8, "requests before the update")
            updated = again.update(env={"VERSION": "2"})
            count = len(answers)
            until(lambda: len(answers) >= count + 8, "requests after the update")
        finally:
            stop.set()
            for loop in loops:
                loop.join()
        assert failures == []
        assert "version 1" in answers and answers[-1] == "version 2"
        assert updated.version == 2 and updated.spec["env"] == {"VERSION": "2"}
        assert Sandbox.connect(again.instance or "", client=client).state.value == "terminated"
    finally:
        deployed.delete()
    assert httpx.get(deployed.url).status_code == 404


def test_an_idle_deployment_sleeps_and_a_request_wakes_it(client: Client) -> None:
    require_runtime("gvisor")
    deployed = Deployment.create(
        "sleepy", image="debian", command=service(), port=8000, runtime="gvisor",
        idle_timeout=2, client=client,
    )  # fmt: skip
    try:
        assert httpx.get(deployed.url).text == "version 1"
        until(lambda: deployed.refresh().status == "sleeping", "sleep")
        [instance] = Sandbox.list({"corral.deployment": "sleepy"}, "hibernated", client=client)
        assert instance.id == deployed.refresh().instance  # gVisor keeps its memory on disk
        assert httpx.get(deployed.url + "woken", timeout=60).text == "version 1"
        [awake] = Sandbox.list({"corral.deployment": "sleepy"}, "running", client=client)
        assert awake.id == instance.id
        assert deployed.refresh().restarts == 0
        until(lambda: "served /woken" in logs(deployed), "logs copied again after the wake")
        assert [e["kind"] for e in deployed.events()].count("slept") >= 1
    finally:
        deployed.delete()


def test_a_memory_snapshot_is_deployed_with_its_processes_running(client: Client) -> None:
    """No command: the snapshot's server serves on in each instance, restored again after a
    crash."""
    require_runtime("gvisor")
    sandbox = Sandbox.create(runtime="gvisor", env={"VERSION": "snap"}, client=client)
    try:
        sandbox.files.write("/srv/app.py", SERVICE)
        sandbox.run("nohup python3 /srv/app.py 8000 > /dev/null 2>&1 &")
        until(
            lambda: (
                sandbox.run(
                    "python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 8000))'"
                ).exit_code
                == 0
            ),
            "the server up",
        )
        taken = sandbox.snapshot()
    finally:
        sandbox.terminate()
    deployed = Deployment.create("from-memory", snapshot=taken.id, port=8000, client=client)
    try:
        assert httpx.get(deployed.url).text == "version snap"
        first = deployed.instance
        assert httpx.get(deployed.url + "crash").status_code == 502
        until(lambda: deployed.refresh().restarts == 1, "a restart", bound=120)
        assert httpx.get(deployed.url, timeout=60).text == "version snap"
        assert deployed.refresh().instance != first
    finally:
        deployed.delete()


def test_a_deployment_is_adopted_again_after_a_server_restart(own_server: Server) -> None:
    with own_server.client() as sdk:
        deployed = Deployment.create(
            "kept", image="debian", command=service(), port=8000, runtime="namespaces",
            min_instances=1, client=sdk,
        )  # fmt: skip
        assert httpx.get(deployed.url).text == "version 1"
    own_server.stop(signal.SIGKILL)
    own_server.start()
    with own_server.client() as sdk:
        again = Deployment.get("kept", client=sdk)
        assert again.instance == deployed.instance and again.version == 1
        assert httpx.get(again.url + "back").text == "version 1"
        until(lambda: "served /back" in logs(again), "logs copied after the restart")
        assert logs(again).count("listening on 8000") == 1  # nothing copied twice
        # It is still watched: a crash now is noticed (through the copy's end) and mended.
        assert httpx.get(again.url + "crash").status_code == 502
        until(lambda: again.refresh().restarts == 1, "a restart after the server's")
        assert httpx.get(again.url, timeout=60).text == "version 1"
        again.delete()


def test_a_sandbox_is_promoted_to_a_deployment(server: Server, client: Client) -> None:
    sandbox = Sandbox.create(runtime="namespaces", env={"VERSION": "from-sandbox"}, client=client)
    try:
        sandbox.files.write("/srv/app.py", SERVICE)
        url = f"{server.url}/v1/sandboxes/{sandbox.id}/deploy"
        headers = {"Authorization": f"Bearer {server.admin_key}"}
        for body in ({"name": "no-port", "command": None}, {"name": "no-port", "port": None}):
            refused = httpx.post(url, json=body, headers=headers, timeout=60)  # no port given
            assert refused.status_code == 400 and "port" in refused.json()["error"]["message"]
        deployed = sandbox.deploy("promoted", port=8000, command="python3 /srv/app.py 8000")
    finally:
        sandbox.terminate()  # the deployment has its own copy of the files
    try:
        assert isinstance(deployed, Deployment) and deployed.spec["runtime"] == "namespaces"
        assert httpx.get(deployed.url).text == "version from-sandbox"
    finally:
        deployed.delete()


def test_bad_deployments_are_refused_and_leave_nothing(server: Server, client: Client) -> None:
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    base = {"name": "ok", "image": "debian", "command": "sleep 1", "port": 8000}
    with httpx.Client(base_url=server.url, headers=headers) as api:
        for change, code in [
            ({"name": "Bad_Name"}, "invalid_request"),
            ({"name": "-x"}, "invalid_request"),
            ({"port": 0}, "invalid_request"),
            ({"port": 70000}, "invalid_request"),
            ({"command": None}, "invalid_request"),
            ({"snapshot": "sn-0123456789abcdef"}, "invalid_request"),  # with an image too
            ({"min_instances": 2}, "invalid_request"),
            ({"idle_timeout": 0}, "invalid_request"),
            ({"health_path": "no-slash"}, "invalid_request"),
            ({"memory_mb": 1}, "invalid_request"),
            ({"image": "no-such-image"}, "image_not_found"),
            ({"colour": "red"}, "invalid_request"),
        ]:
            body = {k: v for k, v in {**base, **change}.items() if v is not None}
            reply = api.post("/v1/deployments", json=body)
            assert reply.status_code in (400, 404, 422), (change, reply.text)
            assert reply.json()["error"]["code"] == code, (change, reply.text)

    # A command that exits before its port answers: 422 with its output, nothing created.
    before = {s.id for s in Sandbox.list(state="running", client=client)}
    with pytest.raises(corral.DeploymentFailed) as failed:
        Deployment.create(
            "broken", image="debian", command="echo boom; exit 5", port=8000,
            runtime="namespaces", client=client,
        )  # fmt: skip
    assert "exited with code 5" in failed.value.message and "boom" in failed.value.message
    assert all(d.name != "broken" for d in Deployment.list(client=client))
    running = {s.id for s in Sandbox.list(state="running", client=client)}
    assert running <= before  # its sandbox has ended

    deployed = Deployment.create(
        "taken", image="debian", command=service(), port=8000, runtime="namespaces",
        client=client,
    )  # fmt: skip
    try:
        with pytest.raises(corral.Conflict) as taken:
            Deployment.create("taken", image="debian", command="x", port=1, client=client)
        assert taken.value.code == "name_taken"
        # A failed update changes nothing: the old version serves on.
        with pytest.raises(corral.DeploymentFailed):
            deployed.update(command="exit 1")
        assert httpx.get(deployed.url).text == "version 1"
        assert deployed.refresh().version == 1

        # Another key sees none of it, and cannot take the name.
        with server.client(server.new_key("other")) as other:
            for call in (
                lambda: Deployment.get("taken", client=other),
                lambda: other.call(other.aio.request("DELETE", "/v1/deployments/taken")),
                lambda: other.call(other.aio.request("GET", "/v1/deployments/taken/logs")),
                lambda: other.call(other.aio.request("GET", "/v1/deployments/taken/events")),
                lambda: other.call(
                    other.aio.request("PATCH", "/v1/deployments/taken", json={"port": 1})
                ),
            ):
                with pytest.raises(corral.NotFound) as hidden:
                    call()
                assert hidden.value.code == "deployment_not_found"
            assert Deployment.list(client=other) == []
            with pytest.raises(corral.Conflict):
                Deployment.create("taken", image="debian", command="x", port=1, client=other)
        assert httpx.get(deployed.url).text == "version 1"
    finally:
        deployed.delete()
    page = httpx.get(f"{server.url}/deploy/nothing-here/")
    assert page.status_code == 404 and "No deployment nothing-here" in page.text


def test_the_cli_deploys_lists_and_deletes(server: Server) -> None:
    def corral_cli(*args: str) -> str:
        done = corral_command(server, *args)
        assert done.returncode == 0, done.stderr + done.stdout
        return done.stdout

    made = json.loads(
        corral_cli(
            "deploy", "from-cli", "--image", "debian", "--port", "8000", "--runtime",
            "namespaces", "--cmd", "VERSION=cli python3 -m http.server 8000", "--json",
        )
    )  # fmt: skip
    assert made["status"] == "running" and httpx.get(made["url"]).status_code == 200
    again = json.loads(corral_cli("deploy", "from-cli", "--port", "8000", "--env", "A=1", "--json"))
    assert again["version"] == 2  # the name was ours: a new version
    listed = json.loads(corral_cli("deployments", "--json"))
    assert [d["name"] for d in listed] == ["from-cli"]
    assert "serving" in corral_cli("deployments", "events", "from-cli")
    corral_cli("deployments", "delete", "from-cli")
    assert json.loads(corral_cli("deployments", "--json")) == []
