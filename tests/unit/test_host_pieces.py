"""Host-side helpers that need no sandbox: seccomp, networks, uid ranges, apt sources."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from corral.core.errors import SandboxFailed
from corral.core.spec import SandboxSpec
from corral.engine.planner import plan_sandbox
from corral.host import cgroups, network, seccomp, userns
from corral.host.scope import PREFIXES, SCOPES, HostScope
from corral.images.store import RootImage, apt_sources
from corral.runtimes.plan import SandboxPlan


def test_seccomp_program_is_bpf_and_cached() -> None:
    program = seccomp.filter_program()
    assert len(program) % 8 == 0 and len(program) > 8 * 20  # struct sock_filter is 8 bytes
    code, _jt, _jf, _k = struct.unpack("HBBI", program[:8])
    assert code == 0x20  # BPF_LD|BPF_W|BPF_ABS: the filter starts by loading the arch
    assert seccomp.filter_program() is program


def test_uid_ranges_are_private_and_unprivileged() -> None:
    assert userns.host_uid(0) == userns.UID_BASE
    assert userns.host_uid(1) - userns.host_uid(0) == userns.RANGE
    assert userns.host_uid(userns.SLOTS - 1) + userns.RANGE <= 0xFFFF_FFFE
    with pytest.raises(ValueError):
        userns.host_uid(userns.SLOTS)
    used = set(range(10))
    assert userns.pick_slot(used) not in used
    among = range(100, 110)
    assert userns.pick_slot({100, 101, 5}, among) in range(102, 110)
    with pytest.raises(SandboxFailed) as refused:
        userns.pick_slot(set(among) | {5}, among)
    assert refused.value.code == "capacity"


def test_network_addresses_and_interfaces() -> None:
    assert network.addresses(0) == ("100.96.0.1", "100.96.0.2")
    assert network.addresses(1) == ("100.96.0.5", "100.96.0.6")
    assert HostScope().iface(network.POOL_SIZE - 1) == "crx3fff"


def test_an_engine_alone_has_the_whole_host() -> None:
    alone = HostScope()
    assert (alone.cgroup_parent, alone.table, alone.iface_prefix) == ("corral", "corral", "crx")
    assert alone.share(userns.SLOTS) == range(userns.SLOTS)
    assert alone.share(network.POOL_SIZE) == range(network.POOL_SIZE)


def test_scopes_share_the_host_without_overlap() -> None:
    scopes = [HostScope(index) for index in range(SCOPES)]
    assert (scopes[3].cgroup_parent, scopes[3].table, scopes[3].iface(10)) == (
        "corral-3",
        "corral_3",
        "cr3a",
    )
    for total in (userns.SLOTS, network.POOL_SIZE):
        shares = [scope.share(total) for scope in scopes]
        taken = [number for share in shares for number in share]
        assert len(taken) == len(set(taken)) and all(0 <= n < total for n in taken)
        assert min(len(share) for share in shares) == total // SCOPES
    # No scope's interfaces match another's pattern (nftables matches "prefix*"), and every
    # one is within the kernel's 15 characters.
    prefixes = [scope.iface_prefix for scope in [HostScope(), *scopes]]
    assert sorted(prefixes) == sorted(PREFIXES)
    for prefix in prefixes:
        assert [p for p in prefixes if p.startswith(prefix)] == [prefix]
    for scope in [HostScope(), *scopes]:
        assert max(len(scope.iface(slot)) for slot in scope.share(network.POOL_SIZE)) <= 15
    for wrong in (-1, SCOPES):
        with pytest.raises(ValueError):
            HostScope(wrong)


def test_a_plan_takes_its_resources_from_its_scope(tmp_path: Path) -> None:
    image = RootImage(name="debian", layers=(tmp_path,))
    spec = SandboxSpec(runtime="namespaces", network="internet")
    scope = HostScope(5)
    live: list[SandboxPlan] = []
    for _ in range(3):
        plan = plan_sandbox(
            spec, image, data_dir=tmp_path, live=live, volume_mountpoint=Path, scope=scope
        )
        live.append(plan)
        assert plan.scope == 5 and plan.cgroup_name.startswith("corral-5/")
        assert plan.uid_slot in scope.share(userns.SLOTS)
        assert plan.network.index in scope.share(network.POOL_SIZE)
    assert len({p.network.index for p in live}) == 3 == len({p.uid_slot for p in live})


def test_nameservers_are_the_hosts_ipv4_ones(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.53\nnameserver 10.1.2.3\nnameserver ::1\nsearch x\n")
    assert network.nameservers(conf) == ("127.0.0.53", "10.1.2.3")


def test_sandbox_addresses_map_back_to_their_slot() -> None:
    assert network.slot_of("100.96.0.6") == 1
    assert network.slot_of(network.addresses(300)[1]) == 300
    for other in ("100.96.0.5", "100.96.0.7", "10.0.0.2", "::1", "not an address"):
        assert network.slot_of(other) is None


def test_apt_sources_finds_only_files_serving_the_suite() -> None:
    found = apt_sources("bookworm")
    for path in found:
        assert "bookworm" in path.read_text()
        assert not path.name.startswith("corral-")


def test_the_servers_host_scope_reaches_its_engine(tmp_path: Path) -> None:
    from corral.server.config import ServerConfig
    from corral.server.service import Service

    assert Service(ServerConfig(data_dir=tmp_path / "a")).engine.scope == HostScope()
    scoped = Service(ServerConfig(data_dir=tmp_path / "b", host_scope=4))
    assert scoped.engine.scope == HostScope(4) == scoped.engine.egress.scope


def test_a_host_scope_out_of_range_is_refused_by_the_command_line() -> None:
    from typer.testing import CliRunner

    from corral.cli import app

    result = CliRunner().invoke(app, ["serve", "--host-scope", "16", "--no-prepare"])
    assert result.exit_code == 2
    assert "host-scope" in result.output and "less than or equal to 15" in result.output


def test_the_servers_start_limit_reaches_its_engine(tmp_path: Path) -> None:
    from corral.engine.gate import default_limit
    from corral.server.config import ServerConfig
    from corral.server.service import Service

    assert Service(ServerConfig(data_dir=tmp_path / "a")).engine.starts.limit == default_limit()
    assert Service(ServerConfig(data_dir=tmp_path / "b", start_limit=3)).engine.starts.limit == 3
    assert Service(ServerConfig(data_dir=tmp_path / "c", start_limit=0)).engine.starts.limit is None


def test_a_negative_start_limit_is_refused_by_the_command_line() -> None:
    from typer.testing import CliRunner

    from corral.cli import app

    result = CliRunner().invoke(app, ["serve", "--start-limit", "-1", "--no-prepare"])
    assert result.exit_code == 2
    said = " ".join(result.output.replace("│", " ").split())  # the box wraps lines
    assert "'--start-limit': Input should be greater than or equal to 0" in said


def test_the_servers_doze_setting_reaches_its_engine(tmp_path: Path) -> None:
    from corral.engine.doze import DOZE_AFTER
    from corral.server.config import ServerConfig
    from corral.server.service import Service

    assert Service(ServerConfig(data_dir=tmp_path / "a")).engine.doze.after == DOZE_AFTER
    assert Service(ServerConfig(data_dir=tmp_path / "b", doze_after=2.5)).engine.doze.after == 2.5
    assert Service(ServerConfig(data_dir=tmp_path / "c", doze_after=None)).engine.doze.after is None


def test_a_negative_doze_after_is_refused_by_the_command_line() -> None:
    from typer.testing import CliRunner

    from corral.cli import app

    result = CliRunner().invoke(app, ["serve", "--doze-after", "-1", "--no-prepare"])
    assert result.exit_code == 2
    said = " ".join(result.output.replace("│", " ").split())  # the box wraps lines
    assert "'--doze-after': Input should be greater than or equal to 0" in said


def test_a_containers_cpu_limit_is_read_from_its_cgroups(tmp_path: Path) -> None:
    """The tightest CFS quota of the process's cgroup and its ancestors, in both layouts."""
    own = tmp_path / "self-cgroup"
    v2 = tmp_path / "v2"
    (v2 / "pod" / "box").mkdir(parents=True)
    (v2 / "cgroup.controllers").write_text("cpu memory\n")
    (v2 / "pod" / "cpu.max").write_text("300000 100000\n")  # the pod: 3 CPUs
    (v2 / "pod" / "box" / "cpu.max").write_text("max 100000\n")
    own.write_text("0::/pod/box\n")
    assert cgroups.cpu_limit(v2, own) == 3.0
    (v2 / "pod" / "box" / "cpu.max").write_text("150000 100000\n")
    assert cgroups.cpu_limit(v2, own) == 1.5
    own.write_text("0::/\n")  # a cgroup namespace's root, no quota
    assert cgroups.cpu_limit(v2, own) is None

    v1 = tmp_path / "v1"
    (v1 / "cpu" / "docker" / "c1").mkdir(parents=True)
    for where, quota in (("docker", "-1"), ("docker/c1", "200000")):
        (v1 / "cpu" / where / "cpu.cfs_quota_us").write_text(quota + "\n")
        (v1 / "cpu" / where / "cpu.cfs_period_us").write_text("100000\n")
    own.write_text("4:memory:/docker/c1\n2:cpu,cpuacct:/docker/c1\n0::/\n")
    assert cgroups.cpu_limit(v1, own) == 2.0
    own.write_text("2:cpu,cpuacct:/docker\n")
    assert cgroups.cpu_limit(v1, own) is None
    assert cgroups.cpu_limit(v1, tmp_path / "no-such-file") is None
