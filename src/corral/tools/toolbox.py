"""Carrying out tool calls (see `catalog`) against a Corral server, through the SDK.

A `Toolbox` is one session: one API key, and a default sandbox made on first use and ended by
`close()`. Every call returns a `ToolResult`; a failure (bad arguments, an unknown sandbox, a
missing file) is a result with `is_error` and a message the model can act on, never an
exception. Long output keeps its start and end, with a note in the middle and the whole of it
left in a file in the sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shlex
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from corral.client import AsyncClient, AsyncSandbox, Network
from corral.core.code import Execution
from corral.core.errors import CorralError, InvalidRequest
from corral.core.state import SandboxState
from corral.tools.catalog import BY_NAME, Tool

MAX_TEXT = 20_000  # characters of one output a result keeps
TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "object": dict,
    "array": list,
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass
class ToolResult:
    """What a tool call returns: text and images for the model, data for programs."""

    text: str
    is_error: bool = False
    images: list[tuple[str, str]] = field(default_factory=list)  # (MIME type, base64)
    data: dict[str, Any] | None = None


def check_arguments(tool: Tool, arguments: Any) -> dict[str, Any]:
    """`arguments` checked against the tool's schema, or `InvalidRequest` saying what to fix."""
    if not isinstance(arguments, dict):
        raise InvalidRequest(f"{tool.name} takes an object of arguments, not {arguments!r}")
    schema = tool.schema
    properties = schema["properties"]
    unknown = sorted(set(arguments) - set(properties))
    if unknown:
        raise InvalidRequest(
            f"{tool.name} has no argument {', '.join(unknown)}; it takes {', '.join(properties)}"
        )
    missing = [name for name in schema["required"] if name not in arguments]
    if missing:
        raise InvalidRequest(f"{tool.name} needs {', '.join(missing)}")
    for name, value in arguments.items():
        expected = properties[name]
        kind = TYPES[expected["type"]]
        if not isinstance(value, kind) or (
            isinstance(value, bool) and expected["type"] != "boolean"
        ):
            raise InvalidRequest(
                f"argument {name} of {tool.name} must be {_article(expected['type'])} "
                f"{expected['type']}, not {value!r}"
            )
        if "enum" in expected and value not in expected["enum"]:
            raise InvalidRequest(
                f"argument {name} of {tool.name} must be one of {', '.join(expected['enum'])}"
            )
    return arguments


class Toolbox:
    """Tool calls of one session, against the server `client` talks to."""

    def __init__(self, client: AsyncClient, **sandbox_options: Any) -> None:
        self.client = client
        self._options = sandbox_options  # for the default sandbox
        self._default: AsyncSandbox | None = None
        self._making = asyncio.Lock()

    async def call(self, name: str, arguments: Mapping[str, Any] | None) -> ToolResult:
        """Carry out one tool call; never raises for what the model sent or the server said."""
        tool = BY_NAME.get(name)
        if tool is None:
            return ToolResult(f"there is no tool {name!r}; the tools: {', '.join(BY_NAME)}", True)
        try:
            checked = check_arguments(tool, dict(arguments or {}))
            handler = HANDLERS[name]
            if not tool.on_sandbox:
                return await handler(self, None, checked)
            sandbox = await self.sandbox(checked.pop("sandbox_id", None))
            result = await handler(self, sandbox, checked)
            result.data = {"sandbox_id": sandbox.id, **(result.data or {})}
            return result
        except CorralError as error:
            return ToolResult(f"error ({error.code}): {error.message}", True)

    async def sandbox(self, sandbox_id: str | None) -> AsyncSandbox:
        """The sandbox a call names, else the session's own (created now if need be)."""
        if sandbox_id is not None:
            return await AsyncSandbox.connect(sandbox_id, client=self.client)
        async with self._making:  # calls in parallel share one new sandbox
            if self._default is None:
                self._default = await AsyncSandbox.create(client=self.client, **self._options)
            return self._default

    async def close(self) -> None:
        """End the session's own sandbox, if it made one."""
        if self._default is not None:
            sandbox, self._default = self._default, None
            with contextlib.suppress(CorralError):  # ended already: its lifetime, say
                await sandbox.terminate()

    async def fit(self, sandbox: AsyncSandbox | None, label: str, text: str) -> str:
        """`text` as a result keeps it: whole, or its two ends and the rest in a file."""
        if len(text) <= MAX_TEXT or sandbox is None:
            return text
        path = f"/tmp/corral-{label}-{secrets.token_hex(4)}.txt"
        note = f"full {label} in {path}"
        try:
            await sandbox.files.write(path, text)
        except CorralError:
            note = "the full text could not be saved"
        half = MAX_TEXT // 2
        cut = len(text) - 2 * half
        return f"{text[:half]}\n[... {cut} characters cut; {note} ...]\n{text[-half:]}"


Handler = Callable[[Toolbox, Any, dict[str, Any]], Awaitable[ToolResult]]


