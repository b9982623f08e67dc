"""A code interpreter's kernel: one Python process per code context, run by the guest agent.

It keeps a namespace across executions. The agent sends it one request per line on the control
descriptor it names (`{"code": str, "env": {...}}`) and reads its messages, one JSON object per
line, from the other:

    {"type": "stdout" | "stderr", "text": str}     what the code printed, in order
    {"type": "result", "data": {mime: value}, "is_main_result": bool}
    {"type": "error", "name": str, "value": str, "traceback": str}
    {"type": "done", "execution_count": int}        after every request

The value of a cell's last expression is its main result; `display(obj)` publishes others, and
so does each matplotlib figure left open. Rich results come from the objects' own display
methods (`_repr_html_`, `_repr_png_`, ...): binary kinds travel as base64. SIGINT interrupts the
running code with KeyboardInterrupt and keeps the namespace.

Where the image has IPython its shell runs the code (magics such as `%pip install`, its display
formatters and tracebacks); otherwise plain Python does. Standard library only, any Python 3.8+.

Usage: python3 kernel.py CONTROL_IN_FD CONTROL_OUT_FD
"""

from __future__ import annotations

import ast
import base64
import contextlib
import importlib
import importlib.util
import io
import json
import linecache
import math
import os
import re
import signal
import sys
import traceback
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

# MIME type → (display method, binary?). Binary values are sent as base64.
REPRS = (
    ("text/html", "_repr_html_", False),
    ("text/markdown", "_repr_markdown_", False),
    ("image/svg+xml", "_repr_svg_", False),
    ("image/png", "_repr_png_", True),
    ("image/jpeg", "_repr_jpeg_", True),
    ("text/latex", "_repr_latex_", False),
    ("application/json", "_repr_json_", False),
    ("application/pdf", "_repr_pdf_", True),
    ("application/javascript", "_repr_javascript_", False),
)
BINARY = frozenset(mime for mime, _method, binary in REPRS if binary)
CELL = "<cell-%d>"
TEXT_CHUNK = 8192
DATAFRAME = "application/vnd.corral.dataframe+json"
CHART = "application/vnd.corral.chart+json"
MAX_ROWS = 100  # of a DataFrame's structured data
MAX_POINTS = 1000  # of a chart's series
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class Channel:
    """The kernel's side of the control descriptors."""

    def __init__(self, in_fd: int, out_fd: int) -> None:
        self.in_fd = in_fd
        self.out_fd = out_fd
        # Not for the processes the code starts (`os.system("server &")` keeps what is not
        # close-on-exec): one holding the output's write end would hide the kernel's end from
        # the agent, and an execution following it would wait for ever.
        for fd in (in_fd, out_fd):
            os.set_inheritable(fd, False)
        self.pending = b""
        self.text: List[Tuple[str, str]] = []  # printed, not yet sent (see `Output`)
        self.text_size = 0

    def print(self, name: str, text: str) -> None:
        """Output, sent a line (or TEXT_CHUNK characters) at a time."""
        if self.text and self.text[-1][0] == name:
            self.text[-1] = (name, self.text[-1][1] + text)
        else:
            self.text.append((name, text))
        self.text_size += len(text)
        if "\n" in text or self.text_size >= TEXT_CHUNK:
            self.send({"type": "flush"})

    def send(self, message: Dict[str, Any]) -> None:
        """Write one message whole, after the output before it; an interrupt waits until it is
        out (then raises)."""
        lines = [{"type": name, "text": text} for name, text in self.text]
        self.text, self.text_size = [], 0
        if message["type"] != "flush":
            lines.append(message)
        data = "".join(json.dumps(m, separators=(",", ":")) + "\n" for m in lines).encode()
        if not data:
            return
        view = memoryview(data)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            while view:
                view = view[os.write(self.out_fd, view) :]
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    def receive(self) -> Optional[Dict[str, Any]]:
        while b"\n" not in self.pending:
            try:
                chunk = os.read(self.in_fd, 65536)
            except KeyboardInterrupt:  # an interrupt that came after its code ended
                continue
            if not chunk:
                return None
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        message = json.loads(line)
        return message if isinstance(message, dict) else None


