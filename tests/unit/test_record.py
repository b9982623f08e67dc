"""The sandbox state machine (`SandboxRecord.move`): legal and illegal moves, what callers see
of the phases they never should, and what a restarted engine reads back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corral.core.errors import InvalidState
from corral.core.models import SandboxInfo
from corral.core.spec import SandboxSpec
from corral.core.state import EndReason, SandboxState
from corral.engine.record import Phase, SandboxRecord, new_secret, read_saved, settle_saved
from corral.engine.registry import Registry
from corral.engine.sealing import KeyRing
from corral.runtimes.plan import PlanLimits, PlanNetwork, SandboxPlan

KEYS = KeyRing([bytes(range(32))])


def _record(
    tmp_path: Path, *, for_pool: bool = False, spec: SandboxSpec | None = None
) -> SandboxRecord:
    plan = SandboxPlan(
        sandbox_id="sb-0000000000000000",
        runtime="namespaces",
        directory=str(tmp_path / "sb-0000000000000000"),
        layers=(),
        binds=(),
        env={},
        workdir="/root",
        limits=PlanLimits(cpu=1, memory_bytes=1, disk_bytes=1, max_processes=8, tmp_bytes=1),
        network=PlanNetwork("none"),
        uid_slot=0,
        agent_dir="/agent",
    )
    Path(plan.directory).mkdir()
    spec = spec or SandboxSpec(timeout=60)
    return SandboxRecord(spec, plan, for_pool=for_pool, secret=new_secret(), keys=KEYS)


def test_public_states_and_history(tmp_path: Path) -> None:
    record = _record(tmp_path)
    record.start_lifetime(record.spec)
    record.move(Phase.PAUSED, "idle")
    assert record.expires_at is None and record.remaining is not None  # the lifetime stops
    record.move(Phase.RUNNING)
    record.move(Phase.HIBERNATING)
    assert record.state is SandboxState.RUNNING  # a checkpoint in progress is not a state
    record.move(Phase.HIBERNATED, "timeout")
    record.move(Phase.RUNNING)
    record.move(Phase.ENDING)
    assert record.state is SandboxState.RUNNING and record.ending
    record.end(EndReason.USER, "terminated by request")
    states = [(change.state, change.reason) for change in record.history]
    assert states == [
        (SandboxState.CREATING, None),
        (SandboxState.RUNNING, None),
        (SandboxState.PAUSED, "idle"),
        (SandboxState.RUNNING, None),
        (SandboxState.HIBERNATED, "timeout"),
        (SandboxState.RUNNING, None),
        (SandboxState.TERMINATED, "terminated_by_user"),
    ]
    assert not record.alive and record.ended_at is not None


@pytest.mark.parametrize(
    ("path", "illegal"),
    [
        ((), Phase.PAUSED),  # creating: nothing runs yet
        ((), Phase.POOLED),  # only a sandbox started for a pool joins one
        ((Phase.RUNNING,), Phase.HIBERNATED),  # not without its checkpoint
        ((Phase.RUNNING, Phase.ENDING), Phase.RUNNING),  # no way back from ending
        ((Phase.TERMINATED,), Phase.RUNNING),
    ],
)
def test_illegal_moves_name_both_phases(
    tmp_path: Path, path: tuple[Phase, ...], illegal: Phase
) -> None:
    record = _record(tmp_path)
    for phase in path:
        record.move(phase)
    with pytest.raises(InvalidState) as refused:
        record.move(illegal)
    assert str(record.phase) in refused.value.message and str(illegal) in refused.value.message


def test_an_ending_sandbox_refuses_everything(tmp_path: Path) -> None:
    record = _record(tmp_path)
    record.start_lifetime(record.spec)
    record.move(Phase.ENDING)
    with pytest.raises(InvalidState) as refused:
        record.require("pause", SandboxState.RUNNING)
    assert refused.value.message == f"cannot pause sandbox {record.id}: it is ending"


def test_a_pooled_sandbox_is_nobodys_until_claimed(tmp_path: Path) -> None:
    heard: list[SandboxInfo] = []
    registry = Registry(heard.append)
    record = _record(tmp_path, for_pool=True)
    registry.add(record)
    record.move(Phase.POOLED)
    assert registry.list() == [] and heard == []
    saved = json.loads((record.plan.dir / "sandbox.json").read_text())
    assert saved["pooled"] and SandboxRecord.from_saved(saved, KEYS).phase is Phase.POOLED
    claim = SandboxSpec(timeout=30, metadata={"who": "me"})
    record.start_lifetime(claim)
    assert [change.state for change in record.history] == [
        SandboxState.CREATING,
        SandboxState.RUNNING,
    ]
    assert record.spec is claim and record.expires_at is not None
    assert [info.id for info in registry.list()] == [record.id]
    assert [info.state for info in heard] == [SandboxState.RUNNING]


def test_a_pooled_record_has_the_file_of_its_claims_save_made_while_idle(tmp_path: Path) -> None:
    """A claim's save is on the path of a create: it writes into a file made when the sandbox
    went idle in its pool (owner-only, empty) instead of making one."""
    record = _record(tmp_path, for_pool=True)
    record.move(Phase.POOLED)
    directory = record.plan.dir
    ready = (directory / "sandbox.json.tmp").stat()
    assert ready.st_size == 0 and ready.st_mode & 0o777 == 0o600
    assert read_saved(directory)["phase"] == "pooled"
    record.start_lifetime(SandboxSpec(timeout=30))
    assert sorted(p.name for p in directory.iterdir()) == ["sandbox.json"]
    assert (directory / "sandbox.json").stat().st_ino == ready.st_ino
    assert read_saved(directory)["phase"] == "running"


def test_records_read_back_as_written(tmp_path: Path) -> None:
    record = _record(tmp_path)
    record.start_lifetime(record.spec)
    record.move(Phase.PAUSED, "by hand")
    saved = json.loads((record.plan.dir / "sandbox.json").read_text())
    again = SandboxRecord.from_saved(saved, KEYS)
    assert again.info() == record.info()
    assert again.phase is Phase.PAUSED


def test_a_record_is_read_back_whichever_moment_of_a_save_the_engine_stopped_at(
    tmp_path: Path,
) -> None:
    """A save writes the next record beside the old, removes the old, then renames the next
    into place: stopped at any step, the directory still holds a whole record, owner-only."""
    record = _record(tmp_path)
    record.start_lifetime(record.spec)
    directory = record.plan.dir
    assert sorted(p.name for p in directory.iterdir()) == ["sandbox.json"]
    assert (directory / "sandbox.json").stat().st_mode & 0o777 == 0o600
    assert read_saved(directory)["phase"] == "running"
    # Stopped while writing the next one: the old one counts, not the half-written one.
    (directory / "sandbox.json.tmp").write_text('{"phase": "pau')
    assert read_saved(directory)["phase"] == "running"
    # Stopped after removing the old one: the next one, whole, counts, and adoption settles
    # it in its place before anything saves again (a save starts with the temporary name).
    record.move(Phase.PAUSED)
    (directory / "sandbox.json").rename(directory / "sandbox.json.tmp")
    again = SandboxRecord.from_saved(read_saved(directory), KEYS)
    assert again.phase is Phase.PAUSED
    settle_saved(directory)
    assert sorted(p.name for p in directory.iterdir()) == ["sandbox.json"]
    assert read_saved(directory)["phase"] == "paused"
    (directory / "sandbox.json").rename(directory / "sandbox.json.tmp")
    record.move(Phase.RUNNING)  # the next save tidies up
    assert sorted(p.name for p in directory.iterdir()) == ["sandbox.json"]
    (directory / "sandbox.json").unlink()
    with pytest.raises(FileNotFoundError):
        read_saved(directory)
    (directory / "sandbox.json.tmp").touch()  # made for a pooled one's next save: no record
    with pytest.raises(FileNotFoundError):
        read_saved(directory)


def test_records_keep_the_environment_and_the_agent_secret_sealed(tmp_path: Path) -> None:
    record = _record(tmp_path, spec=SandboxSpec(env={"API_TOKEN": "hunter2-marker"}))
    record.start_lifetime(record.spec)
    raw = (record.plan.dir / "sandbox.json").read_text()
    assert record.link.secret is not None
    assert "hunter2-marker" not in raw and record.link.secret.hex() not in raw
    again = SandboxRecord.from_saved(json.loads(raw), KEYS)
    assert again.spec.env == {"API_TOKEN": "hunter2-marker"}
    assert again.link.secret == record.link.secret
    # A record written before sealing existed reads as it was written.
    legacy = {**json.loads(raw), "spec": {**record.spec.to_dict()}}
    legacy["agent_secret"] = record.link.secret.hex()
    old = SandboxRecord.from_saved(legacy, KEYS)
    assert old.spec.env == {"API_TOKEN": "hunter2-marker"}
    assert old.link.secret == record.link.secret
