"""The web console's files in the Python package (src/corral/server/static/console) are what
its sources in console/ build to: a change to the sources without `npm run build` fails here."""

from __future__ import annotations

import asyncio
import filecmp
import subprocess
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.routing import Mount

from corral.server.console import Console

ROOT = Path(__file__).resolve().parents[2]
CONSOLE = ROOT / "console"
SHIPPED = ROOT / "src" / "corral" / "server" / "static" / "console"


def test_the_shipped_console_is_built_from_its_sources(tmp_path: Path) -> None:
    vite = CONSOLE / "node_modules" / ".bin" / "vite"
    assert vite.exists(), "the web console's tools are missing: run scripts/setup --dev"
    subprocess.run(
        [str(CONSOLE / "node_modules" / ".bin" / "tsc"), "--noEmit", "-p", str(CONSOLE)],
        check=True,
        timeout=300,
    )
    built = tmp_path / "console"
    subprocess.run(
        [str(vite), "build", "--logLevel", "error", "--outDir", str(built), "--emptyOutDir"],
        cwd=CONSOLE,
        check=True,
        timeout=300,
    )
    names = sorted(p.relative_to(built).as_posix() for p in built.rglob("*") if p.is_file())
    shipped = sorted(p.relative_to(SHIPPED).as_posix() for p in SHIPPED.rglob("*") if p.is_file())
    assert names == shipped and "index.html" in names
    stale = [name for name in names if not filecmp.cmp(built / name, SHIPPED / name, shallow=False)]
    assert not stale, f"stale in the package: {stale}; run `npm run build` in console/"


def test_an_installation_without_the_console_says_how_to_build_it(tmp_path: Path) -> None:
    app = Starlette(routes=[Mount("/ui", app=Console(tmp_path))])

    async def fetch() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://corral") as client:
            return await client.get("/ui/")

    answer = asyncio.run(fetch())
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "console_not_built"
    assert "npm run build" in answer.json()["error"]["message"]
