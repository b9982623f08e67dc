"""`corral audit`: the audit log (who did what, and how it went), and `corral audit replay`."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from corral.cli._common import ApiKey, Json, Url, app, fail, out, session
from corral.core.audit import AuditEntry, ReplayReport
from corral.core.errors import InvalidRequest

audit_app = typer.Typer(
    help="The audit log: every API action, who made it and how it went.",
    invoke_without_command=True,
)
app.add_typer(audit_app, name="audit")

_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
When = Annotated[
    str | None,
    typer.Option(help="A time: unix seconds, ISO 8601 (2026-12-01T10:00), or ago (30m, 2h, 7d)."),
]


def when(text: str | None, option: str) -> float | None:
    """Unix seconds of a time given as unix seconds, ISO 8601 or a span ago."""
    if text is None:
        return None
    ago = _AGO.match(text.strip())
    if ago:
        return time.time() - float(ago.group(1)) * _UNITS[ago.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        fail(InvalidRequest(f"{option} {text!r}: give unix seconds, an ISO time or 30m/2h/7d"))
    return (moment if moment.tzinfo else moment.astimezone()).timestamp()


def what(d: Mapping[str, Any]) -> str:
    """An action in a few words, from its detail: the command, the code's first line, the path."""
    if "argv" in d:
        text = " ".join(d["argv"])
    elif "cmd" in d:
        text = d["cmd"]
    elif "code" in d:
        text = d["code"].strip().splitlines()[0] if d["code"].strip() else ""
    elif "path" in d:
        text = f"{d['path']} -> {d['to']}" if "to" in d else str(d["path"])
    else:
        text = ""
    return text if len(text) <= 60 else text[:57] + "..."


def shown(text: str) -> str:
    """`text` safe to print: what a tenant sent (a command, a path) can hold neither terminal
    escapes nor Rich markup that would hide or forge rows on an admin's screen."""
    return escape("".join(c if c.isprintable() else "?" for c in text))


def outcome(entry: AuditEntry) -> str:
    if entry.operation in ("exec", "code") and entry.error is None:
        error = (entry.detail.get("outcome") or {}).get("error")
        return f"exit {entry.exit_code}" if entry.operation == "exec" else (error or "ok")
    shown = str(entry.status) if entry.status is not None else ""
    return f"{shown} {entry.error}".strip() if entry.error else shown


def _table(entries: list[AuditEntry]) -> Table:
    table = Table("id", "time", "key", "client", "sandbox", "operation", "what", "outcome", "ms",
                  title=f"{len(entries)} entries")  # fmt: skip
    for e in entries:
        at = datetime.fromtimestamp(e.at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        cells = (str(e.id), at, e.key_id or "-", e.client, e.sandbox_id or "-", e.operation,
                 what(e.detail), outcome(e), f"{e.duration * 1000:.0f}")  # fmt: skip
        table.add_row(*(shown(cell) for cell in cells))
    return table


@audit_app.callback()
def audit(
    ctx: typer.Context,
    sandbox: str | None = typer.Option(None, help="Only this sandbox's entries."),
    key: str | None = typer.Option(None, help="Only this key's (admin keys; others see theirs)."),
    operation: str | None = typer.Option(None, help="Only this operation (exec, code, ...)."),
    since: When = None,
    until: When = None,
    limit: int = typer.Option(100, help="At most this many entries."),
    oldest_first: bool = typer.Option(False, help="Oldest first (default: newest first)."),
    url: Url = None,
    api_key: ApiKey = None,
    as_json: Json = False,
) -> None:
    """Audit entries, newest first: yours, or every key's with an admin key."""
    if ctx.invoked_subcommand is not None:
        return
    with session(url, api_key) as sdk:
        entries = sdk.audit(
            sandbox=sandbox, key=key, operation=operation, since=when(since, "--since"),
            until=when(until, "--until"), limit=limit, newest_first=not oldest_first,
        )  # fmt: skip
    if as_json:
        print(json.dumps([e.to_dict() for e in entries]))
    else:
        out.print(_table(entries))


@audit_app.command("replay")
def replay(
    sandbox_id: str,
    snapshot: str = typer.Option(..., "--from", help="The snapshot (id or name) to fork."),
    keep: bool = typer.Option(False, help="Keep the fork running afterwards."),
    url: Url = None,
    api_key: ApiKey = None,
    as_json: Json = False,
) -> None:
    """Run a sandbox's recorded commands and code again, in order, in a fork of a snapshot,
    and show where the outcomes differ from the recorded ones (exit status 1 if any do)."""
    with session(url, api_key) as sdk:
        report = sdk.audit_replay(sandbox_id, snapshot, keep=keep)
    if as_json:
        print(json.dumps(report.to_dict()))
    else:
        _print_report(report)
    if report.differences:
        raise typer.Exit(1)


def _print_report(report: ReplayReport) -> None:
    table = Table(
        "entry", "operation", "what", "result", "why", title=f"replay in {report.fork_id}"
    )
    for step in report.steps:
        text = what(step.detail)
        why = ", ".join(step.differences) or step.reason or ""
        colour = {"same": "green", "skipped": "yellow"}.get(step.result, "red")
        table.add_row(str(step.entry_id), shown(step.operation), shown(text),
                      f"[{colour}]{step.result}[/{colour}]", shown(why))  # fmt: skip
    out.print(table)
    out.print(f"{len(report.steps)} steps, {len(report.differences)} not as recorded")
