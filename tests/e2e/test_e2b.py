"""E2B's SDKs, unmodified (`e2b`, `e2b-code-interpreter`), against a real server: switched to
Corral by environment alone, each flow sync and async, and bad input answered in E2B's own
errors."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Iterator

import httpx
import pytest
from e2b import (
    AsyncSandbox,
    AuthenticationException,
    CommandExitException,
    FileNotFoundException,
    InvalidArgumentException,
    NotFoundException,
    PtySize,
    Sandbox,
    SandboxException,
    SandboxNotFoundException,
    SandboxQuery,
    SandboxState,
    TimeoutException,
)
from e2b_code_interpreter import AsyncSandbox as AsyncCodeSandbox
from e2b_code_interpreter import Sandbox as CodeSandbox
from e2b_code_interpreter.charts import BarChart, LineChart

import corral
from corral.server.e2b import wire
from tests.e2e.conftest import Server


@pytest.fixture(autouse=True)
def e2b_env(server: Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """What a user sets to point an E2B program at Corral, and nothing else."""
    monkeypatch.setenv("E2B_API_URL", server.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", server.url)
    monkeypatch.setenv("E2B_API_KEY", server.admin_key)
    yield


@pytest.fixture(scope="module")
def code_image(server: Server) -> None:
    """The code-interpreter image, built first as docs/e2b.md says: its first build takes
    longer than E2B's SDK waits for a request."""
    with server.client() as client:
        corral.Sandbox.create(image="code-interpreter", client=client).terminate()


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    made = Sandbox.create(timeout=300)
    try:
        yield made
    finally:
        made.kill()


def test_commands_as_an_e2b_program_runs_them(sandbox: Sandbox) -> None:
    seen: list[str] = []
    result = sandbox.commands.run(
        "echo hi $FOO; echo oops >&2", envs={"FOO": "bar"}, on_stdout=seen.append
    )
    assert (result.exit_code, result.stdout, result.stderr) == (0, "hi bar\n", "oops\n")
    assert seen == ["hi bar\n"]
    with pytest.raises(CommandExitException) as failed:
        sandbox.commands.run("echo no; exit 3")
    assert failed.value.exit_code == 3 and failed.value.stdout == "no\n"
    assert sandbox.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert sandbox.commands.run("id -un", user="root").stdout == "root\n"

    waiting = "until [ -e /tmp/go ]; do sleep 0.05; done; echo done"
    background = sandbox.commands.run(waiting, background=True)
    assert background.pid in [p.pid for p in sandbox.commands.list()]  # it runs until /tmp/go
    sandbox.files.write("/tmp/go", "")
    assert background.wait().stdout == "done\n"

    cat = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.send_stdin(cat.pid, "piped\n")
    sandbox.commands.close_stdin(cat.pid)
    assert cat.wait().stdout == "piped\n"

    sleeper = sandbox.commands.run("sleep 300", background=True)
    assert sandbox.commands.kill(sleeper.pid) is True
    with pytest.raises(CommandExitException):
        sleeper.wait()
    assert sandbox.commands.kill(sleeper.pid) is False


def test_a_command_outlives_its_stream_and_can_be_attached_again(sandbox: Sandbox) -> None:
    script = "for i in 1 2 3 4 5 6; do echo $i; sleep 0.5; done; touch /tmp/finished"
    handle = sandbox.commands.run(script, background=True)
    handle.disconnect()  # E2B's commands keep running without a client
    time.sleep(0.8)
    attached = sandbox.commands.connect(handle.pid)
    out = attached.wait().stdout.split()
    assert out and out[-1] == "6" and "1" not in out  # from now on, not from the start
    assert sandbox.files.exists("/tmp/finished")
    with pytest.raises(NotFoundException):
        sandbox.commands.connect(handle.pid)  # it ended


def test_a_command_past_its_timeout_is_stopped(sandbox: Sandbox) -> None:
    with pytest.raises(TimeoutException):
        sandbox.commands.run("sleep 30; touch /tmp/late", timeout=1)
    time.sleep(1.5)
    assert not sandbox.files.exists("/tmp/late")  # the deadline killed it, as envd's does


