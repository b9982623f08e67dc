"""The names a key gives its images, snapshots and volumes: what they may look like."""

from __future__ import annotations

import re

from corral.core.errors import InvalidRequest

_IMAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,127}$")
# The images every node has, by name: built on first use (debian, code-interpreter) or at once.
BUILTIN_IMAGES = ("debian", "code-interpreter", "host")
RESERVED_IMAGE_NAMES = (*BUILTIN_IMAGES, "usage", "prune")
_VOLUME_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def check_image_name(name: str) -> str:
    """`name` if it may name an image or a snapshot, else `InvalidRequest` saying why."""
    if (
        not isinstance(name, str)
        or not _IMAGE_NAME.match(name)
        or name.startswith("im-")
        or name in RESERVED_IMAGE_NAMES
    ):
        raise InvalidRequest(
            f"{name!r} cannot name an image: use 1 to 128 lowercase letters, digits, '.', '_' "
            f"or '-', not starting with 'im-' and not one of {', '.join(RESERVED_IMAGE_NAMES)}"
        )
    return name


def check_volume_name(name: str) -> str:
    """`name` if it may name a volume, else `InvalidRequest` saying why."""
    if not isinstance(name, str) or not _VOLUME_NAME.match(name) or name.startswith("vol-"):
        raise InvalidRequest(
            f"{name!r} cannot name a volume: use 1 to 64 lowercase letters, digits, '.', '_' "
            "or '-', not starting with 'vol-'"
        )
    return name