class Output(io.TextIOBase):
    """sys.stdout or sys.stderr: each write is a message, in order with the results."""

    def __init__(self, channel: Channel, name: str) -> None:
        self.channel = channel
        self.name = name

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError("write() argument must be str, not %s" % type(text).__name__)
        if text:
            self.channel.print(self.name, text)
        return len(text)

    def flush(self) -> None:
        self.channel.send({"type": "flush"})

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"


def bundle(obj: Any) -> Dict[str, Any]:
    """The MIME bundle of `obj`, from its own display methods, always with text/plain."""
    data: Dict[str, Any] = {}
    if not isinstance(obj, type):  # a class's _repr_*_ are unbound functions
        found = _call(obj, "_repr_mimebundle_")
        if isinstance(found, tuple) and found:
            found = found[0]
        if isinstance(found, dict):
            data.update({str(k): v for k, v in found.items()})
        for mime, method, _binary in REPRS:
            if mime not in data:
                value = _call(obj, method)
                if isinstance(value, tuple) and value:
                    value = value[0]  # (data, metadata)
                if value is not None:
                    data[mime] = value
    data.setdefault("text/plain", _plain(obj))
    return dict({mime: _wire(mime, value) for mime, value in data.items()}, **structured(obj))


def structured(obj: Any) -> Dict[str, Any]:
    """What an agent can read without looking at a picture: a DataFrame's columns, types and
    first rows (as DATAFRAME), beside its usual representations."""
    kind = type(obj)
    if kind.__name__ != "DataFrame" or not kind.__module__.startswith("pandas"):
        return {}
    try:
        head = json.loads(obj.head(MAX_ROWS).to_json(orient="split", date_format="iso"))
        frame = {
            "columns": [str(column) for column in obj.columns],
            "dtypes": [str(dtype) for dtype in obj.dtypes],
            "index": head["index"],
            "rows": head["data"],
            "total_rows": len(obj),
        }
    except Exception:  # an exotic frame keeps its other representations
        return {}
    return {DATAFRAME: frame}


def chart(figure: Any) -> Dict[str, Any]:
    """A matplotlib figure as data: per axes its kind, title, labels and series with points."""
    return {
        "title": _text(getattr(figure, "_suptitle", None)),
        "axes": [_axes(axes) for axes in figure.get_axes()],
    }


def _axes(axes: Any) -> Dict[str, Any]:
    series: List[Dict[str, Any]] = []
    for line in axes.get_lines():
        xs, ys = _numbers(line.get_xdata()), _numbers(line.get_ydata())
        points = [[x, y] for x, y in zip(xs, ys)]  # noqa: B905 - for Python 3.8 too
        series.append({"kind": "line", "label": _label(line), "points": points})
    names = [tick.get_text() for tick in axes.get_xticklabels()]
    ticks = dict(zip(_numbers(axes.get_xticks()), names))  # noqa: B905 - for Python 3.8 too
    for container in getattr(axes, "containers", ()):
        bars = [_bar(bar, ticks) for bar in container[:MAX_POINTS] if hasattr(bar, "get_height")]
        series.append({"kind": "bar", "label": _label(container), "bars": bars})
    for collection in axes.collections:
        offsets: Any = getattr(collection, "get_offsets", list)()
        points = [[_number(x), _number(y)] for x, y in list(offsets)[:MAX_POINTS]]
        if points:
            series.append({"kind": "scatter", "label": _label(collection), "points": points})
    wedges = [patch for patch in axes.patches if type(patch).__name__ == "Wedge"]
    if wedges:
        labels = [text.get_text() for text in axes.texts]
        slices = [
            {
                "label": labels[i] if len(labels) >= len(wedges) else None,
                "fraction": _number((w.theta2 - w.theta1) / 360.0),
            }
            for i, w in enumerate(wedges)
        ]
        series.append({"kind": "pie", "slices": slices})
    kinds = sorted({entry["kind"] for entry in series})
    return {
        "kind": kinds[0] if len(kinds) == 1 else ("mixed" if kinds else "empty"),
        "title": axes.get_title() or None,
        "x_label": axes.get_xlabel() or None,
        "y_label": axes.get_ylabel() or None,
        "series": series,
    }


def _bar(bar: Any, ticks: Dict[Any, str]) -> Dict[str, Any]:
    """One bar: its category (the tick label under it) or position, and its height."""
    center = _number(bar.get_x() + bar.get_width() / 2)
    return {"x": ticks.get(center) or center, "height": _number(bar.get_height())}


