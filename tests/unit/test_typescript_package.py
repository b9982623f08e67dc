"""The TypeScript SDK as a user gets it: an npm package that installs with no dependencies and
whose types check a program that uses it, and types generated from the server's OpenAPI
document that cannot drift from it (a change to the API without `npm run generate` in
sdk/typescript fails here). `scripts/setup --dev` installs Node.js and the SDK's tools."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SDK = ROOT / "sdk" / "typescript"
TOOLS = SDK / "node_modules" / ".bin"

CONSUMER = """
import { Sandbox, SandboxNotFound, type CommandResult, type SandboxInfo } from "@corral/sdk";

export async function main(id: string): Promise<CommandResult | SandboxInfo> {
  try {
    return (await Sandbox.connect(id)).run(["echo", "hi"], { timeout: 5 });
  } catch (error) {
    if (error instanceof SandboxNotFound) return Sandbox.create({ memoryMb: 256 }).then((s) => s.info());
    throw error;
  }
}
"""


def tool(name: str) -> str:
    found = TOOLS / name
    assert found.exists(), "the TypeScript SDK's tools are missing: run scripts/setup --dev"
    return str(found)


def run(*argv: str, cwd: Path) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stdout}{done.stderr}"
    return done.stdout


def test_the_typescript_types_are_generated_from_the_current_api(tmp_path: Path) -> None:
    document = tmp_path / "openapi.json"
    document.write_text(run(sys.executable, str(ROOT / "scripts" / "openapi.py"), cwd=ROOT))
    generated = tmp_path / "openapi.ts"
    run(tool("openapi-typescript"), str(document), "-o", str(generated), cwd=tmp_path)
    committed = (SDK / "src" / "openapi.ts").read_text()
    assert generated.read_text() == committed, (
        "sdk/typescript/src/openapi.ts is stale: run `npm run generate` in sdk/typescript"
    )


def test_the_package_installs_alone_and_its_types_check_a_program(tmp_path: Path) -> None:
    npm = shutil.which("npm")
    assert npm, "npm is missing: run scripts/setup --dev"
    packed = run(npm, "pack", "--silent", "--pack-destination", str(tmp_path), cwd=SDK)
    tarball = tmp_path / packed.strip().splitlines()[-1]
    app = tmp_path / "app"
    app.mkdir()
    (app / "package.json").write_text(json.dumps({"name": "app", "type": "module"}))
    # Offline: a package with no runtime dependencies needs nothing from the registry.
    run(npm, "install", "--offline", "--no-audit", "--no-fund", str(tarball), cwd=app)
    installed = app / "node_modules" / "@corral" / "sdk"
    assert not (installed / "node_modules").exists()
    assert sorted(json.loads((app / "package-lock.json").read_text())["packages"]) == [
        "",
        "node_modules/@corral/sdk",
    ]
    (app / "main.ts").write_text(CONSUMER)
    run(
        tool("tsc"),
        "--noEmit",
        "--strict",
        "--module", "nodenext",
        "--target", "es2022",
        "--types", "node",
        "--typeRoots", str(SDK / "node_modules" / "@types"),
        "main.ts",
        cwd=app,
    )  # fmt: skip
    (app / "bad.ts").write_text(CONSUMER.replace("memoryMb: 256", "memory_mb: 256"))
    refused = subprocess.run(
        [tool("tsc"), "--noEmit", "--strict", "--module", "nodenext", "bad.ts"],
        cwd=app,
        capture_output=True,
        text=True,
        check=False,
    )
    assert refused.returncode != 0 and "memory_mb" in refused.stdout, refused.stdout
    exported = run(
        "node", "-e", "import('@corral/sdk').then(m => console.log(Object.keys(m)))", cwd=app
    )
    for name in ("Sandbox", "Client", "Image", "Volume", "CorralError", "SandboxNotFound"):
        assert f"'{name}'" in exported, exported
