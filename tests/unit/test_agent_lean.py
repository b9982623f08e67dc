"""The agent's use of the standard library's C modules (corral.agent.lean) gives what the
Python modules over them give: the same JSON, the same HMAC, the same signals."""

from __future__ import annotations

import hashlib
import hmac
import json
import signal

import pytest

from corral.agent import lean

VALUES: list[object] = [
    {"id": 1, "argv": ["sh", "-c", "echo ok"], "env": {"A": "b"}, "pty": None, "stdin": True},
    {"text": 'é ☃ 🐍 \x00 \n "quoted" \\ back', "float": 0.1, "big": 2**70, "neg": -3},
    [1.5e300, -0.0, float("inf"), float("-inf"), True, False, None, [], {}],
    "just a string",
    12,
    {"nested": {"deeper": [{"k": [1, {"x": "y"}]}]}},
]


@pytest.mark.parametrize("value", VALUES)
def test_json_is_jsons_compact_form(value: object) -> None:
    assert lean.dumps(value) == json.dumps(value, separators=(",", ":"))
    text = json.dumps(value, indent=2)
    assert repr(lean.loads(text)) == repr(json.loads(text))
    assert repr(lean.loads(lean.dumps(value).encode())) == repr(json.loads(json.dumps(value)))


def test_json_keys_are_made_strings_as_json_does() -> None:
    value = {1: "a", 2.5: "b", False: "c", None: "d"}
    assert lean.dumps(value) == json.dumps(value, separators=(",", ":"))


@pytest.mark.parametrize(
    "text", ["", "   ", "{", '{"a":}', "[1,]", "nul", '{"a":1} {}', "1 2", b"\xff", "{'a': 1}"]
)
def test_what_is_not_one_json_value_is_a_value_error(text: str | bytes) -> None:
    with pytest.raises(ValueError):
        json.loads(text)  # as json says
    with pytest.raises(ValueError):
        lean.loads(text)


def test_json_refuses_what_it_cannot_encode() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        lean.dumps({"a": object()})


@pytest.mark.parametrize("key", [b"", b"k", b"x" * 32, b"y" * 64, b"z" * 65, bytes(range(200))])
def test_hmac_is_hmacs(key: bytes) -> None:
    message = b"corral agent hello" + bytes(range(256))
    assert lean.hmac_sha256(key, message) == hmac.new(key, message, hashlib.sha256).hexdigest()


def test_signals_by_name_and_number_as_the_signal_module_has_them() -> None:
    assert lean.signal_number("SIGTERM") == signal.SIGTERM
    assert lean.signal_number("SIGRTMIN") == signal.SIGRTMIN
    assert lean.signal_number(9) == signal.SIGKILL
    assert {name: int(value) for name, value in signal.Signals.__members__.items()} == {
        name: number for name, number in lean.SIGNALS.items() if not name.startswith("CTRL_")
    }
    for bad in ("SIGNOPE", "SIG_IGN", "NSIG", "15", 0, 999, -1, None, 1.5):
        with pytest.raises(ValueError):
            lean.signal_number(bad)