def _label(artist: Any) -> Optional[str]:
    label = artist.get_label() if hasattr(artist, "get_label") else None
    return None if not label or str(label).startswith("_") else str(label)


def _text(artist: Any) -> Optional[str]:
    return (artist.get_text() or None) if artist is not None else None


def _numbers(values: Any) -> List[Any]:
    return [_number(value) for value in list(values)[:MAX_POINTS]]


def _number(value: Any) -> Any:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return number if math.isfinite(number) else None  # JSON has no NaN


def _call(obj: Any, method: str) -> Any:
    function = getattr(obj, method, None)
    if not callable(function):
        return None
    try:
        return function()
    except Exception:  # a broken display method costs only its own representation
        return None


def _plain(obj: Any) -> str:
    try:
        return repr(obj)
    except Exception as exc:
        return "<%s object: repr failed: %s>" % (type(obj).__name__, exc)


def _wire(mime: str, value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if mime == "application/json" or isinstance(value, (dict, list)):
        return value
    return str(value)


class Kernel:
    """One code context's interpreter."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.count = 0
        self.namespace: Dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
        self.namespace["display"] = self.display
        self.shell = _ipython(self)

    def publish(self, data: Dict[str, Any], main: bool) -> None:
        self.channel.send({"type": "result", "data": data, "is_main_result": main})

    def display(self, *objects: Any) -> None:
        """Publish each object as a result beside the cell's value (like IPython's display)."""
        for obj in objects:
            self.publish(bundle(obj), False)

    def error(self, name: str, value: str, trace: str) -> None:
        self.channel.send({"type": "error", "name": name, "value": value, "traceback": trace})

    def execute(self, code: str, env: Dict[str, str]) -> None:
        self.count += 1
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        self.hook_show()
        try:
            if self.shell is not None:
                self.shell(code)
            else:
                self.run_plain(code)
            self.show_figures()
        except KeyboardInterrupt:
            self.error("KeyboardInterrupt", "interrupted", "KeyboardInterrupt: interrupted\n")
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            sys.stdout.flush()
            sys.stderr.flush()

    def run_plain(self, code: str) -> None:
        filename = CELL % self.count
        # Tracebacks quote the cell's lines, as they quote a file's.
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        try:
            body, last = _split(code, filename)
            exec(compile(body, filename, "exec"), self.namespace)  # noqa: S102 - its purpose
            if last is not None:
                value = eval(compile(last, filename, "eval"), self.namespace)  # noqa: S307
                if value is not None:
                    self.namespace["_"] = value
                    self.publish(bundle(value), True)
        except (KeyboardInterrupt, SystemExit) as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            self.error("SystemExit", str(exc.code), "SystemExit: %s\n" % (exc.code,))
        except BaseException as exc:  # the code's error is the execution's error
            self.error(type(exc).__name__, str(exc), _traceback(exc, filename))

    def hook_show(self) -> None:
        """Have `plt.show()` publish the open figures at once, in order with the output."""
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is not None and getattr(pyplot.show, "__name__", "") != "corral_show":

            def corral_show(*_args: Any, **_kwargs: Any) -> None:
                self.show_figures()

            setattr(pyplot, "show", corral_show)  # noqa: B010 - a module found at run time

    def show_figures(self) -> None:
        """Publish matplotlib figures the code left open, as PNG and as data (and close them)."""
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is None:
            return
        self.hook_show()
        for number in pyplot.get_fignums():
            figure = pyplot.figure(number)
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png")
            data = {"text/plain": repr(figure), "image/png": _wire("image/png", buffer.getvalue())}
            with contextlib.suppress(Exception):  # an unusual figure is still a picture
                data[CHART] = chart(figure)
            self.publish(data, False)
        pyplot.close("all")


class PyplotHook:
    """Finds `matplotlib.pyplot` for the first import, then has the kernel hook its `show`,
    so that even the cell that imports it shows figures in order with its output."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "matplotlib.pyplot":
            return None
        sys.meta_path.remove(self)  # once is enough: the real finders take it from here
        spec = importlib.util.find_spec(name)
        loader = spec.loader if spec is not None else None
        run = getattr(loader, "exec_module", None)
        if run is not None:

            def exec_module(module: Any) -> None:
                run(module)
                self.kernel.hook_show()

            setattr(loader, "exec_module", exec_module)  # noqa: B010 - this one loader only
        return spec


