"""Every field of a sandbox spec is defined once (`corral.core.spec.SPEC_FIELDS`); the spec
itself, the HTTP schema, the SDK's `create` and the CLI's `sandbox create` all offer each one,
with the same default."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import typer.main

import corral
from corral.cli import app
from corral.core.spec import FIELD, FIXED_AT_START, SandboxSpec
from corral.server.schemas import CreateSandbox, PoolBody, SpecBody

NAMES = list(FIELD)
# Where the SDK or the CLI says "nothing" and the server fills in the default.
SERVER_DEFAULTS = {"image", "env", "metadata", "volumes"}
CLI_NAMES = {"memory_mb": "memory", "disk_mb": "disk", "volumes": "volume", "egress": "allow"}
# The SDK takes egress rules as `network=Network(allow=..., deny=...)`.
SDK_NAMES = {"egress": "network"}


def _same(value: Any, default: Any) -> bool:
    if isinstance(default, dict | tuple) and not default:
        return not value
    return bool(value == default and type(value) in (type(default), int, float))


def test_the_spec_is_the_table() -> None:
    fields = {f.name: f for f in dataclasses.fields(SandboxSpec)}
    assert list(fields) == NAMES
    spec = SandboxSpec()
    for name in NAMES:
        assert _same(getattr(spec, name), FIELD[name].default), name
    assert FIXED_AT_START == (
        "image",
        "runtime",
        "cpu",
        "memory_mb",
        "disk_mb",
        "max_processes",
        "network",
    )


def test_the_http_schema_takes_every_field_with_its_default() -> None:
    body = SpecBody()
    assert set(SpecBody.model_fields) == set(NAMES)
    for name in NAMES:
        assert _same(getattr(body, name), FIELD[name].default), name
        described = SpecBody.model_fields[name].description
        assert FIELD[name].default in ({}, ()) or described == FIELD[name].description, name
    assert set(CreateSandbox.model_fields) == {*NAMES, "pool", "snapshot"}
    assert set(PoolBody.model_fields) == {*FIXED_AT_START, "size"}
    # The same spec from the same (empty) request, whichever way it comes in.
    assert SandboxSpec.from_dict(body.model_dump()) == SandboxSpec()


def test_the_sdk_create_takes_every_field_with_its_default() -> None:
    for create in (corral.AsyncSandbox.create, corral.Sandbox.create):
        parameters = inspect.signature(create).parameters
        missing = [name for name in NAMES if SDK_NAMES.get(name, name) not in parameters]
        assert not missing, f"{create.__qualname__} lacks {missing}"
        assert "Network" in str(parameters["network"].annotation)
        for name in set(NAMES) - set(SDK_NAMES):
            default = parameters[name].default
            if name in SERVER_DEFAULTS:
                assert default is None, name
            else:
                assert _same(default, FIELD[name].default), (name, default)


def test_the_cli_create_takes_every_field_with_its_default() -> None:
    group: Any = typer.main.get_command(app)
    create = group.commands["sandbox"].commands["create"]
    options = {param.name: param for param in create.params}
    for name in NAMES:
        option = options.get(CLI_NAMES.get(name, name))
        assert option is not None, f"corral sandbox create has no option for {name}"
        if name not in SERVER_DEFAULTS:
            assert _same(option.default, FIELD[name].default), (name, option.default)
