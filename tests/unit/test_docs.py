"""The reference docs cannot drift from the code."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from fastapi.routing import APIRoute, APIWebSocketRoute
from starlette.routing import BaseRoute

from corral.server.app import create_app
from corral.server.config import ServerConfig

ROOT = Path(__file__).resolve().parents[2]


def test_sdk_reference_is_generated_from_the_current_code() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "sdk_reference.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def _routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    """Every route, those of included routers too (newer FastAPI keeps them nested)."""
    for route in routes:
        nested = getattr(route, "original_router", None)
        if nested is not None:
            yield from _routes(nested.routes)
        else:
            yield route


def _anonymous(text: str) -> str:
    """Path parameters without their names: the doc says `{id}` where the code says
    `{sandbox_id}`."""
    return re.sub(r"\{[a-z_]+\}", "{}", text)


def test_every_route_is_in_the_http_api_doc(tmp_path: Path) -> None:
    documented = _anonymous((ROOT / "docs" / "http-api.md").read_text())
    app = create_app(ServerConfig(data_dir=tmp_path))
    missing = []
    routes = list(_routes(app.routes))
    assert any(getattr(r, "path", "") == "/v1/sandboxes" for r in routes)  # the walk works
    for route in routes:
        if isinstance(route, APIRoute):
            for method in route.methods:
                if f"`{method} {_anonymous(route.path)}`" not in documented:
                    missing.append(f"{method} {route.path}")
        elif (
            isinstance(route, APIWebSocketRoute)
            and f"`GET {_anonymous(route.path)}`" not in documented
        ):
            missing.append(f"websocket {route.path}")
    assert not missing, missing


def test_error_codes_in_the_doc_exist() -> None:
    from corral.core import errors

    documented = set(re.findall(r"`([a-z_]+)`", (ROOT / "docs" / "http-api.md").read_text()))
    known = {cls.default_code for cls in errors._subclasses(errors.CorralError)}
    for code in ("invalid_request", "unauthorized", "sandbox_not_found", "payload_too_large"):
        assert code in documented and code in known
