"""Answers the front puts together from every ready node, each asked with the caller's own
key (so each node decides what the caller may see): the Prometheus metrics with a `node` label
on every sample (`GET /metrics`), and lists such as each sandbox's newest usage sample
(`GET /v1/metrics/sandboxes`), joined."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
from starlette.responses import JSONResponse, Response

FAMILY = re.compile(r"^# (?:HELP|TYPE) (\S+)")


async def ask_all(
    http: httpx.AsyncClient, urls: dict[str, str], path: str, headers: list[tuple[bytes, bytes]]
) -> dict[str, httpx.Response] | Response:
    """The answer to `path` of every node (by name) that answers, or the first refusal as it
    was given."""
    names = list(urls)
    answers = await asyncio.gather(
        *(http.get(urls[name] + path, headers=headers, timeout=30) for name in names),
        return_exceptions=True,
    )
    taken = {n: a for n, a in zip(names, answers, strict=True) if isinstance(a, httpx.Response)}
    for answer in taken.values():
        if answer.status_code != 200:
            kept = {"content-type": answer.headers.get("content-type", "application/json")}
            return Response(answer.content, status_code=answer.status_code, headers=kept)
    return taken


def joined(answers: dict[str, httpx.Response]) -> Response:
    """JSON lists, one after the other."""
    listed: list[Any] = []
    for answer in answers.values():
        listed.extend(json.loads(answer.content))
    return JSONResponse(listed)


def labelled(expositions: dict[str, str]) -> str:
    """Prometheus expositions by node, as one: each sample gets its node's `node` label, and
    each metric family's samples stay together under its HELP and TYPE lines."""
    families: dict[str, tuple[list[str], list[str]]] = {}
    for node, text in expositions.items():
        current = ""
        for line in text.splitlines():
            if not line.strip():
                continue
            found = FAMILY.match(line)
            if found:
                current = found.group(1)
                headers, _ = families.setdefault(current, ([], []))
                if line not in headers:
                    headers.append(line)
                continue
            if line.startswith("#"):
                continue
            families.setdefault(current, ([], []))[1].append(_with_node(line, node))
    lines = [line for headers, samples in families.values() for line in (*headers, *samples)]
    return "\n".join(lines) + "\n"


def _with_node(sample: str, node: str) -> str:
    label = f'node="{node}"'
    name, brace, rest = sample.partition("{")
    if brace and " " not in name:
        return f"{name}{{{label},{rest}" if not rest.startswith("}") else f"{name}{{{label}{rest}"
    name, _, value = sample.partition(" ")
    return f"{name}{{{label}}} {value}"
