"""Host-side helpers that need no sandbox: seccomp, networks, uid ranges, apt sources."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from corral.host import network, seccomp, userns
from corral.images.store import apt_sources


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


def test_network_addresses_and_interfaces() -> None:
    assert network.addresses(0) == ("100.96.0.1", "100.96.0.2")
    assert network.addresses(1) == ("100.96.0.5", "100.96.0.6")
    assert len(network.host_iface(network.POOL_SIZE - 1)) <= 15  # IFNAMSIZ


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