def test_files_as_an_e2b_program_uses_them(sandbox: Sandbox) -> None:
    files = sandbox.files
    info = files.write("/tmp/e2b/a.txt", "hello")
    assert (info.name, info.path) == ("a.txt", "/tmp/e2b/a.txt")
    assert files.read("/tmp/e2b/a.txt") == "hello"
    assert files.read("/tmp/e2b/a.txt", format="bytes") == bytearray(b"hello")
    files.write("/tmp/e2b/stream.bin", io.BytesIO(b"\x00\x01" * 50000))  # a raw body
    assert len(files.read("/tmp/e2b/stream.bin", format="bytes")) == 100000
    written = files.write_files(
        [{"path": "/tmp/e2b/m1", "data": "1"}, {"path": "/tmp/e2b/m2", "data": b"2"}]
    )
    assert [w.path for w in written] == ["/tmp/e2b/m1", "/tmp/e2b/m2"]
    files.write("relative.txt", "home")  # relative to the user's home
    assert files.read("/root/relative.txt") == "home"

    entries = {e.name: e for e in files.list("/tmp/e2b")}
    assert set(entries) == {"a.txt", "stream.bin", "m1", "m2"}
    assert entries["a.txt"].type.value == "file" and entries["a.txt"].size == 5
    assert files.exists("/tmp/e2b/m1") and not files.exists("/tmp/e2b/nope")
    assert files.make_dir("/tmp/e2b/sub/deeper") is True
    assert files.make_dir("/tmp/e2b/sub/deeper") is False
    assert files.get_info("/tmp/e2b/sub").type.value == "dir"
    assert [e.name for e in files.list("/tmp/e2b/sub", depth=2)] == ["deeper"]
    moved = files.rename("/tmp/e2b/m1", "/tmp/e2b/sub/m1")
    assert moved.path == "/tmp/e2b/sub/m1" and not files.exists("/tmp/e2b/m1")
    files.remove("/tmp/e2b/sub")
    assert not files.exists("/tmp/e2b/sub/m1")


def test_a_terminal(sandbox: Sandbox) -> None:
    seen: list[bytes] = []
    terminal = sandbox.pty.create(PtySize(rows=24, cols=80))
    # Resized once bash prompts: readline writes back the size it read as it prepares a prompt
    # (see test_exec's terminal test), which would undo a resize that came in between.
    for _stdout, _stderr, pty in terminal:
        seen.append(pty or b"")
        if b"# " in b"".join(seen) or b"$ " in b"".join(seen):
            break
    sandbox.pty.resize(terminal.pid, PtySize(rows=30, cols=100))
    sandbox.pty.send_stdin(terminal.pid, b"echo tty-$((6*7)); stty size; exit\n")
    terminal.wait(on_pty=seen.append)
    output = b"".join(seen)
    assert b"tty-42" in output and b"30 100" in output


def test_lifecycle_timeout_info_list_pause_and_kill() -> None:
    marker = f"run-{time.time_ns()}"
    first = Sandbox.create(metadata={"suite": marker, "n": "1"}, timeout=120)
    second = Sandbox.create(template="base", metadata={"suite": marker, "n": "2"})
    try:
        info = first.get_info()
        assert (info.template_id, info.state, info.metadata) == (
            "base",
            SandboxState.RUNNING,
            {"suite": marker, "n": "1"},
        )
        first.set_timeout(600)
        assert (first.get_info().end_at - info.started_at).total_seconds() > 500
        assert first.is_running()

        mine = SandboxQuery(metadata={"suite": marker})
        assert {s.sandbox_id for s in Sandbox.list(query=mine).next_items()} == {
            first.sandbox_id,
            second.sandbox_id,
        }
        one = SandboxQuery(metadata={"suite": marker, "n": "2"})
        assert [s.sandbox_id for s in Sandbox.list(query=one).next_items()] == [second.sandbox_id]
        pages = Sandbox.list(query=mine, limit=1)
        seen = [s.sandbox_id for s in pages.next_items()]
        assert pages.has_next
        seen += [s.sandbox_id for s in pages.next_items()]
        assert sorted(seen) == sorted([first.sandbox_id, second.sandbox_id])

        assert first.pause() is True and first.pause() is False  # already paused
        assert not first.is_running()
        paused = SandboxQuery(metadata={"suite": marker}, state=[SandboxState.PAUSED])
        assert [s.sandbox_id for s in Sandbox.list(query=paused).next_items()] == [first.sandbox_id]
        again = Sandbox.connect(first.sandbox_id)  # resumes it
        assert again.commands.run("echo back").stdout == "back\n"
        assert first.get_info().state == SandboxState.RUNNING

        first.pause()
        assert first.commands.run("echo auto").stdout == "auto\n"  # any use resumes it
    finally:
        assert first.kill() is True
        second.kill()
    assert first.kill() is False and not first.is_running()
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(first.sandbox_id)


