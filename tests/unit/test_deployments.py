"""Deployments' pieces without a server: the spec's checks and the host-side log book."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from corral.core.errors import InvalidRequest
from corral.server.deployments import logs as logs_module
from corral.server.deployments.logs import LogBook
from corral.server.deployments.spec import LOG_FILE, DeploymentSpec

OK = {"name": "web", "image": "debian", "command": "python3 -m http.server", "port": 8000}


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"name": "Web"}, "cannot name a deployment"),
        ({"name": "x" * 41}, "cannot name a deployment"),
        ({"name": "web-"}, "cannot name a deployment"),
        ({"name": "8000-sb"}, "cannot name a deployment"),  # a preview's host label
        ({"port": 0}, "port must be 1 to 65535"),
        ({"port": True}, "whole number"),
        ({"snapshot": "sn-0123456789abcdef"}, "exactly one of image and snapshot"),
        ({"image": None}, "exactly one of image and snapshot"),
        ({"command": None}, "command is needed"),
        ({"command": []}, "non-empty"),
        ({"command": ["a\0b"]}, "no NUL"),
        ({"min_instances": 3}, "min_instances"),
        ({"idle_timeout": 0}, "idle_timeout"),
        ({"health_path": "/a b"}, "health_path"),
        ({"network": "everything"}, "network"),
        ({"memory_mb": 1}, "memory_mb"),
        ({"start_timeout": 0}, "start_timeout"),
    ],
)
def test_bad_specs_say_what_is_wrong(change: dict[str, object], says: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        DeploymentSpec(**{**OK, **change})  # type: ignore[arg-type]
    assert says in refused.value.message


def test_a_spec_round_trips_and_changes_by_version() -> None:
    spec = DeploymentSpec(**{**OK, "command": ["python3", "app.py"], "env": {"A": "1"}})  # type: ignore[arg-type]
    assert DeploymentSpec.from_dict(spec.to_dict()) == spec
    newer = spec.replace({"snapshot": "sn-0123456789abcdef", "command": None})
    assert (newer.image, newer.snapshot, newer.name) == (None, "sn-0123456789abcdef", "web")
    with pytest.raises(InvalidRequest, match="cannot change name"):
        spec.replace({"name": "other"})
    argv = spec.argv()
    assert argv is not None and argv[-2:] == ["python3", "app.py"] and LOG_FILE in argv[2]
    sandbox = spec.sandbox_spec(image="im-x", on_idle="hibernate")
    assert (sandbox.idle_timeout, sandbox.on_idle, sandbox.keep_alive) == (300, "hibernate", False)
    always = spec.replace({"min_instances": 1}).sandbox_spec(image="im-x")
    assert (always.idle_timeout, always.keep_alive) == (None, True)


async def test_the_log_book_keeps_follows_and_bounds_the_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs_module, "MAX_LOG_BYTES", 1000)
    book = LogBook(tmp_path / "dp")
    await book.write(b"one\ntwo\n", "sb-a", 8)
    assert book.tail(1) == b"two\n" and book.tail(None) == b"one\ntwo\n"
    assert (book.offset("sb-a"), book.offset("sb-b")) == (8, 0)

    follow = book.follow(1)
    assert await anext(follow) == b"two\n"
    later = asyncio.ensure_future(anext(follow))
    await asyncio.sleep(0.01)
    await book.write(b"three\n", "sb-a", 14)
    assert await asyncio.wait_for(later, 5) == b"three\n"
    await follow.aclose()

    for _ in range(50):  # a chatty app: at most twice the bound is kept
        await book.write(b"x" * 99 + b"\n", "sb-a", 0)
    assert len(book.tail(None)) <= 2000

    book.event("serving", "version 1")
    assert LogBook(tmp_path / "dp").events[-1]["kind"] == "serving"  # kept on disk
    book.remove()
    assert not (tmp_path / "dp").exists()