def _split(code: str, filename: str) -> Tuple[ast.Module, Optional[ast.Expression]]:
    """The cell's statements, and its last expression (whose value is the main result)."""
    tree = ast.parse(code, filename, "exec")
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)  # type: ignore[attr-defined]
        return tree, last
    return tree, None


def _traceback(exc: BaseException, filename: str) -> str:
    """The traceback from the cell down, without the kernel's own frames."""
    frames = traceback.extract_tb(exc.__traceback__)
    while frames and frames[0].filename != filename:
        frames.pop(0)
    if isinstance(exc, SyntaxError):
        frames = traceback.StackSummary()
    lines = ["Traceback (most recent call last):\n"] if frames else []
    lines += traceback.format_list(frames)
    lines += traceback.format_exception_only(type(exc), exc)
    return "".join(lines)


def _ipython(kernel: Kernel) -> Optional[Callable[[str], None]]:
    """A runner on IPython's interactive shell, where the image has IPython; else None."""
    try:
        shell_module = importlib.import_module("IPython.core.interactiveshell")
        config = importlib.import_module("traitlets.config").Config()
    except Exception:
        return None
    # History stays in memory: no SQLite file in the sandbox's home, no writer thread.
    config.HistoryManager.enabled = False
    shell = shell_module.InteractiveShell.instance(config=config, user_ns=kernel.namespace)
    shell.colors = "NoColor"
    formatter = shell.display_formatter

    def rich(obj: Any) -> Dict[str, Any]:
        data, _metadata = formatter.format(obj)
        return dict({mime: _wire(mime, value) for mime, value in data.items()}, **structured(obj))

    def publish(data: Dict[str, Any], metadata: Any = None, *args: Any, **kwargs: Any) -> None:
        kernel.publish({mime: _wire(mime, value) for mime, value in data.items()}, False)

    def main_result(obj: Any) -> None:
        if obj is not None:
            kernel.namespace["_"] = obj
            kernel.publish(rich(obj), True)

    def show(etype: Any, evalue: BaseException, stb: Any) -> None:
        text = shell.InteractiveTB.stb2text(stb) if isinstance(stb, list) else str(stb)
        kernel.error(type(evalue).__name__, str(evalue), ANSI.sub("", text) + "\n")

    shell.display_pub.publish = publish
    shell.display_trap.hook = main_result
    shell._showtraceback = show
    kernel.namespace.pop("display", None)  # IPython's own display() publishes through us

    def run(code: str) -> None:
        result = shell.run_cell(code, store_history=True)
        if isinstance(result.error_in_exec, KeyboardInterrupt):
            raise result.error_in_exec

    return run


def main() -> None:
    if len(sys.argv) != 3:
        sys.stderr.write("usage: kernel.py CONTROL_IN_FD CONTROL_OUT_FD\n")
        sys.exit(2)
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # the code's imports see the image's modules, not the agent's
    channel = Channel(int(sys.argv[1]), int(sys.argv[2]))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.setdefault("MPLBACKEND", "Agg")  # no display: figures are published instead
    warnings.filterwarnings("ignore", message=".*non-interactive.*cannot be shown")
    sys.stdout = Output(channel, "stdout")
    sys.stderr = Output(channel, "stderr")
    sys.stdin = io.StringIO()
    kernel = Kernel(channel)
    sys.meta_path.insert(0, PyplotHook(kernel))
    channel.send({"type": "ready"})  # IPython (where there is one) is loaded
    while True:
        request = channel.receive()
        if request is None:
            return
        env = request.get("env") or {}
        setup = request.get("setup")
        if isinstance(setup, dict):  # once, for a context started before its sandbox was claimed
            os.environ.update({str(k): str(v) for k, v in (setup.get("env") or {}).items()})
            with contextlib.suppress(OSError, TypeError):
                os.chdir(setup.get("cwd") or os.getcwd())
        try:
            kernel.execute(str(request.get("code", "")), {str(k): str(v) for k, v in env.items()})
        except KeyboardInterrupt:  # one that came while the code's error was being sent
            pass
        try:
            channel.send({"type": "done", "execution_count": kernel.count})
        except KeyboardInterrupt:  # it came once the execution was over: nothing to stop
            pass


if __name__ == "__main__":
    main()
