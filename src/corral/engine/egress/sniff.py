"""The name a TCP connection is for, read from its first bytes: the TLS SNI or the HTTP Host.

Only what the client sends first is read (a TLS ClientHello, an HTTP request's head), never
answered; the bytes are then replayed to the real server. Anything else has no name.
"""

from __future__ import annotations

import ipaddress
import re

MAX_HEAD = 64 * 1024  # the most read before deciding that a connection has no name
MAX_RECORDS = 8  # a ClientHello spread over more TLS records is not worth reading
_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*$")
_HTTP_START = re.compile(rb"^[A-Z]{1,10}( |$)")  # a method, then a space (or not yet)
_HOST = re.compile(rb"\r\nhost:[ \t]*([^\r\n]*)", re.IGNORECASE)


class NeedMore(Exception):
    """The first bytes so far are an incomplete ClientHello or request head."""


def name_of(head: bytes) -> str | None:
    """The host name `head` (a connection's first bytes) is for; None if it names none.
    Raises `NeedMore` while a ClientHello or an HTTP head is still incomplete."""
    if not head:
        raise NeedMore
    if head[:1] == b"\x16":
        return _tls_name(head)
    if _HTTP_START.match(head):
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) >= MAX_HEAD:
                return None
            raise NeedMore
        found = _HOST.search(head[: end + 2])
        return _host(found.group(1).decode("latin-1")) if found else None
    return None


def _host(value: str) -> str | None:
    value = value.strip().lower()
    if value.startswith("["):  # an IPv6 literal: not a name
        return None
    host = (value.rsplit(":", 1)[0] if value.count(":") == 1 else value).rstrip(".")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return _checked(host)
    return None  # an address literal: not a name


def _checked(name: str) -> str | None:
    """`name` if it is a plain ASCII host name (letters, digits, '-', '_'), else None: an
    internationalised or odd spelling must not match a rule by one spelling and resolve by
    another."""
    return name if len(name) <= 253 and _NAME.match(name) else None


def _handshake(head: bytes) -> bytes:
    """The handshake message carried by the TLS records at the start of `head`."""
    message = b""
    offset = 0
    for _ in range(MAX_RECORDS):
        if len(head) < offset + 5:
            raise NeedMore
        if head[offset] != 0x16:
            return message
        length = int.from_bytes(head[offset + 3 : offset + 5], "big")
        if len(head) < offset + 5 + length:
            if len(head) >= MAX_HEAD:
                return message
            raise NeedMore
        message += head[offset + 5 : offset + 5 + length]
        offset += 5 + length
        if len(message) >= 4 and len(message) >= 4 + int.from_bytes(message[1:4], "big"):
            return message
    return b""  # more records than any real ClientHello: no name


def _tls_name(head: bytes) -> str | None:
    message = _handshake(head)
    if len(message) < 4 or message[0] != 1:  # not a ClientHello
        return None
    hello = message[4 : 4 + int.from_bytes(message[1:4], "big")]
    try:
        at = 2 + 32  # version, random
        at += 1 + hello[at]  # session id
        at += 2 + int.from_bytes(hello[at : at + 2], "big")  # cipher suites
        at += 1 + hello[at]  # compression methods
        end = at + 2 + int.from_bytes(hello[at : at + 2], "big")
        at += 2
        while at + 4 <= min(end, len(hello)):
            kind = int.from_bytes(hello[at : at + 2], "big")
            size = int.from_bytes(hello[at + 2 : at + 4], "big")
            body = hello[at + 4 : at + 4 + size]
            at += 4 + size
            if kind == 0 and len(body) >= 5 and body[2] == 0:  # server_name, host_name
                length = int.from_bytes(body[3:5], "big")
                if len(body) < 5 + length:
                    return None  # cut short: not a name
                name = body[5 : 5 + length].decode("ascii")
                return _checked(name.lower().rstrip("."))
    except (IndexError, UnicodeDecodeError):
        return None
    return None
