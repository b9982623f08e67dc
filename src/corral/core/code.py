"""What the code interpreter returns: an `Execution` (results, logs, error) and its contexts.

An execution streams as events, one JSON object each, in the order they happened:

    {"type": "started", "context": str}
    {"type": "stdout" | "stderr", "text": str}
    {"type": "result", "data": {mime: value}, "is_main_result": bool, ...}
    {"type": "error", "name": str, "value": str, "traceback": str}
    {"type": "end", "execution_count": int, "context": str, "timed_out": bool,
     "context_lost": bool, "truncated": bool}

`Execution.add` folds them into the object the SDK returns; the server and the SDK share it.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from corral.core.errors import InvalidRequest

LANGUAGES = ("python", "javascript", "bash")  # where the sandbox's image has their programs
ALIASES = {
    "py": "python",
    "python3": "python",
    "js": "javascript",
    "node": "javascript",
    "sh": "bash",
}
CONTEXT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_CODE_BYTES = 4 * 1024 * 1024
BINARY_MIMES = frozenset({"image/png", "image/jpeg", "application/pdf"})
DATAFRAME = "application/vnd.corral.dataframe+json"
CHART = "application/vnd.corral.chart+json"


@dataclass(frozen=True)
class Result:
    """One rich result: the value of the cell's last expression (`is_main_result`), something
    the code displayed, or a chart it left open. `data` is its MIME bundle; binary kinds (PNG,
    JPEG, PDF) are base64 text there, and bytes through `png`, `jpeg` and `pdf`."""

    data: Mapping[str, Any]
    is_main_result: bool = False

    @property
    def text(self) -> str | None:
        return self._str("text/plain")

    @property
    def html(self) -> str | None:
        return self._str("text/html")

    @property
    def markdown(self) -> str | None:
        return self._str("text/markdown")

    @property
    def svg(self) -> str | None:
        return self._str("image/svg+xml")

    @property
    def latex(self) -> str | None:
        return self._str("text/latex")

    @property
    def javascript(self) -> str | None:
        return self._str("application/javascript")

    @property
    def json(self) -> Any:
        return self.data.get("application/json")

    @property
    def dataframe(self) -> dict[str, Any] | None:
        """A pandas DataFrame as data: `columns`, `dtypes`, `index` and `rows` (the first 100),
        `total_rows`."""
        value = self.data.get(DATAFRAME)
        return value if isinstance(value, dict) else None

    @property
    def chart(self) -> dict[str, Any] | None:
        """A matplotlib figure as data: its `title` and `axes`, each with its `kind` (line,
        bar, scatter, pie, mixed), `title`, `x_label`, `y_label` and `series` with points."""
        value = self.data.get(CHART)
        return value if isinstance(value, dict) else None

    @property
    def png(self) -> bytes | None:
        return self._bytes("image/png")

    @property
    def jpeg(self) -> bytes | None:
        return self._bytes("image/jpeg")

    @property
    def pdf(self) -> bytes | None:
        return self._bytes("application/pdf")

    def formats(self) -> list[str]:
        """The MIME types this result has."""
        return list(self.data)

    def _str(self, mime: str) -> str | None:
        value = self.data.get(mime)
        return value if isinstance(value, str) else None

    def _bytes(self, mime: str) -> bytes | None:
        value = self.data.get(mime)
        return base64.b64decode(value) if isinstance(value, str) else None

    def to_dict(self) -> dict[str, Any]:
        return {"data": dict(self.data), "is_main_result": self.is_main_result}


@dataclass(frozen=True)
class ExecutionError:
    """An error the code raised (or a timeout, or a lost context): not an API failure."""

    name: str
    value: str
    traceback: str = ""


@dataclass
class Logs:
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)


@dataclass
class Execution:
    """What one `run_code` produced, in order within each kind."""

    results: list[Result] = field(default_factory=list)
    logs: Logs = field(default_factory=Logs)
    error: ExecutionError | None = None
    execution_count: int = 0
    context: str | None = None
    timed_out: bool = False
    context_lost: bool = False
    truncated: bool = False

    @property
    def text(self) -> str | None:
        """The main result's text, if the cell ended with a value."""
        for result in self.results:
            if result.is_main_result:
                return result.text
        return None

    def add(self, event: Mapping[str, Any]) -> Result | ExecutionError | str | None:
        """Fold one event in; what it added (a result, an error, output text), else None."""
        kind = event.get("type")
        if kind in ("stdout", "stderr"):
            text = str(event.get("text", ""))
            getattr(self.logs, str(kind)).append(text)
            return text
        if kind == "result":
            result = Result(dict(event.get("data") or {}), bool(event.get("is_main_result")))
            self.results.append(result)
            return result
        if kind == "error":
            self.error = ExecutionError(
                str(event.get("name", "")),
                str(event.get("value", "")),
                str(event.get("traceback", "")),
            )
            return self.error
        if kind == "started":
            self.context = str(event.get("context"))
        elif kind == "end":
            self.execution_count = int(event.get("execution_count") or 0)
            self.context = str(event.get("context") or self.context)
            self.timed_out = bool(event.get("timed_out"))
            self.context_lost = bool(event.get("context_lost"))
            self.truncated = bool(event.get("truncated"))
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "results": [result.to_dict() for result in self.results],
            "logs": {"stdout": self.logs.stdout, "stderr": self.logs.stderr},
            "error": None if self.error is None else vars(self.error),
            "execution_count": self.execution_count,
            "context": self.context,
            "timed_out": self.timed_out,
            "context_lost": self.context_lost,
            "truncated": self.truncated,
        }


@dataclass(frozen=True)
class CodeContext:
    """A code context: an interpreter whose variables last across `run_code` calls."""

    id: str
    language: str
    cwd: str
    running: bool = False
    execution_count: int = 0
    restarts: int = 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CodeContext:
        return cls(
            id=str(data["id"]),
            language=str(data["language"]),
            cwd=str(data.get("cwd") or "/"),
            running=bool(data.get("running")),
            execution_count=int(data.get("execution_count") or 0),
            restarts=int(data.get("restarts") or 0),
        )

    def to_dict(self) -> dict[str, Any]:
        return vars(self).copy()


def check_context_id(context_id: str) -> str:
    if not isinstance(context_id, str) or not CONTEXT_ID.match(context_id):
        raise InvalidRequest(
            f"{context_id!r} is not a code context id (letters, digits, '_', '.', '-'; "
            "up to 64); list the sandbox's contexts for theirs",
            code="invalid_context",
        )
    return context_id
