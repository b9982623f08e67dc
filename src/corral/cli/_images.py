"""`corral image`: build images from Python files, list, remove and prune them."""

from __future__ import annotations

import json
import runpy
import time
from dataclasses import asdict
from pathlib import Path

import typer
from rich.table import Column, Table

from corral.cli._common import ApiKey, DataDir, Json, Url, app, console, fail, out, session
from corral.client import Image
from corral.core.errors import CorralError, InvalidRequest
from corral.core.models import BuildEvent
from corral.core.names import BUILTIN_IMAGES

image_app = typer.Typer(help="Build and manage images.", no_args_is_help=True)
app.add_typer(image_app, name="image")
BUILTIN = BUILTIN_IMAGES


@image_app.command("build")
def image_build(
    target: str = typer.Argument(
        ..., help="FILE.py:VARIABLE, an Image in a Python file; or debian/host (local)."
    ),
    name: str | None = typer.Option(None, help="Name the built image."),
    url: Url = None,
    api_key: ApiKey = None,
    data_dir: DataDir = None,
    as_json: Json = False,
) -> None:
    """Build an image, showing each step (cached steps are skipped); prints its id.

    `debian` or `host` instead prepares that built-in image in the local data directory.
    """
    if target in BUILTIN:
        _prepare_builtin(target, data_dir)
        return
    image = _load(target)

    def show(event: BuildEvent) -> None:
        if event.kind == "step":
            console.print(str(event), style="dim" if event.cached else "bold", highlight=False)
        else:
            console.print(str(event), style="dim", highlight=False, markup=False)

    start = time.monotonic()
    with session(url, api_key) as sdk:
        made = image.build(name, client=sdk, on_progress=show)
    if as_json:
        print(json.dumps(asdict(made)))
        return
    console.print(f"built in {time.monotonic() - start:.1f} s", highlight=False)
    out.print(made.id + (f" ({made.name})" if made.name else ""), highlight=False)


@image_app.command("list")
def image_list(url: Url = None, api_key: ApiKey = None, as_json: Json = False) -> None:
    """Your images: id, name, layers, size, steps."""
    with session(url, api_key) as sdk:
        images = sdk.list_images()
    if as_json:
        print(json.dumps([asdict(i) for i in images]))
        return
    table = Table(Column("id", no_wrap=True), "name", "layers", "size", "last step")
    for image in images:
        table.add_row(
            image.id,
            image.name or "",
            str(image.layers),
            f"{image.size_bytes / 2**20:.1f} MiB",
            image.steps[-1] if image.steps else "",
        )
    out.print(table)


@image_app.command("rm")
def image_rm(
    ref: str = typer.Argument(..., help="Image id or name."),
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Forget an image (`corral image prune` then frees its layers)."""
    with session(url, api_key) as sdk:
        sdk.remove_image(ref)
    console.print(f"removed {ref}")


@image_app.command("prune")
def image_prune(url: Url = None, api_key: ApiKey = None, as_json: Json = False) -> None:
    """Free every layer and upload that no image and no sandbox uses (admin key)."""
    with session(url, api_key) as sdk:
        pruned = sdk.prune_images()
    if as_json:
        print(json.dumps(pruned))
        return
    out.print(
        f"freed {pruned['freed_bytes'] / 2**20:.1f} MiB ({pruned['removed_layers']} layers); "
        f"layers now use {pruned['layers_bytes'] / 2**20:.1f} MiB"
    )


def _load(target: str) -> Image:
    path, sep, variable = target.rpartition(":")
    if not sep or not path.endswith(".py") or not variable.isidentifier():
        fail(InvalidRequest(f"{target!r}: give FILE.py:VARIABLE, e.g. images.py:tools"))
    if not Path(path).is_file():
        fail(InvalidRequest(f"{path} is not a file", code="file_not_found"))
    try:
        found = runpy.run_path(path).get(variable)
    except CorralError as error:
        fail(error)
    if not isinstance(found, Image):
        fail(InvalidRequest(f"{path} defines no corral.Image named {variable!r}"))
    return found


def _prepare_builtin(name: str, data_dir: Path | None) -> None:
    from corral.engine import Engine

    engine = Engine(data_dir)
    try:
        with console.status(f"building image {name}…") as status:
            image = engine.images.resolve(name, progress=lambda line: status.update(line[:100]))
    except CorralError as error:
        fail(error)
    console.print(f"image {name}: {', '.join(str(p) for p in image.layers)}")
