"""What a sandbox is on the host: root's and its own uid range's only. Another local user can
neither read a sandbox's files (its image included) nor find the image's environment on a
command line."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

from corral.core.models import SandboxInfo
from corral.core.spec import SandboxSpec
from corral.engine import Engine
from corral.images.layers import Manifest, chain_key, image_id


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", "nobody", "--", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_other_host_users_cannot_read_a_sandbox(engine: Engine, sandbox: SandboxInfo) -> None:
    wrote = await engine.run(sandbox.id, "echo tenant-data > /srv/public.txt; chmod 644 /srv/*")
    assert wrote.ok, wrote.stderr
    plan = engine.registry.get(sandbox.id).plan
    assert (plan.dir.stat().st_mode & 0o777) == 0o710
    for argv in (
        ["ls", str(plan.dir)],
        ["cat", str(plan.rootfs / "etc" / "hostname")],
        ["cat", str(plan.rootfs / "srv" / "public.txt")],
        ["ls", str(plan.disk_dir)],
    ):
        seen = as_nobody(*argv)
        assert seen.returncode != 0 and "Permission denied" in seen.stderr, (argv, seen)
    assert (await engine.run(sandbox.id, "cat /srv/public.txt")).stdout == b"tenant-data\n"


async def test_the_image_environment_is_on_no_command_line(engine: Engine, runtime: str) -> None:
    secret = "image-secret-" + secrets.token_hex(8)
    key = chain_key("", {"kind": "test", "nonce": secret})
    store = engine.images.built
    store.save(Manifest(image_id(key), key, "debian", (), env={"IMAGE_TOKEN": secret}))
    info = await engine.create(SandboxSpec(runtime=runtime, image=image_id(key)))
    try:
        assert (await engine.run(info.id, "echo $IMAGE_TOKEN")).stdout.decode().strip() == secret
        lines = [
            path.read_bytes()
            for path in Path("/proc").glob("[0-9]*/cmdline")
            if path.exists() and _readable(path)
        ]
        assert not [line for line in lines if secret.encode() in line]
    finally:
        await engine.terminate(info.id)
        (store.manifests_dir / f"{image_id(key)}.json").unlink(missing_ok=True)


def _readable(path: Path) -> bool:
    try:
        path.read_bytes()
    except OSError:
        return False
    return True