def test_auto_resume_can_be_turned_off() -> None:
    sandbox = Sandbox.create(lifecycle={"on_timeout": "pause", "auto_resume": False})
    try:
        assert sandbox.get_info().lifecycle == {"auto_resume": False, "on_timeout": "pause"}
        sandbox.pause()
        with pytest.raises(SandboxException, match="paused"):
            sandbox.commands.run("true")
        Sandbox.connect(sandbox.sandbox_id)
        assert sandbox.commands.run("echo up").stdout == "up\n"
    finally:
        sandbox.kill()


def test_the_async_sdk() -> None:
    async def flow() -> None:
        sandbox = await AsyncSandbox.create(envs={"WHO": "async"})
        try:
            seen: list[str] = []
            result = await sandbox.commands.run("echo $WHO", on_stdout=seen.append)
            assert result.stdout == "async\n" and seen == ["async\n"]
            handle = await sandbox.commands.run("sleep 0.3; echo later", background=True)
            assert (await handle.wait()).stdout == "later\n"
            await sandbox.files.write("/tmp/async.txt", "data")
            assert await sandbox.files.read("/tmp/async.txt") == "data"
            assert [e.name for e in await sandbox.files.list("/tmp") if e.name == "async.txt"]
            with pytest.raises(FileNotFoundException):
                await sandbox.files.read("/tmp/none")
            assert await sandbox.pause() is True
            await AsyncSandbox.connect(sandbox.sandbox_id)
            assert await sandbox.is_running()
        finally:
            await sandbox.kill()
        assert not await sandbox.is_running()

    asyncio.run(flow())


@pytest.mark.usefixtures("code_image")
def test_the_code_interpreter() -> None:
    sandbox = CodeSandbox.create()
    try:
        printed: list[str] = []
        execution = sandbox.run_code(
            "x = 41\nprint('hey')\nx + 1", on_stdout=lambda m: printed.append(m.line)
        )
        assert (
            execution.text == "42" and execution.logs.stdout == ["hey\n"] and printed == ["hey\n"]
        )
        assert execution.execution_count >= 1
        error = sandbox.run_code("1/0").error
        assert error is not None and error.name == "ZeroDivisionError" and "1/0" in error.traceback

        plot = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.title('t')\nplt.show()"
        figure = sandbox.run_code(plot).results[0]
        assert figure.png and isinstance(figure.chart, LineChart) and figure.chart.title == "t"
        assert figure.chart.elements[0].points == [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)]
        bars = sandbox.run_code(
            "import matplotlib.pyplot as plt\nplt.bar(['a', 'b'], [3, 4])\nplt.show()"
        )
        assert isinstance(bars.results[0].chart, BarChart)
        frame = sandbox.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2]})").results[0]
        assert frame.html and frame.data

        context = sandbox.create_code_context(cwd="/tmp")
        assert context.cwd == "/tmp" and context.id in [c.id for c in sandbox.list_code_contexts()]
        sandbox.run_code("y = 5", context=context)
        assert sandbox.run_code("y", context=context).text == "5"
        assert sandbox.run_code("y").error is not None  # another context
        sandbox.restart_code_context(context)
        assert sandbox.run_code("y", context=context).error.name == "NameError"
        sandbox.remove_code_context(context)
        assert context.id not in [c.id for c in sandbox.list_code_contexts()]
        assert sandbox.run_code("1 + 2", language="js").text == "3"
    finally:
        sandbox.kill()


@pytest.mark.usefixtures("code_image")
def test_the_async_code_interpreter() -> None:
    async def flow() -> None:
        sandbox = await AsyncCodeSandbox.create()
        try:
            assert (await sandbox.run_code("2 * 21")).text == "42"
        finally:
            await sandbox.kill()

    asyncio.run(flow())


