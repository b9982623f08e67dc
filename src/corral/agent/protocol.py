"""The agent protocol: how the host and the guest agent talk over one socket per sandbox.

Standard library only: the guest agent imports this module inside the sandbox.

A connection carries length-prefixed frames. Each frame names a *stream* (a number the host
picks when it sends a CALL) and a *kind*:

    header  = struct "!IIB": payload length, stream, kind
    payload = JSON for CALL / REPLY / EVENT / HELLO, raw bytes for data kinds,
              "!I" (bytes granted) for WINDOW, one kind byte for EOF

Every CALL is answered by exactly one REPLY, which ends the stream; EVENT and data frames may
come before it. Data flows under per-stream credit, like HTTP/2: a sender may have at most
WINDOW_INITIAL unacknowledged bytes in flight on a stream (plus the one chunk that used its
last credit) and the receiver returns credit with WINDOW frames as it consumes data. That keeps
a 1 GiB file or a chatty process from filling memory on either side, and one slow stream from
stalling the others. The host cuts off a guest that sends past its window.

Only the agent may speak for a sandbox, and any process in it could try: root in the sandbox
included. The host and the agent share a per-sandbox secret, which the agent reads once, at its
start, from a file the host deletes as soon as the agent has proved it holds it (no other
process runs in the sandbox before that). The secret names the socket (its directory can be
entered but not listed, so no other process can find it), and each connection opens with a
CHALLENGE from the host that the agent answers in its HELLO with an HMAC of it: a connection
that cannot answer is closed, and only one that can replaces the agent's current connection.
The agent keeps the secret in memory only, as a non-dumpable pid 1 that nothing in the sandbox
can stop, trace or read; a memory snapshot keeps it, so hibernated, restored and forked
sandboxes' agents answer as before. A sandbox restored from a boot image (an image of a booted
sandbox that new ones start from) is given a secret of its own by IDENTIFY before any use.
"""

from __future__ import annotations

import struct

try:
    from corral.agent.lean import dumps, hmac_sha256, loads
except ImportError:  # inside the sandbox the agent directory itself is on sys.path
    from lean import dumps, hmac_sha256, loads  # type: ignore[import-not-found,no-redef]

VERSION = 2

HEADER = struct.Struct("!IIB")
WINDOW = struct.Struct("!I")
MAX_PAYLOAD = 16 * 1024 * 1024
CHUNK = 64 * 1024
TOO_LARGE = "the answer is over the %d MiB the agent may send at once: ask for less"
WINDOW_INITIAL = 1024 * 1024

# Frame kinds.
CALL = 1  # host → guest: {"method": str, "params": {...}}
REPLY = 2  # guest → host: {"result": ...} or {"error": {"code": str, "message": str}}
EVENT = 3  # guest → host: {"type": str, ...}, before the REPLY
STDIN = 4  # host → guest: bytes for a process's stdin
STDOUT = 5  # guest → host: bytes a process wrote to stdout (or its PTY)
STDERR = 6  # guest → host: bytes a process wrote to stderr
FILE = 7  # either way: file content
EOF = 8  # either way: payload is the data kind (STDIN or FILE) that has ended
WINDOW_UPDATE = 9  # either way: the receiver consumed this many bytes of the stream's data
CANCEL = 10  # host → guest: stop the stream now; the guest still sends its REPLY
HELLO = 11  # guest → host, the answer to CHALLENGE: {"version", "pid", "proof", ...}
QUIESCE = 12  # host → guest: close the connection and re-dial later (before a checkpoint)
CHALLENGE = 13  # host → guest, first frame on every connection: random bytes to prove against

DATA_KINDS = frozenset({STDIN, STDOUT, STDERR, FILE})

