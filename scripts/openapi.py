#!/usr/bin/env python3
"""Print the server's OpenAPI document (JSON), without starting a server: the TypeScript SDK's
types are generated from it (sdk/typescript, `npm run generate`).

.venv/bin/python scripts/openapi.py > sdk/typescript/openapi.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from corral.server.app import create_app
from corral.server.config import ServerConfig


def document() -> dict[str, object]:
    """The OpenAPI document of a server with the default configuration."""
    with tempfile.TemporaryDirectory(prefix="corral-openapi-") as data_dir:
        return create_app(ServerConfig(data_dir=Path(data_dir))).openapi()


if __name__ == "__main__":
    json.dump(document(), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
