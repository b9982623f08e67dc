"""E2B's wire shapes without a server: Connect envelopes split anywhere, the spec an E2B
create asks for (and what Corral refuses by name), charts in E2B's shape."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest

from corral.core.errors import FileNotFound, InvalidRequest, PayloadTooLarge, SandboxNotFound
from corral.server.e2b import wire
from corral.server.e2b.charts import e2b_chart
from corral.server.e2b.control import spec_of


class Body:
    """A request whose body arrives in the given chunks (what `wire.messages` reads)."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = chunks

    async def stream(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


def read(*chunks: bytes) -> list[dict[str, Any]]:
    async def collect() -> list[dict[str, Any]]:
        return [m async for m in wire.messages(Body(*chunks))]  # type: ignore[arg-type]

    return asyncio.run(collect())


def test_envelopes_split_anywhere_are_read_whole() -> None:
    data = wire.envelope({"a": 1}) + wire.envelope({"b": [2]}) + wire.end_of_stream()
    for cut in range(len(data) + 1):
        assert read(data[:cut], data[cut:]) == [{"a": 1}, {"b": [2]}]
    assert read(*[data[i : i + 1] for i in range(len(data))]) == [{"a": 1}, {"b": [2]}]


def test_bad_envelopes_are_refused() -> None:
    with pytest.raises(InvalidRequest, match="inside a Connect envelope"):
        read(wire.envelope({"a": 1})[:-1])
    with pytest.raises(PayloadTooLarge):
        read(struct.pack(">BI", 0, 64 * 1024 * 1024))
    with pytest.raises(InvalidRequest, match="not JSON"):
        read(struct.pack(">BI", 0, 3) + b"{no")
    with pytest.raises(InvalidRequest, match="JSON object"):
        read(struct.pack(">BI", 0, 2) + b"[]")


def test_the_end_of_stream_carries_the_error() -> None:
    flags, _ = struct.unpack(">BI", wire.end_of_stream(FileNotFound("/x: gone"))[:5])
    body = json.loads(wire.end_of_stream(FileNotFound("/x: gone"))[5:])
    assert flags == wire.END_STREAM and body == {
        "error": {"code": "not_found", "message": "/x: gone"}
    }
    gone = json.loads(wire.end_of_stream(SandboxNotFound("no sandbox sb-1"))[5:])
    assert gone["error"]["code"] == "unavailable" and "was not found" in gone["error"]["message"]


def test_an_e2b_create_becomes_a_corral_spec() -> None:
    spec = spec_of(
        {
            "templateID": "code-interpreter-v1",
            "timeout": 120,
            "metadata": {"k": "v"},
            "envVars": {"A": "b"},
            "allow_internet_access": True,
            "autoPause": True,
            "autoResume": {"enabled": False},
            "network": {"allowPublicTraffic": True},
        },
        300,
    )
    assert (spec.image, spec.timeout, spec.network, spec.on_timeout) == (
        "code-interpreter",
        120,
        "internet",
        "hibernate",
    )
    assert (dict(spec.metadata), dict(spec.env), spec.auto_resume) == (
        {"k": "v"},
        {"A": "b"},
        False,
    )
    plain = spec_of({"templateID": "base"}, 300)
    assert (plain.image, plain.timeout, plain.network, plain.auto_resume) == (
        "debian",
        300,
        "none",
        True,
    )
    assert spec_of({"templateID": "my-image"}, 15).image == "my-image"  # an image by name


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "templateID is required"),
        ({"templateID": "base", "surprise": 1}, "unknown field"),
        ({"templateID": "base", "network": {"denyOut": ["0.0.0.0/0"]}}, "denyOut"),
        ({"templateID": "base", "mcp": {"x": 1}}, "mcp is not supported"),
        ({"templateID": "base", "volumeMounts": [{"name": "v"}]}, "name and a path"),
        ({"templateID": "base", "timeout": "soon"}, "timeout"),
        ({"templateID": "base", "envVars": {"1BAD": "x"}}, "1BAD"),
    ],
)
def test_what_corral_cannot_do_is_refused_by_name(body: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        spec_of(body, 300)


def test_charts_in_e2b_shape() -> None:
    line = {
        "kind": "line",
        "title": "t",
        "x_label": "x",
        "y_label": "y",
        "series": [{"label": "a", "points": [[0, 1]]}],
    }
    pie = {"kind": "pie", "title": None, "series": [{"slices": [{"label": "a", "fraction": 0.25}]}]}
    chart = e2b_chart({"title": None, "axes": [line]})
    assert (
        chart is not None
        and chart["type"] == "line"
        and chart["elements"] == [{"label": "a", "points": [[0, 1]]}]
    )
    both = e2b_chart({"title": "fig", "axes": [line, pie]})
    assert (
        both is not None
        and both["type"] == "superchart"
        and both["elements"][1]["elements"][0]["angle"] == 90
    )
    assert e2b_chart({"axes": []}) is None and e2b_chart("nonsense") is None
    assert e2b_chart({"axes": [{"kind": "mixed"}]}) == {
        "type": "unknown",
        "title": None,
        "elements": [],
    }