async def _create(box: Toolbox, _none: None, args: dict[str, Any]) -> ToolResult:
    options = {**box._options, **args}
    allow, deny = options.pop("allow", None), options.pop("deny", None)
    if allow is not None or deny is not None:
        if options.get("network") != "internet":
            raise InvalidRequest(
                "allow and deny are egress rules: give them with network 'internet'",
                code="invalid_network_rule",
            )
        options["network"] = Network(allow=allow, deny=deny or ())
    sandbox = await AsyncSandbox.create(client=box.client, **options)
    await box.close()  # a new session sandbox replaces the one made before
    box._default = sandbox
    info = await sandbox.info()
    text = f"created sandbox {sandbox.id} ({info.runtime}, image {info.spec.image})"
    return ToolResult(text, data={"sandbox_id": sandbox.id, "runtime": info.runtime})


async def _run_code(box: Toolbox, sandbox: AsyncSandbox, args: dict[str, Any]) -> ToolResult:
    execution = await sandbox.run_code(
        args["code"],
        args.get("language", "python"),
        context=args.get("context"),
        timeout=args.get("timeout", 60),
    )
    return await _execution_result(box, sandbox, execution)


async def _execution_result(
    box: Toolbox, sandbox: AsyncSandbox, execution: Execution
) -> ToolResult:
    parts: list[str] = []
    images: list[tuple[str, str]] = []
    if execution.logs.stdout:
        parts.append("stdout:\n" + await box.fit(sandbox, "stdout", "".join(execution.logs.stdout)))
    if execution.logs.stderr:
        parts.append("stderr:\n" + await box.fit(sandbox, "stderr", "".join(execution.logs.stderr)))
    for result in execution.results:
        label = "result" if result.is_main_result else "display"
        if result.chart is not None:
            parts.append(f"chart (data): {json.dumps(result.chart)[:MAX_TEXT]}")
        elif result.dataframe is not None:
            parts.append(f"dataframe (data): {json.dumps(result.dataframe)[:MAX_TEXT]}")
        elif result.text is not None:
            parts.append(f"{label}: " + await box.fit(sandbox, label, result.text))
        for mime in ("image/png", "image/jpeg"):
            value = result.data.get(mime)
            if isinstance(value, str):
                images.append((mime, value))
    error = execution.error
    if error is not None:
        parts.append(f"error: {error.name}: {error.value}\n{error.traceback}".rstrip())
    if not parts:
        parts.append("(no output)")
    return ToolResult(
        "\n\n".join(parts), error is not None, images, {"execution": execution.to_dict()}
    )


async def _run_command(box: Toolbox, sandbox: AsyncSandbox, args: dict[str, Any]) -> ToolResult:
    command, workdir = args["command"], args.get("workdir")
    if args.get("background"):  # left running when the launching command ends
        log = f"/tmp/corral-background-{secrets.token_hex(4)}.log"
        launch = f"nohup bash -c {shlex.quote(command)} >{log} 2>&1 </dev/null & echo $!"
        started = await sandbox.run(["bash", "-c", launch], cwd=workdir, timeout=30)
        pid = started.stdout.strip()
        text = f"started in the background as pid {pid}; its output goes to {log}"
        return ToolResult(text, data={"pid": int(pid), "log": log})
    timeout = args.get("timeout", 60)
    try:
        result = await sandbox.run(["bash", "-c", command], timeout=timeout, cwd=workdir)
    except CorralError as error:
        partial = getattr(error, "result", None)
        if partial is None:
            raise
        result = partial
    text = f"exit code: {result.exit_code}" + (" (timed out)" if result.timed_out else "")
    for name in ("stdout", "stderr"):
        output = getattr(result, name)
        if output:
            text += f"\n\n{name}:\n" + await box.fit(sandbox, name, output)
    return ToolResult(text, result.exit_code != 0, data={"exit_code": result.exit_code})


async def _read_file(box: Toolbox, sandbox: AsyncSandbox, args: dict[str, Any]) -> ToolResult:
    data = await sandbox.files.read(args["path"])
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return ToolResult(f"{args['path']} is a binary file of {len(data)} bytes", True)
    return ToolResult(await box.fit(sandbox, "file", text) if text else "(empty file)")


async def _write_file(box: Toolbox, sandbox: AsyncSandbox, args: dict[str, Any]) -> ToolResult:
    written = await sandbox.files.write(args["path"], args["content"])
    return ToolResult(f"wrote {written} bytes to {args['path']}")


async def _list_files(box: Toolbox, sandbox: AsyncSandbox, args: dict[str, Any]) -> ToolResult:
    path = args.get("path", "/root")
    entries = await sandbox.files.list(path, depth=args.get("depth", 1))
    lines = [f"{e.type:<8} {e.size:>10}  {e.path}" for e in sorted(entries, key=lambda e: e.path)]
    return ToolResult(await box.fit(sandbox, "listing", "\n".join(lines) or f"{path} is empty"))


