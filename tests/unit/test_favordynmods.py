"""The host's cgroup mode (`cgroups.favor_dynamic_changes`): which mount is remounted, with
what, and what is left as it was. Fake mountinfo and feature files, the remount recorded; a
real engine's start is in tests/integration/test_favordynmods.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.host import cgroups

# systemd's cgroup2 at /sys/fs/cgroup, with a v1 controller above it that is not the one.
UNIFIED = (
    "30 23 0:26 / /sys/fs/cgroup/cpu rw,nosuid,nodev,noexec,relatime shared:9 - cgroup cgroup "
    "rw,cpu\n"
    "35 23 0:29 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 "
    "rw,nsdelegate,memory_recursiveprot\n"
)
HYBRID = "41 23 0:35 / /sys/fs/cgroup/uni\\040fied rw,relatime - cgroup2 cgroup2 rw\n"
FEATURES = "nsdelegate\nfavordynmods\nmemory_localevents\nmemory_recursiveprot\n"


def test_the_cgroup2_mount_is_found_with_its_flags_and_options() -> None:
    found = cgroups.cgroup2_mount(UNIFIED)
    assert found == (Path("/sys/fs/cgroup"), 0x2 | 0x4 | 0x8 | 0x200000,
                     ["rw", "nsdelegate", "memory_recursiveprot"])  # fmt: skip
    assert cgroups.cgroup2_mount(HYBRID) == (Path("/sys/fs/cgroup/uni fied"), 0x200000, ["rw"])
    assert cgroups.cgroup2_mount(UNIFIED.splitlines()[0] + "\nnot a mountinfo line\n") is None


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """Fake mountinfo and features files; a remount rewrites the mountinfo as the kernel
    would (unless `ignored`), and is recorded."""
    state: dict[str, object] = {"mountinfo": tmp_path / "mountinfo", "features": tmp_path / "f"}
    state["calls"] = calls = []
    state["ignored"] = False

    def mount(source: str, target: Path, fstype: str, flags: int = 0, data: str = "") -> None:
        calls.append((source, target, fstype, flags, data))  # type: ignore[attr-defined]
        if not state["ignored"]:
            info = state["mountinfo"]
            text = info.read_text()  # type: ignore[attr-defined]
            head, _, _ = text.partition(" - cgroup2 cgroup2 ")
            info.write_text(f"{head} - cgroup2 cgroup2 rw,{data}\n")  # type: ignore[attr-defined]

    monkeypatch.setattr(cgroups.mounts, "mount", mount)
    return state


def favor(host: dict[str, object], mountinfo: str, features: str) -> str:
    host["mountinfo"].write_text(mountinfo)  # type: ignore[attr-defined]
    host["features"].write_text(features)  # type: ignore[attr-defined]
    return cgroups.favor_dynamic_changes(host["mountinfo"], host["features"])  # type: ignore[arg-type]


def test_it_is_turned_on_keeping_the_mounts_flags_and_options(host: dict[str, object]) -> None:
    assert favor(host, UNIFIED, FEATURES) == "turned on"
    # A remount sets every option and flag: those on before are given again, `rw` is not one.
    assert host["calls"] == [(
        "cgroup2", Path("/sys/fs/cgroup"), "cgroup2",
        cgroups.MS_REMOUNT | 0x2 | 0x4 | 0x8 | 0x200000,
        "nsdelegate,memory_recursiveprot,favordynmods",
    )]  # fmt: skip


def test_nothing_is_done_where_it_is_on_or_the_kernel_lacks_it(host: dict[str, object]) -> None:
    on = UNIFIED.replace("memory_recursiveprot\n", "memory_recursiveprot,favordynmods\n")
    assert favor(host, on, FEATURES) == "on"
    assert favor(host, UNIFIED, "nsdelegate\nmemory_localevents\n") == "unsupported"
    assert favor(host, UNIFIED.splitlines()[0] + "\n", FEATURES) == "unsupported"  # v1 alone
    assert host["calls"] == []
    host["features"].unlink()  # type: ignore[attr-defined]
    assert cgroups.favor_dynamic_changes(host["mountinfo"], host["features"]) == "unsupported"  # type: ignore[arg-type]


def test_a_remount_the_kernel_ignores_is_not_reported_as_done(host: dict[str, object]) -> None:
    """Outside the host's own cgroup namespace the kernel accepts the remount and keeps the
    mode as it was."""
    host["ignored"] = True
    assert favor(host, HYBRID, FEATURES) == "unsupported"
    assert len(host["calls"]) == 1  # type: ignore[arg-type]


def test_the_server_tunes_its_host_unless_told_not_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from corral.core.errors import SandboxFailed
    from corral.server import service
    from corral.server.config import ServerConfig

    outcomes: list[object] = ["turned on", SandboxFailed("mount cgroup2: not permitted")]
    calls = []

    def favor() -> str:
        calls.append(1)
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return str(outcome)

    monkeypatch.setattr(service, "favor_dynamic_changes", favor)
    service.tune_host(ServerConfig(data_dir=tmp_path, favordynmods=False))
    assert calls == []
    service.tune_host(ServerConfig(data_dir=tmp_path))
    service.tune_host(ServerConfig(data_dir=tmp_path))  # a refusal is said, and not raised
    assert calls == [1, 1]
    assert "not permitted" in caplog.text


def test_the_command_line_option_reaches_the_servers_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from corral.cli import _local, app

    seen = []

    def ready(config: object, prepare: bool) -> None:
        seen.append(config)
        raise SystemExit(3)  # stop before serving

    monkeypatch.setattr(_local, "_ready", ready)
    for args, expected in (([], True), (["--no-favordynmods"], False)):
        CliRunner().invoke(app, ["serve", "--no-prepare", *args])
        assert seen.pop().favordynmods is expected  # type: ignore[attr-defined]
