"""Pure logic: specs, ids, the state machine, errors, plans. Milliseconds, no root needed."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

import corral
from corral.core.errors import (
    CorralError,
    FileNotFound,
    InvalidPath,
    InvalidRequest,
    InvalidState,
    LimitReached,
    NoSpace,
    PathBusy,
    PermissionDenied,
    SandboxFailed,
    from_guest,
    from_response,
)
from corral.core.ids import check_id, new_id
from corral.core.spec import SandboxSpec, check_sandbox_path
from corral.core.state import SandboxState, parse_state, require_state
from corral.host.scope import HostScope
from corral.runtimes.plan import Bind, PlanLimits, PlanNetwork, SandboxPlan


def test_defaults_are_secure() -> None:
    spec = SandboxSpec()
    assert spec.network == "none"
    assert spec.timeout == 300
    assert spec.memory_mb == 512
    assert spec.max_processes > 0


def test_spec_round_trips_and_rejects_unknown_fields() -> None:
    spec = SandboxSpec(cpu=0.5, env={"A": "1"}, metadata={"team": "x"}, runtime="gvisor")
    assert SandboxSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(InvalidRequest) as unknown:
        SandboxSpec.from_dict({"memory": 1})
    assert "memory" in unknown.value.message


def test_spec_is_immutable() -> None:
    spec = SandboxSpec(env={"A": "1"})
    with pytest.raises(AttributeError):
        spec.cpu = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.env["B"] = "2"  # type: ignore[index]


@pytest.mark.parametrize("path", ["relative", "", "/a\0b", "a/../b"])
def test_bad_sandbox_paths(path: str) -> None:
    with pytest.raises(InvalidPath):
        check_sandbox_path(path)


def test_paths_are_only_shape_checked() -> None:
    # `..` is legal: the guest agent resolves it inside the sandbox's own root.
    assert check_sandbox_path("/root/../etc/passwd") == "/root/../etc/passwd"


def test_ids() -> None:
    sandbox_id = new_id("sb")
    assert check_id(sandbox_id, "sb") == sandbox_id
    assert new_id("sb") != sandbox_id
    for bad in ("sb-short", "sn-" + sandbox_id[3:], "sb-" + "A" * 16, "../etc"):
        with pytest.raises(InvalidRequest):
            check_id(bad, "sb")


def test_required_states_are_named() -> None:
    with pytest.raises(InvalidState) as refused:
        require_state("sb-1", "pause", SandboxState.TERMINATED, SandboxState.RUNNING)
    assert (
        refused.value.message == "cannot pause sandbox sb-1 in state terminated; it must be running"
    )


def test_errors_carry_status_and_code() -> None:
    error = FileNotFound("no /x")
    assert (error.status_code, error.code) == (404, "file_not_found")
    assert error.to_dict() == {"error": {"code": "file_not_found", "message": "no /x"}}
    assert isinstance(error, CorralError)


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("ENOENT", FileNotFound),
        ("EACCES", PermissionDenied),
        ("ENOSPC", NoSpace),
        ("EISDIR", InvalidPath),
        ("EBUSY", PathBusy),
        ("command_not_found", InvalidRequest),
        ("limit_reached", LimitReached),
        ("EHOSTDOWN", SandboxFailed),
        ("something_new", SandboxFailed),
    ],
)
def test_guest_errors_map_into_the_tree(code: str, cls: type[CorralError]) -> None:
    assert type(from_guest(code, "m")) is cls


def test_a_busy_path_says_what_to_do() -> None:
    error = from_guest("EBUSY", "Device or resource busy: '/dev/pts'")
    assert (error.status_code, error.code) == (409, "path_busy")
    assert "mount point" in str(error)


def test_plan_round_trips() -> None:
    plan = SandboxPlan(
        sandbox_id="sb-0123456789abcdef",
        runtime="namespaces",
        directory="/var/lib/corral/sandboxes/sb-0123456789abcdef",
        layers=("/images/debian/rootfs",),
        binds=(Bind("/usr", "/usr"),),
        env={"A": "1"},
        workdir="/root",
        limits=PlanLimits(
            cpu=1, memory_bytes=1 << 29, disk_bytes=1 << 30, max_processes=64, tmp_bytes=1
        ),
        network=PlanNetwork("internet", 3, ("10.0.0.53",)),
        uid_slot=7,
        agent_dir="/var/lib/corral/agent",
    )
    assert SandboxPlan.from_dict(plan.to_dict()) == plan
    assert plan.cgroup_name == "corral/sb-0123456789abcdef"
    assert plan.guest_env["A"] == "1" and "PATH" in plan.guest_env
    assert (
        "/var/lib/corral/sandboxes/sb-0123456789abcdef/resolv.conf",
        "/etc/resolv.conf",
    ) in plan.etc_binds
    assert '"uid_slot": 7' in plan.describe()
    scoped = dataclasses.replace(plan, scope=4)
    assert SandboxPlan.from_dict(scoped.to_dict()) == scoped
    assert scoped.cgroup_name == "corral-4/sb-0123456789abcdef"
    # A record written before scopes existed has none: the engine had the host to itself.
    old = plan.to_dict()
    del old["scope"]
    assert SandboxPlan.from_dict(old).host_scope == HostScope()


def test_public_surface() -> None:
    assert sorted(corral.__all__) == corral.__all__
    public = {
        name
        for name, value in vars(corral).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    # `Engine` is the server's, loaded only when asked for (tests/unit/test_layout.py).
    assert public | {"Engine"} == set(corral.__all__)
    assert corral.Engine.__name__ == "Engine"


def test_server_errors_come_back_as_our_classes() -> None:
    assert type(from_response(404, "sandbox_not_found", "m")) is corral.SandboxNotFound
    assert type(from_response(400, "invalid_cwd", "m")) is InvalidRequest  # a guest code
    newer = from_response(409, "some_future_code", "m")  # unknown code: the status decides
    assert type(newer) is corral.Conflict and newer.code == "some_future_code"
    assert type(from_response(500, "mystery", "m")) is CorralError
    assert type(from_response(503, "mystery", "m")) is corral.ServiceUnavailable
    with pytest.raises(InvalidRequest, match="dancing"):
        parse_state("dancing")
