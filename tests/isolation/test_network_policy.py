"""Egress rules are enforced outside the sandbox: by Corral's resolver, its proxy and the host's
firewall, against test hosts in a network namespace (`tests.nethosts`), under each runtime.

What root inside the sandbox can do (dial raw addresses, send DNS elsewhere, give a name the
rules allow to another address, use another port or UDP) gets it nowhere the rules refuse, and
every refusal is prompt (a reset or ICMP error, never a hang) and an event naming the rule."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.core.egress import EgressPolicy
from corral.core.models import SandboxInfo
from corral.core.spec import SandboxSpec
from corral.engine import Engine
from corral.engine.egress import EgressSettings
from corral.engine.egress.proxy import PER_SANDBOX
from tests import nethosts
from tests.nethosts import PROBE, RAW, WEB


@pytest.fixture(scope="module")
def testnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[nethosts.Resolver]:
    yield from nethosts.test_network(tmp_path_factory.mktemp("testnet"))


@pytest.fixture
async def engine(data_dir: Path, testnet: nethosts.Resolver) -> AsyncIterator[Engine]:
    floor = EgressPolicy.parse({"deny": ["*.floor.test"]})
    settings = EgressSettings(floor=floor, upstream=(nethosts.HOST_SIDE,))
    async with Engine(data_dir, egress=settings) as started:
        yield started


async def probe(engine: Engine, sandbox: SandboxInfo, *calls: list[Any]) -> list[dict[str, Any]]:
    await engine.files(sandbox.id).write("/tmp/probe.py", PROBE.encode())
    result = await engine.run(sandbox.id, ["python3", "/tmp/probe.py", json.dumps(calls)],
                              timeout=120)  # fmt: skip
    assert result.exit_code == 0, result.stderr.decode(errors="replace")
    outcomes: list[dict[str, Any]] = json.loads(result.stdout)
    return outcomes


def refused(outcome: dict[str, Any]) -> bool:
    """Refused at once: a reset or ICMP error well before any timeout, not an answer."""
    return "error" in outcome and outcome["error"] != "TimeoutError" and outcome["seconds"] < 5


def denials(engine: Engine, sandbox: SandboxInfo) -> list[dict[str, Any]]:
    return list(engine.egress.denials.get(sandbox.id, ()))


async def test_names_are_checked_by_sni_and_host_and_resolved_by_corral(
    engine: Engine, runtime: str
) -> None:
    rules = EgressPolicy.parse({"allow": ["web.test", "private.test", "meta.test"]})
    info = await engine.create(SandboxSpec(runtime=runtime, network="internet", egress=rules))
    try:
        (resolved, alias, private, http_ok, http_alias, https_ok, https_alias, moved, raw,
         own_dns, metadata) = await probe(
            engine, info,
            ["resolve", "web.test"],
            ["resolve", "alias.test"],
            ["resolve", "private.test"],
            ["http", WEB, "web.test"],
            ["http", WEB, "alias.test"],  # a name the rules refuse, on an allowed address
            ["https", WEB, "web.test"],
            ["https", WEB, "alias.test"],
            ["http", RAW, "web.test"],  # an allowed name given to another address
            ["tcp", RAW, 7000],
            ["dns", "192.0.2.53", "alias.test"],  # its own choice of DNS server
            ["tcp", "169.254.169.254", 80],
        )  # fmt: skip
        assert resolved == {"ok": WEB, "seconds": resolved["seconds"]}
        assert "error" in alias and "error" in private  # refused; and no rebinding to 10/8
        assert http_ok["ok"] == f"host=web.test at={WEB}"
        assert https_ok["ok"] == f"host=web.test at={WEB}"
        assert refused(http_alias) and refused(https_alias), (http_alias, https_alias)
        assert moved["ok"] == f"host=web.test at={WEB}"  # Corral resolved it, not the guest
        assert refused(raw), raw
        assert own_dns["ok"] == {"rcode": 5, "answers": 0}  # answered by Corral: REFUSED
        assert refused(metadata), metadata
        seen = {(d["destination"], d["port"], d["protocol"]): d for d in denials(engine, info)}
        assert seen["alias.test", 80, "tcp"]["rule"] == "not in the allow list"
        assert seen["alias.test", 443, "tcp"]["reason"] == "denied_by_policy"
        assert seen["alias.test", 53, "dns"]["rule"] == "not in the allow list"
        assert seen["private.test (10.1.2.3)", 53, "dns"]["rule"].startswith("always denied")
        assert seen[RAW, 7000, "tcp"]["rule"] == "not in the allow list"
        assert seen["169.254.169.254", 80, "tcp"]["rule"].startswith("always denied")
    finally:
        await engine.terminate(info.id)


async def test_addresses_decide_other_ports_and_udp_and_rules_change_live(
    engine: Engine, runtime: str
) -> None:
    by_name = EgressPolicy.parse({"allow": ["raw.test"]})
    info = await engine.create(SandboxSpec(runtime=runtime, network="internet", egress=by_name))
    try:
        before, resolved, after, udp = await probe(
            engine, info,
            ["tcp", RAW, 7000],  # not yet resolved through Corral: an unknown address
            ["resolve", "raw.test"],
            ["tcp", RAW, 7000],
            ["udp", RAW, 7001],  # UDP is decided by address rules only
        )  # fmt: skip
        assert refused(before), before
        assert resolved["ok"] == RAW
        assert after["ok"] == "raw service"
        assert "error" in udp, udp

        by_block = EgressPolicy.parse({"allow": [f"{RAW}/32"]})
        changed = await engine.set_egress(info.id, by_block)
        assert changed.spec.egress == by_block
        tcp, udp, web = await probe(
            engine, info, ["tcp", RAW, 7000], ["udp", RAW, 7001], ["http", WEB, WEB]
        )
        assert tcp["ok"] == "raw service" and udp["ok"] == "echo hi", (tcp, udp)
        assert refused(web), web

        await engine.set_egress(info.id, EgressPolicy.parse({"deny": ["198.51.100.0/24"]}))
        tcp, udp, floor = await probe(
            engine, info, ["tcp", RAW, 7000], ["udp", RAW, 7001], ["resolve", "x.floor.test"]
        )
        assert refused(tcp) and refused(udp), (tcp, udp)
        assert "error" in floor  # the operator's floor holds whatever the sandbox's rules
        assert any(d["rule"] == "operator deny *.floor.test" for d in denials(engine, info))

        await engine.set_egress(info.id, None)  # the floor only
        tcp, udp = await probe(engine, info, ["tcp", RAW, 7000], ["udp", RAW, 7001])
        assert tcp["ok"] == "raw service" and udp["ok"] == "echo hi", (tcp, udp)
    finally:
        await engine.terminate(info.id)


async def test_rules_hold_across_an_engine_restart(
    data_dir: Path, testnet: nethosts.Resolver, runtime: str
) -> None:
    settings = EgressSettings(upstream=(nethosts.HOST_SIDE,))
    rules = EgressPolicy.parse({"allow": ["web.test"]})
    async with Engine(data_dir, egress=settings) as first:
        info = await first.create(SandboxSpec(runtime=runtime, network="internet", egress=rules))
        await first.close(keep_sandboxes=True)
    async with Engine(data_dir, egress=settings) as second:  # new ports, a new table
        try:
            assert second.get(info.id).spec.egress == rules
            allowed, alias, raw = await probe(
                second, info,
                ["http", WEB, "web.test"], ["http", WEB, "alias.test"], ["tcp", RAW, 7000],
            )  # fmt: skip
            assert allowed["ok"] == f"host=web.test at={WEB}"
            assert refused(alias) and refused(raw), (alias, raw)
        finally:
            await second.terminate(info.id)


async def test_one_sandbox_cannot_take_every_proxy_slot(engine: Engine, runtime: str) -> None:
    rules = EgressPolicy.parse({"allow": ["web.test", f"{WEB}/32"]})
    spec = SandboxSpec(runtime=runtime, network="internet", egress=rules, max_processes=64)
    greedy, other = [await engine.create(spec) for _ in range(2)]
    try:
        holding = asyncio.ensure_future(probe(engine, greedy, ["hold", WEB, 80, PER_SANDBOX + 40]))
        await asyncio.sleep(0.5)
        (served,) = await probe(engine, other, ["http", WEB, "web.test"])
        (held,) = await holding
        assert held.get("ok") == {"held": PER_SANDBOX, "reset": 40}, held
        assert served.get("ok") == f"host=web.test at={WEB}", served  # the other is served
    finally:
        for info in (greedy, other):
            await engine.terminate(info.id)
