"""Per-key limits on calls in flight and on the output they buffer."""

from __future__ import annotations

import pytest

from corral.core.errors import LimitReached
from corral.server import throttle
from corral.server.throttle import InFlight


def test_calls_past_a_kinds_limit_are_refused_at_once_and_slots_come_back() -> None:
    in_flight = InFlight({"build": 2})
    with in_flight.hold("alice", "build"), in_flight.hold("alice", "build"):
        with pytest.raises(LimitReached) as refused:
            in_flight.enter("alice", "build")
        assert (refused.value.code, refused.value.retry_after) == ("too_many_requests", 1)
        in_flight.enter("bob", "build")  # another key's calls are its own
        in_flight.leave("bob", "build")
    with in_flight.hold("alice", "build"):  # both slots came back, even from a failed call
        pass
    with pytest.raises(RuntimeError), in_flight.hold("alice", "build"):
        raise RuntimeError
    assert not in_flight._counts


def test_buffered_output_is_bounded_per_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(throttle, "BUFFERED_BYTES", 100)
    in_flight = InFlight()
    assert in_flight.buffer("alice", 60) == 60
    assert in_flight.buffer("alice", 60) == 40  # the rest is dropped: truncated
    assert in_flight.buffer("alice", 1) == 0
    assert in_flight.buffer("bob", 100) == 100
    in_flight.release("alice", 100)
    assert in_flight.buffer("alice", 10) == 10