async def _search(box: Toolbox, sandbox: AsyncSandbox, args: dict[str, Any]) -> ToolResult:
    argv = ["grep", "-rnIE", "--color=never"]
    if "glob" in args:
        argv.append(f"--include={args['glob']}")
    argv += ["--", args["pattern"], args.get("path", "/root")]
    result = await sandbox.run(argv, timeout=60)
    if result.exit_code == 1:
        return ToolResult("no matches")
    if result.exit_code != 0:
        return ToolResult(f"search failed: {result.stderr.strip()}", True)
    return ToolResult(await box.fit(sandbox, "matches", result.stdout))


async def _edit(box: Toolbox, sandbox: AsyncSandbox, args: dict[str, Any]) -> ToolResult:
    path, old, new = args["path"], args["old_text"], args["new_text"]
    text = (await sandbox.files.read(path)).decode()
    found = text.count(old) if old else 0
    if found == 0:
        return ToolResult(
            f"old_text does not appear in {path}; read the file and copy it exactly", True
        )
    if found > 1 and not args.get("replace_all"):
        return ToolResult(
            f"old_text appears {found} times in {path}; include more of the lines around it, "
            "or set replace_all",
            True,
        )
    await sandbox.files.write(path, text.replace(old, new))
    return ToolResult(f"replaced {found} occurrence{'s' if found > 1 else ''} in {path}")


FETCH = (
    "import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2]); "
    "import os; print(os.path.getsize(sys.argv[2]))"
)


async def _upload(box: Toolbox, sandbox: AsyncSandbox, args: dict[str, Any]) -> ToolResult:
    url, path = args["url"], args["path"]
    if not url.startswith(("http://", "https://")):
        return ToolResult("url must start with http:// or https://", True)
    result = await sandbox.run(["python3", "-c", FETCH, url, path], timeout=300)
    if result.exit_code != 0:
        reason = result.stderr.strip().splitlines()[-1:] or ["unknown"]
        return ToolResult(f"could not download {url}: {reason[0]}", True)
    return ToolResult(f"downloaded {result.stdout.strip()} bytes to {path}")


async def _state(box: Toolbox, sandbox: AsyncSandbox, action: str) -> ToolResult:
    if action == "resume" and (await sandbox.info()).state is SandboxState.HIBERNATED:
        action = "wake"
    info = await getattr(sandbox, action)()
    return ToolResult(f"sandbox {sandbox.id} is {info.state.value}")


async def _snapshot(box: Toolbox, sandbox: AsyncSandbox, args: dict[str, Any]) -> ToolResult:
    made = await sandbox.snapshot(args.get("name"))
    return ToolResult(f"snapshot {made.id} of {sandbox.id}", data={"snapshot_id": made.id})


async def _fork(box: Toolbox, sandbox: AsyncSandbox, args: dict[str, Any]) -> ToolResult:
    copies = await sandbox.fork(args.get("count", 1))
    ids = [copy.id for copy in copies]
    return ToolResult(f"forked {sandbox.id} into {', '.join(ids)}", data={"sandbox_ids": ids})


async def _expose(box: Toolbox, sandbox: AsyncSandbox, args: dict[str, Any]) -> ToolResult:
    preview = await sandbox.expose(args["port"], public=bool(args.get("public", False)))
    lines = [f"port {preview.port} of {sandbox.id} is at {preview.url}"]
    if not preview.public:
        (name, value), *_ = preview.headers.items()
        lines += [f"HTTP clients send the header {name}: {value}", f"browser: {preview.signed_url}"]
    data = {"url": preview.url, "headers": dict(preview.headers), "signed_url": preview.signed_url}
    return ToolResult("\n".join(lines), data=data)


async def _list(box: Toolbox, _none: None, args: dict[str, Any]) -> ToolResult:
    found = await AsyncSandbox.list(client=box.client)
    lines = [f"{s.id}  {s.state.value:<10} {s.runtime:<10} {s.spec.image}" for s in found]
    return ToolResult("\n".join(lines) or "no sandboxes")


async def _terminate(box: Toolbox, sandbox: AsyncSandbox, args: dict[str, Any]) -> ToolResult:
    info = await sandbox.terminate()
    if box._default is not None and box._default.id == sandbox.id:
        box._default = None
    return ToolResult(f"sandbox {sandbox.id} is {info.state.value}")


HANDLERS: dict[str, Handler] = {
    "create_sandbox": _create,
    "run_code": _run_code,
    "run_command": _run_command,
    "read_file": _read_file,
    "write_file": _write_file,
    "list_files": _list_files,
    "search_files": _search,
    "edit_file": _edit,
    "upload_from_url": _upload,
    "expose_port": _expose,
    "pause_sandbox": lambda box, sandbox, _args: _state(box, sandbox, "pause"),
    "resume_sandbox": lambda box, sandbox, _args: _state(box, sandbox, "resume"),
    "hibernate_sandbox": lambda box, sandbox, _args: _state(box, sandbox, "hibernate"),
    "snapshot_sandbox": _snapshot,
    "fork_sandbox": _fork,
    "list_sandboxes": _list,
    "terminate_sandbox": _terminate,
}
