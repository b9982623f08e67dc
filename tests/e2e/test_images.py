"""Images from code: builds on a real server, cached layers, every runtime starting from them.

The layer cache lives in the shared test images directory, so recipes that must really run
start with a step holding a fresh token; steps after it are new too (their key chains from it).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import secrets
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import httpx
import pytest

import corral
from corral import BuildEvent, Image, ImageBuildFailed, Sandbox
from corral.images.layers import LayerStore, chain_key, image_id
from corral.images.store import ImageStore
from tests.conftest import require_runtime
from tests.e2e.conftest import SERVER_DIR, Server, free_port, start_server
from tests.integration.test_oci import Registry, push_image, start_registry, stop


def fresh() -> Image:
    """A debian image with a unique first layer: nothing after it is cached."""
    return Image.debian_slim().run_commands(f"echo {secrets.token_hex(8)} > /etc/build-token")


def built(server: Server) -> LayerStore:
    return LayerStore(server.data_dir / "images")


def scope(server: Server) -> str:
    """Where the admin key's build cache starts (a build's layer keys chain from its key)."""
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    keys = httpx.get(f"{server.url}/v1/keys", headers=headers, timeout=30).json()
    return next(k["id"] for k in keys if k["name"] == "admin (CORRAL_API_KEY)")


def test_apt_and_pip_packages_under_each_runtime(client: corral.Client) -> None:
    events: list[BuildEvent] = []
    image = fresh().apt_install("jq").pip_install("six==1.16.0")
    made = image.build(name="tools", client=client, on_progress=events.append)
    assert made.name == "tools" and made.layers == 3 and made.id.startswith("im-")
    steps = [e for e in events if e.kind == "step"]
    assert [(e.step, e.steps, e.cached) for e in steps[1:]] == [
        (1, 3, False),
        (2, 3, False),
        (3, 3, False),
    ]
    assert steps[2].description == "apt_install jq"
    assert any(e.kind == "log" and e.step == 3 and "six" in (e.line or "") for e in events)
    for runtime in ("namespaces", "gvisor"):
        require_runtime(runtime)
        with Sandbox.create(image="tools", runtime=runtime, client=client) as sandbox:
            result = sandbox.run(
                """echo '{"a": 42}' | jq .a && python3 -c 'import six; print(six.__version__)'"""
            )
            assert (result.exit_code, result.stdout) == (0, "42\n1.16.0\n"), result.stderr
    # The same recipe again: every step cached, nothing runs, the same image.
    again: list[BuildEvent] = []
    assert image.build(client=client, on_progress=again.append).id == made.id
    assert all(e.cached for e in again if e.kind == "step")
    assert not [e for e in again if e.kind == "log"]


def test_env_workdir_copies_and_deletions(client: corral.Client, tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("print('hello from app')\n")
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "data.txt").write_text("data\n")
    (tmp_path / "tree" / "skip.pyc").write_bytes(b"\0")
    (tmp_path / "tree" / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (tmp_path / "tree" / "run.sh").chmod(0o755)
    image = (
        fresh()
        .run_commands("rm /etc/debian_version", "useradd -m alice")
        .env({"MODE": "image", "KEEP": "yes"})
        .workdir("/app")
        .copy_local_file(tmp_path / "app.py", "/app/")
        .copy_local_dir(tmp_path / "tree", "/app/tree", ignore=["*.pyc"])
    )
    for runtime in ("namespaces", "gvisor"):
        require_runtime(runtime)
        with Sandbox.create(
            image=image, runtime=runtime, env={"MODE": "sandbox"}, client=client
        ) as sandbox:
            script = (
                "pwd; echo $MODE $KEEP; python3 app.py; cat tree/sub/data.txt; ./tree/run.sh; "
                "ls tree; test -e /etc/debian_version || echo deleted; "
                "stat -c '%U' /home/alice"
            )
            result = sandbox.run(script)
            assert result.stdout.splitlines() == [
                "/app",
                "sandbox yes",
                "hello from app",
                "data",
                "ran",
                "run.sh",
                "sub",
                "deleted",
                "alice",
            ], result.stderr
            assert sandbox.run("pwd", cwd="/tmp").stdout == "/tmp\n"
        with Sandbox.create(image=image, runtime=runtime, workdir="/", client=client) as sandbox:
            assert sandbox.run("pwd").stdout == "/\n"


def test_a_failing_step_says_which_and_leaves_nothing(
    server: Server, client: corral.Client
) -> None:
    image = fresh().run_commands("echo building; echo oops >&2; exit 3")
    with pytest.raises(ImageBuildFailed) as failed:
        image.build(client=client)
    assert failed.value.step == 2 and failed.value.code == "image_build_failed"
    assert "step 2" in failed.value.message and "exited with 3" in failed.value.message
    assert "building" in failed.value.log and "oops" in failed.value.log
    recipe = image.recipe()
    first = chain_key(chain_key(scope(server), recipe["base"]), recipe["steps"][0])
    failed_key = chain_key(first, recipe["steps"][1])
    store = built(server)
    assert store.manifest(image_id(first)) is not None  # the good step stays cached
    assert store.manifest(image_id(failed_key)) is None
    assert not store.has_layer(failed_key)
    assert not list(store.layers_dir.glob(f".tmp-{failed_key}-*"))
    assert not list((server.data_dir / "sandboxes").glob("sb-*/record.json")) or all(
        json.loads(p.read_text())["state"] == "terminated"
        for p in (server.data_dir / "sandboxes").glob("sb-*/record.json")
    )
    # Fixing the step resumes after the cached one.
    events: list[BuildEvent] = []
    Image(image.base, (image.steps[0], {"kind": "run_commands", "commands": ["true"]})).build(
        client=client, on_progress=events.append
    )
    assert [e.cached for e in events if e.kind == "step"] == [True, True, False]


def test_bad_input_is_refused_clearly(
    server: Server, client: corral.Client, tmp_path: Path
) -> None:
    with pytest.raises(corral.InvalidRequest) as missing:
        Image.debian_slim().copy_local_file(tmp_path / "nope.txt", "/x")
    assert missing.value.code == "file_not_found"
    with pytest.raises(corral.InvalidRequest):
        Image.debian_slim().apt_install("--allow-unauthenticated")
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    bad = [
        ({"recipe": {"base": {"kind": "ubuntu"}, "steps": []}}, "unknown_base"),
        ({"recipe": {"steps": [{"kind": "docker_build"}]}}, "invalid_request"),
        ({"recipe": {"steps": [{"kind": "copy", "blob": "md5:x", "dst": "/"}]}}, None),
        ({"recipe": {"steps": []}, "name": "Has Spaces"}, "invalid_request"),
        ({"recipe": {"steps": []}, "name": "debian"}, "invalid_request"),
    ]
    for body, code in bad:
        response = httpx.post(f"{server.url}/v1/images", json=body, headers=headers)
        assert response.status_code == 400, response.text
        assert code is None or response.json()["error"]["code"] == code
    # Content that does not match its digest is refused and not kept.
    digest = "sha256:" + "0" * 64
    response = httpx.put(f"{server.url}/v1/blobs/{digest}", content=b"x", headers=headers)
    assert response.status_code == 400 and response.json()["error"]["code"] == "digest_mismatch"
    assert not built(server).has_blob(digest)
    # A copy whose upload is missing is refused before anything runs, naming what to do.
    recipe = {"steps": [{"kind": "copy", "blob": digest, "dst": "/x"}]}
    response = httpx.post(f"{server.url}/v1/images", json={"recipe": recipe}, headers=headers)
    assert response.status_code == 404 and response.json()["error"]["code"] == "blob_not_found"
    assert "upload it first" in response.json()["error"]["message"]
    with pytest.raises(corral.ImageNotFound):
        Sandbox.create(image="no-such-image", client=client)
    with pytest.raises(corral.ImageNotFound):
        client.get_image("im-0000000000000000")


def test_concurrent_builds_of_one_recipe_run_once(client: corral.Client) -> None:
    image = fresh().run_commands("sleep 1; echo built-$(cat /proc/sys/kernel/random/uuid)")
    logs: list[list[str]] = [[], []]
    ids: list[str] = ["", ""]

    def build(index: int) -> None:
        ids[index] = image.build(
            client=client,
            on_progress=lambda e: logs[index].append(e.line or "") if e.kind == "log" else None,
        ).id

    threads = [threading.Thread(target=build, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert ids[0] == ids[1] != ""
    runs = [line for log in logs for line in log if line.startswith("built-")]
    assert len(runs) == 1, logs


def test_names_tenants_removal_and_prune(server: Server, client: corral.Client) -> None:
    first = fresh().build(name="mine", client=client)
    second = fresh().build(name="mine", client=client)  # the name moves
    listed = {i.id: i.name for i in client.list_images()}
    assert listed[second.id] == "mine" and listed[first.id] is None
    assert client.get_image("mine").id == second.id
    with server.client(server.new_key("other-tenant")) as other:
        assert other.list_images() == []
        with pytest.raises(corral.ImageNotFound):
            Sandbox.create(image="mine", client=other)
        with pytest.raises(corral.ImageNotFound):
            Sandbox.create(image=second.id, client=other)
        with pytest.raises(corral.PermissionDenied):
            other.prune_images()
    store = built(server)
    top = store.manifest(second.id)
    assert top is not None
    with Sandbox.create(image="mine", client=client) as sandbox:
        client.remove_image("mine")
        client.remove_image(first.id)
        with pytest.raises(corral.ImageNotFound):
            client.get_image("mine")
        client.prune_images()
        assert store.has_layer(top.layers[-1])  # a live sandbox still stacks it
        assert sandbox.run("cat /etc/build-token").exit_code == 0
    pruned = client.prune_images()
    assert not store.has_layer(top.layers[-1])
    assert pruned["removed_layers"] >= 1 and pruned["freed_bytes"] > 0
    usage = client.image_usage()
    assert set(usage) == {"layers_bytes", "blobs_bytes"}


def test_cli_builds_from_a_python_file(server: Server, tmp_path: Path) -> None:
    token = secrets.token_hex(8)
    recipe = tmp_path / "images.py"
    recipe.write_text(
        f"import corral\ntools = corral.Image.debian_slim().run_commands('echo {token} > /token')\n"
    )
    env = {"CORRAL_URL": server.url, "CORRAL_API_KEY": server.admin_key, "PATH": "/usr/bin:/bin"}

    def corral_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "corral", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=False,
        )

    done = corral_cli("image", "build", f"{recipe}:tools", "--name", "from-cli")
    assert done.returncode == 0, done.stderr
    assert "[1/1] run_commands" in done.stdout + done.stderr
    listed = json.loads(corral_cli("image", "list", "--json").stdout)
    assert any(i["name"] == "from-cli" for i in listed)
    run = corral_cli("run", "--image", "from-cli", "--", "cat", "/token")
    assert (run.returncode, run.stdout) == (0, f"{token}\n"), run.stderr
    missing = corral_cli("image", "build", f"{recipe}:nothing")
    assert missing.returncode == 2 and "nothing" in missing.stderr
    assert corral_cli("image", "rm", "from-cli").returncode == 0


# -- OCI archives and registries --------------------------------------------------------------


@pytest.fixture(scope="module")
def debian_tar(data_dir: Path) -> Path:
    """The debian test image as one uncompressed layer tar (made once, kept with the images)."""
    path = data_dir / "debian-rootfs.tar"
    if not path.exists():
        # Built here if no test built it before (a fresh machine, this file run alone).
        rootfs = ImageStore(data_dir / "images").resolve("debian").layers[0]
        partial = path.with_suffix(".partial")
        subprocess.run(
            ["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(partial), "."], check=True
        )
        partial.rename(path)
    return path


def small_layer(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def docker_save(path: Path, layers: list[Path | bytes], env: list[str], workdir: str) -> None:
    """A `docker save` archive of `layers` (bottom first) with an image config."""
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": env, "WorkingDir": workdir},
        "rootfs": {"type": "layers", "diff_ids": []},
    }
    names = []
    with tarfile.open(path, "w") as tar:
        for index, layer in enumerate(layers):
            name = f"layer{index}/layer.tar"
            data = layer.read_bytes() if isinstance(layer, Path) else layer
            config["rootfs"]["diff_ids"].append("sha256:" + hashlib.sha256(data).hexdigest())  # type: ignore[index]
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            names.append(name)
        for name, document in (
            ("config.json", config),
            ("manifest.json", [{"Config": "config.json", "RepoTags": ["t:1"], "Layers": names}]),
        ):
            data = json.dumps(document).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


TOP_LAYER = {"etc/.wh.debian_version": b"", "srv/hello.txt": b"hello from the archive\n"}
CHECK = (
    "pwd; echo $FROM_IMAGE; cat /srv/hello.txt /srv/copied; "
    "test -e /etc/debian_version || echo whited-out"
)
EXPECTED = ["/srv", "yes", "hello from the archive", "hello from the archive", "whited-out"]
ENV = ["FROM_IMAGE=yes", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]


def test_an_oci_archive_with_layers_and_whiteouts(
    client: corral.Client, tmp_path: Path, debian_tar: Path
) -> None:
    archive = tmp_path / "image.tar"
    docker_save(archive, [debian_tar, small_layer(TOP_LAYER)], ENV, "/srv")
    image = Image.from_oci_archive(archive).run_commands("cp /srv/hello.txt /srv/copied")
    for runtime in ("namespaces", "gvisor"):
        require_runtime(runtime)
        with Sandbox.create(image=image, runtime=runtime, client=client) as sandbox:
            result = sandbox.run(CHECK)
            assert result.stdout.splitlines() == EXPECTED, result.stderr


def test_a_registry_image(client: corral.Client, debian_tar: Path, tmp_path: Path) -> None:
    process, host = start_registry(tmp_path)
    try:
        with httpx.Client(base_url=f"http://{host}/v2/", timeout=60) as http:
            registry = Registry(host, tmp_path / "data", http)
            base = gzip.compress(debian_tar.read_bytes(), compresslevel=1, mtime=0)
            top = gzip.compress(small_layer(TOP_LAYER), mtime=0)
            push_image(registry, "corral/debian", "test", [base, top], ENV)
        allowed = host.replace("127.0.0.1", "localhost")  # allowed by name (see conftest)
        image = Image.from_registry(f"{allowed}/corral/debian:test").run_commands(
            "cp /srv/hello.txt /srv/copied"
        )
        for runtime in ("namespaces", "gvisor"):
            require_runtime(runtime)
            with Sandbox.create(image=image, runtime=runtime, client=client) as sandbox:
                assert sandbox.run(CHECK).stdout.splitlines() == EXPECTED
        with pytest.raises(ImageBuildFailed) as unknown:
            Image.from_registry(f"{allowed}/corral/debian:no-such-tag").build(client=client)
        assert (unknown.value.code, unknown.value.step) == ("image_not_found", 0)
    finally:
        stop(process)


def test_broken_bases_fail_clearly_and_leave_nothing(
    server: Server, client: corral.Client, tmp_path: Path
) -> None:
    garbage = tmp_path / "not-an-image.tar"
    garbage.write_bytes(b"this is not a tar archive" * 100)
    down = f"localhost:{free_port()}/corral/debian:test"  # allowed, but nothing listens
    private = f"127.0.0.1:{free_port()}/corral/debian:test"  # never allowed to be tried
    store = built(server)
    layers_before = set(store.layers_dir.iterdir())
    for image, code in (
        (Image.from_oci_archive(garbage), "invalid_oci_archive"),
        (Image.from_registry(down), "registry_unreachable"),
        (Image.from_registry(private), "registry_not_allowed"),
    ):
        with pytest.raises(ImageBuildFailed) as failed:
            image.build(client=client)
        assert (failed.value.code, failed.value.step) == (code, 0), failed.value.message
        with image.local_content() as files:
            blobs = {
                i: "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest() for i, p in files.items()
            }
        base = chain_key(scope(server), image.recipe(blobs)["base"])
        assert store.manifest(image_id(base)) is None
    assert set(store.layers_dir.iterdir()) == layers_before
    with pytest.raises(corral.InvalidRequest):
        Image.from_registry("not a reference!")
    with pytest.raises(corral.InvalidRequest):
        Image.from_oci_archive(tmp_path / "missing.tar")


def test_set_user_id_files_a_build_makes_stay_out_of_host_users_reach(
    server: Server, client: corral.Client
) -> None:
    made = (
        fresh()
        .run_commands("cp /bin/cat /usr/local/bin/rootcat && chmod 4755 /usr/local/bin/rootcat")
        .build(client=client)
    )
    with Sandbox.create(image=made, client=client) as sandbox:
        assert sandbox.run("stat -c %a /usr/local/bin/rootcat").stdout == "4755\n"
    store = built(server)
    manifest = store.manifest(made.id)
    assert manifest is not None
    binary = store.layer(manifest.layers[-1]) / "usr/local/bin/rootcat"
    assert binary.stat().st_mode & 0o4000 and binary.stat().st_uid == 0
    as_nobody = subprocess.run(["test", "-e", str(binary)], user=65534, check=False)
    assert as_nobody.returncode != 0  # the layers directory is root's alone


def test_a_local_rootfs_and_the_host_base(client: corral.Client, data_dir: Path) -> None:
    rootfs = data_dir / "images" / "debian" / "rootfs"
    image = Image.from_rootfs(rootfs).run_commands("echo from-rootfs > /etc/marker")
    with Sandbox.create(image=image, runtime="namespaces", client=client) as sandbox:
        script = (
            "cat /etc/marker; stat -c %U /var/lib/apt/lists/partial; stat -c %a /usr/bin/newgrp"
        )
        assert sandbox.run(script).stdout == "from-rootfs\n_apt\n4755\n"  # owners, modes kept
    host = Image.host().run_commands("echo on-the-host-base > /etc/marker")
    with Sandbox.create(image=host, runtime="namespaces", client=client) as sandbox:
        result = sandbox.run("cat /etc/marker; test -w /usr || echo usr-read-only")
        assert result.stdout == "on-the-host-base\nusr-read-only\n", result.stderr


@pytest.mark.parametrize("source", ["namespaces", "gvisor"])
def test_a_sandbox_snapshot_becomes_an_image_for_every_runtime(
    client: corral.Client, source: str
) -> None:
    require_runtime(source)
    image = fresh().run_commands("useradd -m bob").build(client=client)
    with Sandbox.create(image=image, runtime=source, client=client) as sandbox:
        # Written aside and renamed: a reader never catches the file just truncated.
        tick = (
            "while true; do date > /root/clock.new; mv /root/clock.new /root/clock; sleep 0.1; done"
        )
        sandbox.exec("sh", "-c", tick)
        sandbox.run(
            "echo made-here > /root/made; rm /etc/build-token; mkdir -p /opt/app; "
            "echo bob > /home/bob/owned; chown bob:bob /home/bob/owned; "
            "rm -rf /usr/share/common-licenses; ln -s /root/made /opt/link"
        )
        sandbox.files.write("/opt/app/config", "x=1\n")
        snap = sandbox.snapshot_filesystem(name=f"snapped-{source}")
        assert sandbox.run("echo still running").stdout == "still running\n"  # it goes on
        assert sandbox.run("test -s /root/clock && echo ticking").stdout == "ticking\n"
    assert snap.layers == image.layers + 1 and snap.name == f"snapped-{source}"
    for runtime in ("namespaces", "gvisor"):
        require_runtime(runtime)
        with Sandbox.create(image=snap.id, runtime=runtime, client=client) as copy:
            result = copy.run(
                "cat /root/made /opt/app/config /opt/link; "
                "test -e /etc/build-token || echo gone; "
                "test -e /usr/share/common-licenses || echo licenses-gone; "
                "stat -c '%U %a' /home/bob/owned /opt/app/config"
            )
            assert result.stdout.splitlines() == [
                "made-here",
                "x=1",
                "made-here",
                "gone",
                "licenses-gone",
                "bob 644",
                "root 644",
            ], result.stderr


def test_a_key_past_its_image_quota_is_refused_before_building(data_dir: Path) -> None:
    require_runtime("namespaces")
    quota = start_server(
        SERVER_DIR.with_name(SERVER_DIR.name + "-quota"),
        data_dir / "images",
        "--max-image-mib-per-key",
        "1",
    )
    try:
        key = quota.new_key("builder")
        with quota.client(key) as client:
            fresh().run_commands("head -c 3000000 /dev/urandom > /opt/blob").build(client=client)
            with pytest.raises(corral.LimitReached) as refused:
                fresh().run_commands("true").build(client=client)
            assert refused.value.code == "image_quota_exceeded"
            assert "corral image rm" in refused.value.message
        with quota.client() as admin:  # the quota is per key
            fresh().run_commands("true").build(client=admin)
    finally:
        quota.stop_and_clean()
