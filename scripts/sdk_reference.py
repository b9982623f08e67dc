#!/usr/bin/env python3
"""Write docs/sdk.md, the SDK reference, from the SDK's own docstrings and signatures.

.venv/bin/python scripts/sdk_reference.py           # rewrite docs/sdk.md
.venv/bin/python scripts/sdk_reference.py --check   # fail if docs/sdk.md is stale (tests)
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import corral
from corral.core import errors

TARGET = Path(__file__).resolve().parent.parent / "docs" / "sdk.md"
SECTIONS: list[tuple[str, list[type]]] = [
    ("Connecting", [corral.Client, corral.AsyncClient]),
    ("Sandboxes", [corral.Sandbox, corral.AsyncSandbox]),
    ("Images", [corral.Image, corral.BuiltImage, corral.BuildEvent]),
    ("Volumes", [corral.Volume, corral.AsyncVolume]),
    ("Commands", [corral.Process, corral.AsyncProcess, corral.CommandResult, corral.ProcessExit]),
    ("Files", [corral.Files, corral.AsyncFiles]),
    ("Deployments", [corral.Deployment, corral.AsyncDeployment]),
    ("Previews", [corral.Preview, corral.AsyncPreview]),
    ("Data", [corral.SandboxInfo, corral.FileInfo, corral.ProcessInfo]),
]
INTRO = """# SDK reference

Generated from the docstrings by `scripts/sdk_reference.py`; do not edit by hand.

`import corral` gives both SDKs: `Sandbox` for ordinary code and `AsyncSandbox` for asyncio
(the async SDK is the implementation; the sync one drives it from a background event loop).
Both read `CORRAL_URL` (default `http://127.0.0.1:8470`) and `CORRAL_API_KEY`, or take a
`client=corral.Client(url=..., api_key=...)` (`AsyncClient` for async code).

```python
import corral

with corral.Sandbox.create(runtime="gvisor", timeout=600) as sandbox:
    result = sandbox.run("python3 -c 'print(6*7)'")
    print(result.exit_code, result.stdout)      # 0 42
```
"""


def _doc(obj: object) -> str:
    return inspect.cleandoc(inspect.getdoc(obj) or "")


def _members(cls: type) -> list[tuple[str, object]]:
    found = []
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(member, classmethod | staticmethod):
            member = member.__func__
        elif hasattr(member, "__get__") and not inspect.isfunction(member):
            member = getattr(cls, name)  # a sync twin of an async classmethod
        if isinstance(member, property) or inspect.isfunction(member):
            found.append((name, member))
    return found


ASYNC_OF: dict[type, type] = {
    corral.Client: corral.AsyncClient,
    corral.Sandbox: corral.AsyncSandbox,
    corral.Process: corral.AsyncProcess,
    corral.Files: corral.AsyncFiles,
    corral.Volume: corral.AsyncVolume,
    corral.Deployment: corral.AsyncDeployment,
    corral.Preview: corral.AsyncPreview,
}


def _signature(function: object) -> str:
    assert callable(function)
    try:
        signature = inspect.signature(function, eval_str=True)
    except NameError:
        signature = inspect.signature(function)
    params = [p for p in signature.parameters.values() if p.name not in ("self", "cls")]
    text = str(signature.replace(parameters=params)).replace("~", "")
    return re.sub(r"\b[a-z_][a-z_.]*\.(?=[A-Z])", "", text)  # module paths: names say enough


def render() -> str:
    lines = [INTRO]
    for title, classes in SECTIONS:
        lines.append(f"## {title}\n")
        for cls in classes:
            lines.append(f"### `{cls.__name__}`\n")
            lines.append(_doc(cls) + "\n")
            fields = getattr(cls, "__dataclass_fields__", None)
            if fields:
                lines.append("Fields: " + ", ".join(f"`{name}`" for name in fields) + ".\n")
            for name, member in _members(cls):
                if isinstance(member, property):
                    lines.append(f"- `{name}` (property): {_doc(member) or ''}".rstrip() + "\n")
                    continue
                signature = _signature(member)
                prefix = "async " if inspect.iscoroutinefunction(member) else ""
                lines.append(f"- `{prefix}{name}{signature}`")
                doc = _doc(member) or _doc(getattr(ASYNC_OF.get(cls), name, None))
                if doc:
                    indented = ("  " + line if line else "" for line in doc.splitlines())
                    lines.append("\n" + "\n".join(indented))
                lines.append("\n")
    lines.append("## Errors\n")
    lines.append(
        "Every error is a `corral.CorralError` with `.code` (stable, machine-readable) and\n"
        "`.message`; the server's code and message come through unchanged.\n"
    )
    lines.append("```\n" + "\n".join(_error_tree(errors.CorralError)) + "\n```\n")
    return "\n".join(lines).rstrip() + "\n"


def _error_tree(cls: type, prefix: str = "", last: str = "") -> list[str]:
    """The error classes under `cls` as a tree, each with its HTTP status and code."""
    name = f"{last}{cls.__name__}"
    note = "   (SDK: the server cannot be reached)" if cls is errors.ConnectionFailed else ""
    lines = [f"{prefix}{name:<{31 - len(prefix)}}{cls.status_code} {cls.default_code}{note}"]
    children = cls.__subclasses__()
    inner = prefix + ("    " if last == "└── " else "│   " if last else "")
    for i, child in enumerate(children):
        lines += _error_tree(child, inner, "└── " if i == len(children) - 1 else "├── ")
    return lines


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not TARGET.exists() or TARGET.read_text() != text:
            print("docs/sdk.md is stale: run scripts/sdk_reference.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
