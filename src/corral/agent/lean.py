"""What the agent takes from the standard library's C modules directly, without the Python
modules built on them: an idle agent is a process in every sandbox, and every module it
imports is private memory it keeps. `signal` and `socket` bring `enum` and `functools`,
`selectors` brings `collections`, `json` brings `re`, `hmac` brings `hashlib`: with
`subprocess` (see `procs.spawn`), 2.4 MiB of an idle agent's 5.8 (docs/performance.md).

For the type checker the names here are those of the Python modules, whose types they share
(`TYPE_CHECKING` is a plain False at run time, which mypy reads as true). At run time only
what both have may be used: `signal.SIGKILL` is an int here, not a `signal.Signals`, and
there is no `signal.Signals`; the agent's tests run every use.

Standard library only, for any Python >= 3.8, like the rest of the agent.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as signal  # noqa: PLC0414 - re-exported
    from collections import deque as deque  # noqa: PLC0414
    from hashlib import sha256
    from heapq import heapify as heapify  # noqa: PLC0414
    from heapq import heappop as heappop  # noqa: PLC0414
    from heapq import heappush as heappush  # noqa: PLC0414
    from typing import Any, Dict, Union
else:
    import _signal as signal
    from _collections import deque  # noqa: F401 - for the agent's modules
    from _heapq import heapify, heappop, heappush  # noqa: F401

    try:
        from _sha2 import sha256  # Python 3.12 and later
    except ImportError:
        try:
            from _sha256 import sha256
        except ImportError:  # a Python whose hashes are all OpenSSL's (start.py turned it off)
            if sys.modules.get("_hashlib", 0) is None:
                del sys.modules["_hashlib"]
            from hashlib import sha256

# Every signal by its name ("SIGTERM": 15), aliases included, as `signal.Signals` has them.
SIGNALS: Dict[str, int] = {
    name: getattr(signal, name)
    for name in dir(signal)
    if name.startswith("SIG") and not name.startswith("SIG_")
}
_NUMBERS = frozenset(SIGNALS.values())


def signal_number(sig: object) -> int:
    """The number of the signal `sig` names ("SIGTERM") or is (15); ValueError if none."""
    number = sig if isinstance(sig, int) else SIGNALS.get(str(sig), 0)
    if number not in _NUMBERS:
        raise ValueError("unknown signal %r" % (sig,))
    return number


_BLOCK = 64  # SHA-256's block, in bytes
_INNER = bytes(x ^ 0x36 for x in range(256))
_OUTER = bytes(x ^ 0x5C for x in range(256))


def hmac_sha256(key: bytes, message: bytes) -> str:
    """HMAC-SHA256 of `message` under `key`, in hex (RFC 2104, as `hmac.new`)."""
    if len(key) > _BLOCK:
        key = sha256(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    inner = sha256(key.translate(_INNER) + message).digest()
    return sha256(key.translate(_OUTER) + inner).hexdigest()


try:
    from _json import encode_basestring_ascii as _quote
    from _json import make_encoder, make_scanner
except ImportError:  # a Python without the C accelerator: its `json` then
    import json

    def dumps(value: Any) -> str:
        """`value` as compact JSON, ASCII only (`json.dumps` with separators "," and ":")."""
        return json.dumps(value, separators=(",", ":"))

    def loads(text: Union[str, bytes, bytearray]) -> Any:
        """The JSON value in `text` (UTF-8 if bytes); ValueError if it is not one."""
        return json.loads(text)

else:

    def _unencodable(value: Any) -> Any:
        raise TypeError("Object of type %s is not JSON serializable" % type(value).__name__)

    # The arguments of `json.encoder`'s own call: no check for cycles (the agent's messages
    # have none), its default, ASCII strings, no indent, ":" and ",", unsorted, no keys
    # skipped, NaN and infinities allowed.
    _encode = make_encoder(None, _unencodable, _quote, None, ":", ",", False, False, True)
    _CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}

    class _Options:
        """What `json.decoder`'s scanner reads of its decoder: the defaults of `json.loads`."""

        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int
        parse_constant = _CONSTANTS.__getitem__

    _scan = make_scanner(_Options())  # type: ignore[arg-type]  # it reads these attributes
    _BLANK = " \t\n\r"

    def dumps(value: Any) -> str:
        """`value` as compact JSON, ASCII only (`json.dumps` with separators "," and ":")."""
        return "".join(_encode(value, 0))

    def loads(text: Union[str, bytes, bytearray]) -> Any:
        """The JSON value in `text` (UTF-8 if bytes); ValueError if it is not one."""
        if not isinstance(text, str):
            text = bytes(text).decode("utf-8")
        end = len(text.rstrip(_BLANK))
        start = len(text) - len(text.lstrip(_BLANK))
        try:
            value, stop = _scan(text, start)
        except StopIteration as exc:
            raise ValueError("Expecting value at character %s" % (exc.value,)) from None
        if stop != end:
            raise ValueError("Extra data at character %d" % stop)
        return value