# Method names.
PING = "agent.ping"
IDENTIFY = "agent.identify"  # a restored boot image's agent takes its new sandbox's name
PROC_START = "proc.start"
PROC_SIGNAL = "proc.signal"
PROC_RESIZE = "proc.resize"
PROC_LIST = "proc.list"
PROC_KILL_ALL = "proc.kill_all"
FS_READ = "fs.read"
FS_WRITE = "fs.write"
FS_LIST = "fs.list"
FS_STAT = "fs.stat"
FS_MKDIR = "fs.mkdir"
FS_REMOVE = "fs.remove"
FS_RENAME = "fs.rename"
FS_CHMOD = "fs.chmod"
CODE_RUN = "code.run"
CODE_CREATE = "code.create"
CODE_LIST = "code.list"
CODE_RESTART = "code.restart"
CODE_REMOVE = "code.remove"
PORT_CONNECT = "port.connect"

METHODS = frozenset(
    {
        PING,
        IDENTIFY,
        PROC_START,
        PROC_SIGNAL,
        PROC_RESIZE,
        PROC_LIST,
        PROC_KILL_ALL,
        FS_READ,
        FS_WRITE,
        FS_LIST,
        FS_STAT,
        FS_MKDIR,
        FS_REMOVE,
        FS_RENAME,
        FS_CHMOD,
        CODE_RUN,
        CODE_CREATE,
        CODE_LIST,
        CODE_RESTART,
        CODE_REMOVE,
        PORT_CONNECT,
    }
)

# Where the host's pieces appear inside every sandbox.
GUEST_DIR = "/run/corral"
GUEST_AGENT_DIR = GUEST_DIR + "/agent"
GUEST_AGENT_START = GUEST_AGENT_DIR + "/start.py"  # the script the agent's Python runs
GUEST_SOCKET_DIR = GUEST_DIR + "/sock"
KEY_NAME = "agent.key"  # in the socket directory, until the agent has proved it read it
LEGACY_SOCKET_NAME = "agent.sock"  # of agents before version 2, which sent HELLO unasked
SECRET_BYTES = 32


def socket_name(secret: bytes) -> str:
    """The name of the agent's socket in its directory: unguessable without the secret."""
    return hmac_sha256(secret, b"corral agent socket")[:32] + ".sock"


def proof(secret: bytes, challenge: bytes) -> str:
    """What the agent answers a CHALLENGE with (hex)."""
    return hmac_sha256(secret, b"corral agent hello" + challenge)


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame."""


def encode(stream: int, kind: int, payload: bytes = b"") -> bytes:
    """One frame as bytes."""
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError("frame payload of %d bytes is over the limit" % len(payload))
    return HEADER.pack(len(payload), stream, kind) + payload


def encode_json(stream: int, kind: int, message: object) -> bytes:
    """One frame whose payload is `message` as compact JSON."""
    return encode(stream, kind, dumps(message).encode())


def encode_reply(stream: int, reply: "dict[str, object]") -> bytes:
    """The REPLY frame of `reply`, or of an error in its place where the result cannot be one
    frame (over MAX_PAYLOAD as JSON: a directory of 100,000 long names): the call must end
    with an answer either way, not wait for one that never comes."""
    try:
        return encode_json(stream, REPLY, reply)
    except ProtocolError:
        error = {"code": "result_too_large", "message": TOO_LARGE % (MAX_PAYLOAD >> 20)}
        return encode_json(stream, REPLY, {"error": error})


def decode_header(header: bytes) -> tuple[int, int, int]:
    """(payload length, stream, kind) of a frame header, checked against the limits."""
    length, stream, kind = HEADER.unpack(header)
    if length > MAX_PAYLOAD:
        raise ProtocolError("frame payload of %d bytes is over the limit" % length)
    return length, stream, kind


def decode_json(payload: bytes) -> dict:  # type: ignore[type-arg]
    """The JSON object in a payload; anything else is a protocol error."""
    try:
        message = loads(payload)
    except ValueError as exc:
        raise ProtocolError("payload is not JSON: %s" % exc) from None
    if not isinstance(message, dict):
        raise ProtocolError("payload is not a JSON object")
    return message
