"""Prefixed identifiers: `sb-…` sandboxes, `sn-…` snapshots, `im-…` images, `vol-…` volumes,
`pv-…` previews, `whk-…` webhooks."""

from __future__ import annotations

import re
import secrets

from corral.core.errors import InvalidRequest

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford's base32: no i, l, o, u
_ID_RE = re.compile(r"^(sb|sn|im|vol|key|pv|whk)-[0-9a-z]{16}$")


def new_id(prefix: str) -> str:
    """A fresh random id such as ``sb-3kq9z0m1x7c2v5ne`` (80 bits of randomness)."""
    return prefix + "-" + "".join(secrets.choice(_ALPHABET) for _ in range(16))


def check_id(value: str, prefix: str) -> str:
    """Return `value` if it is a well-formed id with `prefix`, else raise `InvalidRequest`."""
    if not isinstance(value, str) or not _ID_RE.match(value) or not value.startswith(prefix + "-"):
        raise InvalidRequest(
            f"{value!r} is not a valid {prefix}- id; ids look like {prefix}-3kq9z0m1x7c2v5ne",
            code="invalid_id",
        )
    return value