def test_bad_input_gets_e2b_errors(server: Server, sandbox: Sandbox) -> None:
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect("sb-0000000000000000")
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect("not-an-id")
    assert Sandbox.kill("sb-0000000000000000") is False
    with pytest.raises(AuthenticationException):
        Sandbox.create(api_key="not-a-key")
    with pytest.raises(SandboxException, match="404: no image 'no-such-template'"):
        Sandbox.create(template="no-such-template")
    with pytest.raises(SandboxException, match="400: timeout"):
        Sandbox.create(timeout=10**9)
    for call in (
        lambda: sandbox.files.read("/nope"),
        lambda: sandbox.files.list("/nope"),
        lambda: sandbox.files.remove("/nope"),
        lambda: sandbox.files.rename("/nope", "/tmp/x"),
        lambda: sandbox.files.get_info("/nope"),
    ):
        with pytest.raises(FileNotFoundException):
            call()
    with pytest.raises(InvalidArgumentException, match="nosuchuser"):
        sandbox.commands.run("id", user="nosuchuser")
    with pytest.raises(InvalidArgumentException, match="/nope"):
        sandbox.commands.run("pwd", cwd="/nope")
    with pytest.raises(NotFoundException):
        sandbox.commands.send_stdin(424242, "x")

    api = {"X-API-KEY": server.admin_key}
    bad_json = httpx.post(f"{server.url}/v2/sandboxes", content=b"{", headers=api)
    assert (
        bad_json.status_code == 400
        and bad_json.json()["message"] == "the request message is not JSON"
    )
    wrong_type = httpx.post(
        f"{server.url}/v2/sandboxes", json={"templateID": "base", "timeout": "x"}, headers=api
    )
    assert wrong_type.status_code == 400 and "timeout" in wrong_type.json()["message"]
    unknown = httpx.get(f"{server.url}/sandboxes/{sandbox.sandbox_id}/metrics", headers=api)
    assert unknown.status_code == 404 and unknown.json()["code"] == 404
    bad_state = httpx.get(f"{server.url}/v2/sandboxes?state=bogus", headers=api)
    assert bad_state.status_code == 400


def test_a_sandbox_answers_only_its_own_token_and_key(server: Server, sandbox: Sandbox) -> None:
    envd = {"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": "49983"}
    stat = f"{server.url}/filesystem.Filesystem/Stat"
    missing = httpx.post(stat, json={"path": "/"}, headers=envd)
    assert missing.status_code == 401 and missing.json()["code"] == "unauthenticated"
    other = Sandbox.create()
    try:
        # One sandbox's token does not open another.
        stolen = {**envd, "X-Access-Token": other._envd_access_token or ""}
        assert httpx.post(stat, json={"path": "/"}, headers=stolen).status_code == 401
        code = {**stolen, "E2b-Sandbox-Port": "49999"}
        assert httpx.get(f"{server.url}/contexts", headers=code).status_code == 401
    finally:
        other.kill()
    theirs = server.new_key("e2b-other")
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(sandbox.sandbox_id, api_key=theirs)
    assert Sandbox.kill(sandbox.sandbox_id, api_key=theirs) is False
    assert Sandbox.list(api_key=theirs).next_items() == []
    token = {**envd, "X-Access-Token": sandbox._envd_access_token or ""}
    wrong_type = httpx.post(stat, json={"path": 5}, headers=token)
    assert wrong_type.status_code == 400 and wrong_type.json() == {
        "code": "invalid_argument",
        "message": "path is required",
    }
    start = httpx.post(
        f"{server.url}/process.Process/Start",
        content=wire.envelope({"process": {"cmd": 5}}),
        headers={**token, "Content-Type": "application/connect+json"},
    )
    assert start.status_code == 200 and start.content[0] == wire.END_STREAM
    assert json.loads(start.content[5:])["error"]["code"] == "invalid_argument"
    unknown_rpc = httpx.post(
        f"{server.url}/process.Process/Nope",
        json={},
        headers={**envd, "X-Access-Token": sandbox._envd_access_token or ""},
    )
    assert unknown_rpc.status_code == 501 and unknown_rpc.json()["code"] == "unimplemented"


def test_a_killed_sandbox_is_not_running_for_each_surface() -> None:
    sandbox = Sandbox.create()
    code = CodeSandbox.connect(sandbox.sandbox_id)
    sandbox.kill()
    assert not sandbox.is_running()
    with pytest.raises(SandboxException):
        sandbox.commands.run("true")
    with pytest.raises(SandboxException):
        sandbox.files.read("/etc/hostname")
    with pytest.raises(SandboxException):
        code.run_code("1")
