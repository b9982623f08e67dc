"""Image recipes on the wire: what a base and each step may say, checked the same way by the
SDK (as an `Image` is built up) and by the server (before a build starts).

A recipe is plain JSON: `{"base": {...}, "steps": [...]}`, local content named by the sha256 of
an uploaded tar. Validation is shape only; nothing here runs a step.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from corral.core.errors import InvalidRequest
from corral.core.names import BUILTIN_IMAGES
from corral.core.spec import check_env, check_sandbox_path

BASES = (*BUILTIN_IMAGES, "rootfs", "oci_archive", "registry")
STEPS = ("apt_install", "pip_install", "run_commands", "env", "workdir", "copy")
MAX_STEPS = 100
MAX_ARGS = 1000
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# Package names and version specifiers, never shell syntax: they are quoted anyway.
_PACKAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+:~=<>!,\[\]@/ -]*$")
_REFERENCE = re.compile(r"^[a-z0-9][a-z0-9._:/@+-]*$", re.IGNORECASE)


def describe(step: Mapping[str, Any]) -> str:
    """A step in one line, for progress and errors."""
    kind = step["kind"]
    if kind in ("apt_install", "pip_install"):
        return f"{kind} {' '.join(step['packages'])}"
    if kind == "run_commands":
        return "run_commands " + " && ".join(step["commands"])
    if kind == "env":
        return "env " + " ".join(f"{k}=…" for k in step["env"])
    if kind == "workdir":
        return f"workdir {step['path']}"
    return f"copy to {step['dst']}"


# -- validation (shared by the SDK and the server) ----------------------------------------------


def check_recipe(recipe: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The base and steps of a JSON recipe, or `InvalidRequest` naming what is wrong."""
    if not isinstance(recipe, dict) or set(recipe) - {"base", "steps"}:
        raise InvalidRequest("a recipe is an object with 'base' and 'steps'")
    steps = recipe.get("steps", [])
    if not isinstance(steps, list) or len(steps) > MAX_STEPS:
        raise InvalidRequest(f"'steps' must be a list of at most {MAX_STEPS} steps")
    checked = []
    for index, step in enumerate(steps, 1):
        try:
            checked.append(check_step(step))
        except InvalidRequest as exc:
            raise InvalidRequest(f"step {index}: {exc.message}") from None
    return check_base(recipe.get("base", {"kind": "debian"})), checked


def check_base(base: Any) -> dict[str, Any]:
    kind = base.get("kind") if isinstance(base, dict) else None
    if kind not in BASES:
        raise InvalidRequest(
            f"unknown base {kind!r}; use one of {', '.join(BASES)}", code="unknown_base"
        )
    fields = {"registry": {"reference"}, **{name: set() for name in BUILTIN_IMAGES}}.get(
        kind, {"blob"}
    )
    if set(base) - {"kind"} != fields:
        raise InvalidRequest(f"a {kind} base takes {sorted(fields) or 'no fields'}")
    if kind == "registry":
        reference = base["reference"]
        if not isinstance(reference, str) or not _REFERENCE.match(reference) or ".." in reference:
            raise InvalidRequest(
                f"{reference!r} is not an image reference such as 'python:3.12-slim' or "
                "'localhost:5000/team/tools@sha256:…'"
            )
    elif fields == {"blob"}:
        _check_digest(base["blob"])
    return dict(base)


def check_step(step: Any) -> dict[str, Any]:
    kind = step.get("kind") if isinstance(step, dict) else None
    if kind not in STEPS:
        raise InvalidRequest(f"unknown step {kind!r}; use one of {', '.join(STEPS)}")
    fields = {
        "apt_install": {"packages"},
        "pip_install": {"packages"},
        "run_commands": {"commands"},
        "env": {"env"},
        "workdir": {"path"},
        "copy": {"blob", "dst"},
    }[kind]
    if set(step) - {"kind"} != fields:
        raise InvalidRequest(f"a {kind} step takes {sorted(fields)}")
    if kind in ("apt_install", "pip_install"):
        packages = _strings(step["packages"], "packages")
        for package in packages:
            if not _PACKAGE.match(package) or package.startswith("-"):
                raise InvalidRequest(f"{package!r} is not a package name or requirement")
    elif kind == "run_commands":
        for command in _strings(step["commands"], "commands"):
            if "\0" in command:
                raise InvalidRequest("commands must not contain NUL bytes")
    elif kind == "env":
        if not step["env"]:
            raise InvalidRequest("env needs at least one variable")
        check_env(step["env"])
    elif kind == "workdir":
        check_sandbox_path(step["path"], "workdir")
    else:
        _check_digest(step["blob"])
        check_sandbox_path(step["dst"], "dst")
    return dict(step)


def _strings(values: Any, what: str) -> list[str]:
    if (
        not isinstance(values, list)
        or not values
        or len(values) > MAX_ARGS
        or not all(isinstance(v, str) and v.strip() for v in values)
    ):
        raise InvalidRequest(f"{what} must be a non-empty list of non-empty strings")
    return values


def _check_digest(value: Any) -> None:
    if not isinstance(value, str) or not DIGEST.match(value):
        raise InvalidRequest(f"{value!r} is not a content digest like sha256:<64 hex digits>")
