"""The code interpreter on real sandboxes, both runtimes: state across calls, rich results,
streaming order, errors, timeouts, lost and restarted contexts, parallel contexts."""

from __future__ import annotations

import asyncio
import base64
import struct
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from corral.core.code import Execution
from corral.core.errors import ContextNotFound, InvalidRequest, UnsupportedLanguage
from corral.core.models import SandboxInfo
from corral.core.spec import SandboxSpec
from corral.engine import Engine


async def run_code(engine: Engine, sandbox_id: str, code: str, **options: Any) -> Execution:
    execution = Execution()
    async for event in await engine.interpreter.run(sandbox_id, code, **options):
        execution.add(event)
    return execution


async def events_of(engine: Engine, sandbox_id: str, code: str) -> list[dict[str, Any]]:
    return [event async for event in await engine.interpreter.run(sandbox_id, code)]


def png(width: int, height: int) -> bytes:
    """A real, tiny PNG of one colour."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack("!I", len(data)) + body + struct.pack("!I", zlib.crc32(body))

    header = struct.pack("!IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = b"".join(b"\0" + b"\xff\x00\x00" * width for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


async def test_state_persists_and_the_last_expression_is_the_result(
    engine: Engine, sandbox: SandboxInfo
) -> None:
    first = await run_code(engine, sandbox.id, "x = 41")
    assert (first.results, first.error, first.execution_count) == ([], None, 1)
    second = await run_code(engine, sandbox.id, "x += 1\nprint('x is', x)\nx")
    assert second.logs.stdout == ["x is 42\n"]
    assert second.text == "42"
    assert [r.is_main_result for r in second.results] == [True]
    assert second.execution_count == 2
    assert second.context == "python"


async def test_errors_are_in_the_execution_not_raised(engine: Engine, sandbox: SandboxInfo) -> None:
    failed = await run_code(engine, sandbox.id, "def f():\n    return 1 / 0\nf()")
    assert failed.error is not None
    assert (failed.error.name, failed.error.value) == ("ZeroDivisionError", "division by zero")
    assert "return 1 / 0" in failed.error.traceback
    assert "kernel.py" not in failed.error.traceback  # Corral's own frames are left out
    bad = await run_code(engine, sandbox.id, "def f(:")
    assert bad.error is not None and bad.error.name == "SyntaxError"
    after = await run_code(engine, sandbox.id, "'still here'")
    assert after.text == "'still here'" and after.error is None


async def test_rich_results_are_mime_bundles(engine: Engine, sandbox: SandboxInfo) -> None:
    image = png(3, 2)
    code = (
        "import base64\n"
        "class Chart:\n"
        f"    def _repr_png_(self): return base64.b64decode({base64.b64encode(image).decode()!r})\n"
        "    def _repr_html_(self): return '<table><tr><td>7</td></tr></table>'\n"
        "    def _repr_markdown_(self): return '**bold**'\n"
        "    def _repr_svg_(self): return '<svg></svg>'\n"
        "    def _repr_latex_(self): return r'$x^2$'\n"
        "    def _repr_json_(self): return {'a': [1, 2]}\n"
        "    def _repr_jpeg_(self): return b'\\xff\\xd8jpeg'\n"
        "    def _repr_pdf_(self): return b'%PDF-1.4'\n"
        "    def __repr__(self): return 'Chart()'\n"
        "display(Chart())\n"
        "print('between')\n"
        "Chart()"
    )
    done = await run_code(engine, sandbox.id, code)
    assert done.error is None, done.error
    shown, main = done.results
    assert (shown.is_main_result, main.is_main_result) == (False, True)
    for result in (shown, main):
        assert result.png == image
        assert result.png[16:24] == struct.pack("!II", 3, 2)  # really a 3x2 PNG
        assert result.html == "<table><tr><td>7</td></tr></table>"
        assert (result.markdown, result.svg, result.latex) == ("**bold**", "<svg></svg>", "$x^2$")
        assert result.json == {"a": [1, 2]}
        assert (result.jpeg, result.pdf, result.text) == (b"\xff\xd8jpeg", b"%PDF-1.4", "Chart()")


async def test_events_stream_in_order(engine: Engine, sandbox: SandboxInfo) -> None:
    code = "print('one')\ndisplay(1)\nimport sys; print('two', file=sys.stderr)\nprint('three')\n3"
    kinds = [(e["type"], e.get("text")) for e in await events_of(engine, sandbox.id, code)]
    assert kinds == [
        ("started", None),
        ("stdout", "one\n"),
        ("result", None),
        ("stderr", "two\n"),
        ("stdout", "three\n"),
        ("result", None),
        ("end", None),
    ]


async def test_a_timeout_interrupts_and_keeps_the_variables(
    engine: Engine, sandbox: SandboxInfo
) -> None:
    await run_code(engine, sandbox.id, "kept = 'yes'")
    stopped = await run_code(
        engine, sandbox.id, "import time\nwhile True: time.sleep(0.01)", timeout=1
    )
    assert stopped.timed_out
    assert stopped.error is not None and stopped.error.name == "TimeoutError"
    assert "kept" in stopped.error.value
    assert (await run_code(engine, sandbox.id, "kept")).text == "'yes'"


async def test_a_lost_interpreter_is_reported_and_restarted(
    engine: Engine, sandbox: SandboxInfo
) -> None:
    await run_code(engine, sandbox.id, "gone = 1")
    lost = await run_code(engine, sandbox.id, "import os; os._exit(7)")
    assert lost.context_lost
    assert lost.error is not None and lost.error.name == "ContextLost"
    assert "exit code 7" in lost.error.value
    after = await run_code(engine, sandbox.id, "'gone' in dir()")
    assert after.text == "False"
    crashed = await run_code(
        engine, sandbox.id, "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    )
    assert crashed.context_lost and "signal 11" in crashed.error.value  # type: ignore[union-attr]


async def test_a_lost_interpreter_is_reported_while_a_process_it_started_runs_on(
    engine: Engine, sandbox: SandboxInfo
) -> None:
    """Code that starts a server in the background (`os.system("... &")`), then its
    interpreter dies: the execution ends as lost, although the server lives on (it must not
    hold the interpreter's channel to the agent), and the next one runs."""
    await run_code(engine, sandbox.id, "import os; os.system('sleep 300 &')")
    lost = await asyncio.wait_for(run_code(engine, sandbox.id, "import os; os._exit(3)"), 30)
    assert lost.context_lost and "exit code 3" in lost.error.value  # type: ignore[union-attr]
    assert (await run_code(engine, sandbox.id, "2 + 2")).text == "4"
    assert b"sleep 300" in (await engine.run(sandbox.id, "ps -eo args")).stdout


async def test_stuck_code_is_killed_after_its_timeout(engine: Engine, sandbox: SandboxInfo) -> None:
    code = "import time\nwhile True:\n    try:\n        time.sleep(0.01)\n    except KeyboardInterrupt:\n        pass"
    stuck = await run_code(engine, sandbox.id, code, timeout=1)
    assert stuck.timed_out and stuck.context_lost
    assert "did not stop" in stuck.error.value  # type: ignore[union-attr]
    assert (await run_code(engine, sandbox.id, "1 + 1")).text == "2"


async def test_contexts_are_independent_and_run_in_parallel(
    engine: Engine, sandbox: SandboxInfo
) -> None:
    interpreter = engine.interpreter
    one = await interpreter.create_context(sandbox.id, cwd="/tmp", env={"WHO": "one"})
    two = await interpreter.create_context(sandbox.id)
    assert one.id != two.id and one.cwd == "/tmp"
    await run_code(engine, sandbox.id, "v = 'one'", context=one.id)
    await run_code(engine, sandbox.id, "v = 'two'", context=two.id)
    sleepers = [
        run_code(engine, sandbox.id, "import time; time.sleep(1); v", context=c.id)
        for c in (one, two)
    ]
    loop = asyncio.get_running_loop()
    start = loop.time()
    first, second = await asyncio.gather(*sleepers)
    assert loop.time() - start < 1.9  # together, not one after the other
    assert (first.text, second.text) == ("'one'", "'two'")
    seen = await run_code(
        engine, sandbox.id, "import os; os.getcwd(), os.environ['WHO']", context=one.id
    )
    assert seen.text == "('/tmp', 'one')"
    per_call = await run_code(
        engine, sandbox.id, "import os; os.environ.get('X')", context=one.id, env={"X": "1"}
    )
    assert per_call.text == "'1'"
    after = await run_code(engine, sandbox.id, "'X' in os.environ", context=one.id)
    assert after.text == "False"  # the call's env was for that call only
    listed = {c.id for c in await interpreter.contexts(sandbox.id)}
    assert {one.id, two.id} <= listed
    restarted = await interpreter.restart_context(sandbox.id, one.id)
    assert restarted.restarts == 1
    assert (await run_code(engine, sandbox.id, "'v' in dir()", context=one.id)).text == "False"
    await interpreter.remove_context(sandbox.id, two.id)
    with pytest.raises(ContextNotFound):
        await run_code(engine, sandbox.id, "v", context=two.id)


async def test_bad_requests_are_clear_errors(engine: Engine, sandbox: SandboxInfo) -> None:
    with pytest.raises(UnsupportedLanguage) as refused:
        await engine.interpreter.run(sandbox.id, "1", language="cobol")
    assert refused.value.status_code == 422 and "available: python" in refused.value.message
    with pytest.raises(InvalidRequest):
        await engine.interpreter.run(sandbox.id, "1", context="../x")
    with pytest.raises(InvalidRequest):
        await engine.interpreter.run(sandbox.id, "1", timeout=-1)
    with pytest.raises(ContextNotFound):
        await engine.interpreter.restart_context(sandbox.id, "nope")


async def test_output_floods_are_cut_and_marked(engine: Engine, sandbox: SandboxInfo) -> None:
    flood = await run_code(engine, sandbox.id, "for _ in range(200_000): print('x' * 63)\n'done'")
    kept = "".join(flood.logs.stdout)
    assert flood.truncated
    assert len(kept) < 5 * 1024 * 1024
    assert kept.rstrip().endswith("in this execution]")
    assert flood.text == "'done'"
    big = await run_code(
        engine, sandbox.id, "class Big:\n    def _repr_html_(self): return 'x' * (9 << 20)\nBig()"
    )
    assert big.truncated and "result dropped" in "".join(big.logs.stderr)


@pytest.fixture
async def interpreter_sandbox(engine: Engine, runtime: str) -> AsyncIterator[SandboxInfo]:
    """A sandbox of the built-in code-interpreter image (IPython, numpy, pandas, matplotlib)."""
    info = await engine.create(SandboxSpec(runtime=runtime, image="code-interpreter"))
    yield info
    await engine.terminate(info.id)


async def test_ipython_runs_the_code_where_the_image_has_it(
    engine: Engine, interpreter_sandbox: SandboxInfo
) -> None:
    sandbox_id = interpreter_sandbox.id
    shell = await run_code(engine, sandbox_id, "type(get_ipython()).__name__")
    assert shell.text == "'InteractiveShell'"
    magic = await run_code(engine, sandbox_id, "answer = 42\n%who_ls")
    assert magic.text is not None and "'answer'" in magic.text
    pip = await run_code(engine, sandbox_id, "%pip --version")  # a magic that runs a process
    assert "pip " in "".join(pip.logs.stdout), pip
    failed = await run_code(engine, sandbox_id, "def f():\n    return 1 / 0\nf()")
    assert failed.error is not None and failed.error.name == "ZeroDivisionError"
    assert "return 1 / 0" in failed.error.traceback and "\x1b[" not in failed.error.traceback


async def test_dataframes_come_back_as_html_and_as_data(
    engine: Engine, interpreter_sandbox: SandboxInfo
) -> None:
    code = (
        "import pandas as pd\n"
        "df = pd.DataFrame({'city': ['Oslo', 'Lima'], 'temp': [4.5, None]})\n"
        "df"
    )
    (result,) = (await run_code(engine, interpreter_sandbox.id, code)).results
    assert result.html is not None and "<table" in result.html and "Oslo" in result.html
    assert result.dataframe == {
        "columns": ["city", "temp"],
        "dtypes": ["object", "float64"],
        "index": [0, 1],
        "rows": [["Oslo", 4.5], ["Lima", None]],
        "total_rows": 2,
    }


async def test_matplotlib_charts_come_back_as_png_and_as_data(
    engine: Engine, interpreter_sandbox: SandboxInfo
) -> None:
    code = (
        "import matplotlib.pyplot as plt\n"
        "fig, ax = plt.subplots(figsize=(4, 3), dpi=100)\n"
        "ax.plot([1, 2, 3], [2, 4, 8], label='growth')\n"
        "ax.set_title('Growth'); ax.set_xlabel('year'); ax.set_ylabel('users')\n"
        "print('before')\n"
        "plt.show()\n"
        "print('after')\n"
        "plt.figure(figsize=(2, 2), dpi=50)\n"
        "plt.bar(['a', 'b'], [3, 5])\n"
        "None"
    )
    events = await events_of(engine, interpreter_sandbox.id, code)
    kinds = [e["type"] for e in events]
    assert kinds == ["started", "stdout", "result", "stdout", "result", "end"]
    execution = Execution()
    for event in events:
        execution.add(event)
    line, bars = execution.results
    assert line.png is not None and line.png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack("!II", line.png[16:24]) == (400, 300)  # the figure's size
    assert line.chart == {
        "title": None,
        "axes": [
            {
                "kind": "line",
                "title": "Growth",
                "x_label": "year",
                "y_label": "users",
                "series": [{"kind": "line", "label": "growth", "points": [[1, 2], [2, 4], [3, 8]]}],
            }
        ],
    }
    assert bars.png is not None and struct.unpack("!II", bars.png[16:24]) == (100, 100)
    assert bars.chart is not None
    (axes,) = bars.chart["axes"]
    assert axes["kind"] == "bar"
    assert axes["series"][0]["bars"] == [{"x": "a", "height": 3}, {"x": "b", "height": 5}]


async def test_a_warm_pool_of_the_image_has_its_interpreter_running(
    engine: Engine, runtime: str
) -> None:
    engine.configure_pool("code", SandboxSpec(runtime=runtime, image="code-interpreter"), 1)
    try:
        for _ in range(1200):  # the bound only catches hangs
            if next(p for p in engine.list_pools() if p["name"] == "code")["idle"] == 1:
                break
            await asyncio.sleep(0.05)
        spec = SandboxSpec(
            runtime=runtime, image="code-interpreter", env={"WHO": "claimer"}, workdir="/tmp"
        )
        info = await engine.create(spec)
        try:
            assert next(p for p in engine.list_pools() if p["name"] == "code")["hits"] == 1
            (context,) = await engine.interpreter.contexts(info.id)
            assert (context.id, context.running, context.execution_count) == ("python", True, 0)
            # The claim's env and workdir, not the pool's.
            done = await run_code(engine, info.id, "import os; os.environ['WHO'], os.getcwd()")
            assert done.text == "('claimer', '/tmp')"
            assert done.execution_count == 1
        finally:
            await engine.terminate(info.id)
    finally:
        engine.remove_pool("code")


async def test_javascript_contexts_where_the_image_has_node(
    engine: Engine, interpreter_sandbox: SandboxInfo
) -> None:
    sandbox_id = interpreter_sandbox.id
    first = await run_code(engine, sandbox_id, "let x = 41; console.log('set'); x", language="js")
    assert (first.logs.stdout, first.text, first.context) == (["set\n"], "41", "javascript")
    awaited = await run_code(
        engine,
        sandbox_id,
        "await new Promise(r => setTimeout(r, 10)); x + 1",
        language="javascript",
    )
    assert awaited.text == "42"
    data = await run_code(engine, sandbox_id, "({a: [1, 2]})", language="javascript")
    assert data.results[0].json == {"a": [1, 2]}
    failed = await run_code(engine, sandbox_id, "null.y", language="javascript")
    assert failed.error is not None and failed.error.name == "TypeError"
    assert "cell-" in failed.error.traceback and "node:" not in failed.error.traceback
    stopped = await run_code(
        engine, sandbox_id, "while (true) {}", language="javascript", timeout=1
    )
    assert stopped.timed_out and stopped.error is not None
    assert stopped.error.name == "TimeoutError"
    assert (await run_code(engine, sandbox_id, "x", language="javascript")).text == "41"


async def test_bash_contexts_keep_the_shell(engine: Engine, sandbox: SandboxInfo) -> None:
    await run_code(engine, sandbox.id, "x=5; greet() { echo hi $1; }; cd /tmp", language="bash")
    done = await run_code(engine, sandbox.id, "echo $x; greet you; pwd", language="bash")
    assert ("".join(done.logs.stdout), done.error) == ("5\nhi you\n/tmp\n", None)
    failed = await run_code(engine, sandbox.id, "echo before; false", language="bash")
    assert failed.error is not None and (failed.error.name, failed.error.value) == ("ExitCode", "1")
    per_call = await run_code(
        engine, sandbox.id, "echo [$ONLY]", language="bash", env={"ONLY": "1"}
    )
    assert per_call.logs.stdout == ["[1]\n"]
    after = await run_code(engine, sandbox.id, "echo [$ONLY]", language="bash")
    assert after.logs.stdout == ["[]\n"]
    stopped = await run_code(engine, sandbox.id, "sleep 60; echo never", language="bash", timeout=1)
    assert stopped.timed_out and stopped.error is not None and stopped.error.name == "TimeoutError"
    assert "never" not in "".join(stopped.logs.stdout)
    assert (await run_code(engine, sandbox.id, "echo $x", language="bash")).logs.stdout == ["5\n"]
    lost = await run_code(engine, sandbox.id, "exit 3", language="bash")
    assert lost.context_lost and lost.error is not None and lost.error.name == "ContextLost"
    # Node is not in the debian image: the sandbox says which languages it has.
    with pytest.raises(UnsupportedLanguage) as refused:
        await run_code(engine, sandbox.id, "1", language="javascript")
    assert "available: python, bash" in refused.value.message


async def test_code_that_runs_its_interpreter_out_of_memory_loses_the_context(
    engine: Engine, runtime: str
) -> None:
    info = await engine.create(SandboxSpec(runtime=runtime, memory_mb=256))
    try:
        await run_code(engine, info.id, "kept = 1")
        grown = await run_code(
            engine, info.id, "hog = bytearray(1 << 30); hog[::4096] = b'x' * (1 << 18)"
        )
        assert grown.context_lost and grown.error is not None
        assert grown.error.name == "ContextLost" and "memory" in grown.error.value
        assert (await run_code(engine, info.id, "'kept' in dir()")).text == "False"
        assert (await engine.run(info.id, "echo alive")).stdout == b"alive\n"  # the sandbox lives
    finally:
        await engine.terminate(info.id)


async def test_code_cannot_forge_what_the_agent_passes_on(
    engine: Engine, sandbox: SandboxInfo
) -> None:
    """The kernel's message channel is open to the code it runs: malformed messages written
    there are dropped or reshaped, never an API failure."""
    forged = (
        "import os, sys\n"
        'os.write(int(sys.argv[2]), b\'{"type": "result", "data": 5}\\n\'\n'
        '         b\'{"type": "too_big"}\\n[1, 2]\\nnot json\\n\'\n'
        '         b\'{"type": "error", "name": 1}\\n{"type": "nonsense"}\\n\')\n'
        "'still fine'"
    )
    done = await run_code(engine, sandbox.id, forged)
    assert done.text == "'still fine'" and [r.text for r in done.results] == ["'still fine'"]
    assert done.error is not None and (done.error.name, done.error.value) == ("1", "")
    assert (await run_code(engine, sandbox.id, "1 + 1")).text == "2"
