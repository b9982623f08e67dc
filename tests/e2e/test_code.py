"""The code interpreter through the server: the SDK (sync and async), the streamed HTTP API,
the CLI, and contexts that outlive pause, hibernation, snapshots and forks."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import corral
from corral import AsyncSandbox, Sandbox
from tests.conftest import require_runtime
from tests.e2e.conftest import Server

CORRAL = [sys.executable, "-m", "corral"]


def cli(server: Server, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CORRAL_URL": server.url, "CORRAL_API_KEY": server.admin_key}
    return subprocess.run(
        [*CORRAL, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


@pytest.mark.parametrize("runtime", ["namespaces", "gvisor"])
def test_run_code_keeps_state_and_streams_to_callbacks(client: corral.Client, runtime: str) -> None:
    require_runtime(runtime)
    seen: list[tuple[str, object]] = []
    with Sandbox.create(runtime=runtime, client=client) as sandbox:
        assert sandbox.run_code("x = 6").error is None
        done = sandbox.run_code(
            "print('start')\ndisplay(x)\nraise ValueError(f'x is {x}')",
            on_stdout=lambda text: seen.append(("stdout", text)),
            on_result=lambda result: seen.append(("result", result.text)),
            on_error=lambda error: seen.append(("error", error.name)),
        )
        assert seen == [("stdout", "start\n"), ("result", "6"), ("error", "ValueError")]
        assert done.error is not None and done.error.value == "x is 6"
        assert sandbox.run_code("x * 7").text == "42"
        contexts = sandbox.list_code_contexts()
        assert [(c.id, c.language, c.execution_count) for c in contexts] == [
            ("python", "python", 3)
        ]


async def test_the_async_twin_and_its_async_callbacks(server: Server) -> None:
    async with corral.AsyncClient(url=server.url, api_key=server.admin_key) as client:
        sandbox = await AsyncSandbox.create(runtime="namespaces", client=client)
        try:
            printed: list[str] = []

            async def keep(text: str) -> None:
                printed.append(text)

            context = await sandbox.create_code_context(cwd="/tmp")
            done = await sandbox.run_code(
                "import os\nprint(os.getcwd())\n2 ** 10", context=context, on_stdout=keep
            )
            assert (printed, done.text, done.context) == (["/tmp\n"], "1024", context.id)
            assert (await sandbox.restart_code_context(context)).restarts == 1
            await sandbox.remove_code_context(context.id)
            with pytest.raises(corral.ContextNotFound):
                await sandbox.run_code("1", context=context)
        finally:
            await sandbox.terminate()


def test_bad_requests_are_clear_http_errors(server: Server, client: corral.Client) -> None:
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    with Sandbox.create(runtime="namespaces", client=client) as sandbox:
        base = f"{server.url}/v1/sandboxes/{sandbox.id}/code"
        cases = [
            ({"code": "1", "language": "cobol"}, 422, "unsupported_language", "available: python"),
            ({"code": "1", "context": "nope"}, 404, "context_not_found", "nope"),
            ({"code": "1", "context": "../x"}, 400, "invalid_context", "code context id"),
            ({"code": "1", "timeout": 0}, 400, "invalid_request", "timeout"),
            ({"code": "1", "bogus": 1}, 400, "invalid_request", "bogus"),
            ({"code": "a\0b"}, 400, "invalid_request", "NUL"),
        ]
        for body, status, code, says in cases:
            answer = httpx.post(base, json=body, headers=headers, timeout=60)
            assert answer.status_code == status, (body, answer.text)
            error = answer.json()["error"]
            assert error["code"] == code and says in error["message"], (body, error)
        made = httpx.post(f"{base}/contexts", json={"language": "js"}, headers=headers, timeout=60)
        assert made.status_code == 422 and made.json()["error"]["code"] == "unsupported_language"
        with pytest.raises(corral.UnsupportedLanguage):
            sandbox.run_code("1", "ruby")
        # Nothing was lost: the default context still works, and runs once.
        assert sandbox.run_code("'fine'").execution_count == 1


def test_a_client_that_hangs_up_interrupts_the_code(server: Server, client: corral.Client) -> None:
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    with Sandbox.create(runtime="namespaces", client=client) as sandbox:
        sandbox.run_code("state = 'kept'")
        url = f"{server.url}/v1/sandboxes/{sandbox.id}/code"
        body = {"code": "import time\ntime.sleep(120)"}
        with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as response:
            first = json.loads(next(response.iter_lines()))
            assert first == {"type": "started", "context": "python"}
        start = time.monotonic()
        assert sandbox.run_code("state").text == "'kept'"  # not queued behind the sleep
        assert time.monotonic() - start < 60


def test_run_code_and_repl_from_the_cli(
    server: Server, client: corral.Client, tmp_path: Path
) -> None:
    with Sandbox.create(runtime="namespaces", client=client) as sandbox:
        script = tmp_path / "cell.py"
        script.write_text(
            "import sys\ntotal = sum(range(10))\nprint('to stderr', file=sys.stderr)\ntotal"
        )
        done = cli(server, "run-code", sandbox.id, str(script))
        assert (done.returncode, done.stdout) == (0, "45\n"), done.stderr
        assert "to stderr" in done.stderr
        piped = cli(server, "run-code", sandbox.id, "-", "--json", stdin="total * 2")
        assert json.loads(piped.stdout)["results"][0]["data"]["text/plain"] == "90"
        failed = cli(server, "run-code", sandbox.id, "-", stdin="1/0")
        assert failed.returncode == 1 and "ZeroDivisionError" in failed.stderr
        missing = cli(server, "run-code", sandbox.id, str(tmp_path / "nope.py"))
        assert missing.returncode == 2 and "invalid_source" in missing.stderr
        session = cli(
            server,
            "repl",
            sandbox.id,
            stdin="y = total + 1\nfor i in range(2):\n    print(i)\n\ny\n",
        )
        assert session.returncode == 0, session.stderr
        assert session.stdout == "0\n1\n46\n"


def test_contexts_survive_pause_and_resume(client: corral.Client) -> None:
    with Sandbox.create(runtime="namespaces", client=client) as sandbox:
        sandbox.run_code("kept = [1, 2, 3]")
        sandbox.pause()
        sandbox.resume()
        assert sandbox.run_code("sum(kept)").text == "6"


def test_contexts_survive_hibernation_snapshots_and_forks(client: corral.Client) -> None:
    require_runtime("gvisor")
    with Sandbox.create(runtime="gvisor", timeout=300, client=client) as sandbox:
        other = sandbox.create_code_context()
        sandbox.run_code("kept = 'before'")
        sandbox.run_code("mine = 7", context=other)
        sandbox.hibernate()
        sandbox.wake()
        assert sandbox.run_code("kept").text == "'before'"
        assert sandbox.run_code("mine", context=other).text == "7"
        snapshot = sandbox.snapshot()
        (fork,) = sandbox.fork(1)
        with fork:
            fork.run_code("kept = 'fork'")
            assert fork.run_code("kept").text == "'fork'"
            assert fork.run_code("mine", context=other.id).text == "7"
        assert sandbox.run_code("kept").text == "'before'"
        with Sandbox.create(snapshot=snapshot.id, client=client) as restored:
            assert restored.run_code("kept + '!'").text == "'before!'"


async def test_the_code_websocket_closes_when_its_sandbox_ends(server: Server) -> None:
    """Idle or running code, a socket on a sandbox that ends says why and closes (4410), as
    exec's does; it does not stay open on nothing."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    async with corral.AsyncClient(url=server.url, api_key=server.admin_key) as client:
        sandbox = await AsyncSandbox.create(runtime="namespaces", client=client)
        url = f"ws://127.0.0.1:{server.port}/v1/sandboxes/{sandbox.id}/code/stream"
        headers = {"Authorization": f"Bearer {server.admin_key}"}
        async with (
            connect(url, additional_headers=headers) as busy,
            connect(url, additional_headers=headers) as idle,
        ):
            await busy.send(json.dumps({"id": 1, "code": "import time\ntime.sleep(60)"}))
            assert json.loads(await busy.recv())["type"] == "started"
            await sandbox.terminate()
            told = []
            with pytest.raises(ConnectionClosed):
                while True:
                    told.append(json.loads(await asyncio.wait_for(busy.recv(), 30)))
            *before, last = told
            assert any(e.get("id") == 1 and e["type"] in ("failed", "end") for e in before), told
            assert (last["type"], last["error"]["code"]) == ("error", "sandbox_ended"), told
            assert busy.close_code == 4410
            ended = json.loads(await asyncio.wait_for(idle.recv(), 30))
            assert (ended["type"], ended["status"]) == ("error", 410)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(idle.recv(), 30)
            assert idle.close_code == 4410
        # A socket opened on the ended sandbox closes at once.
        async with connect(url, additional_headers=headers) as late:
            assert json.loads(await asyncio.wait_for(late.recv(), 30))["status"] == 410


async def test_the_code_websocket_runs_many_executions_and_refuses_bad_ones(
    server: Server,
) -> None:
    from websockets.asyncio.client import connect

    async with corral.AsyncClient(url=server.url, api_key=server.admin_key) as client:
        sandbox = await AsyncSandbox.create(runtime="namespaces", client=client)
        try:
            other = await sandbox.create_code_context()
            # One socket, overlapping executions in two contexts.
            slow, fast = await asyncio.gather(
                sandbox.run_code("import time; time.sleep(1); 'slow'"),
                sandbox.run_code("'fast'", context=other),
            )
            assert (slow.text, fast.text) == ("'slow'", "'fast'")
            url = f"ws://127.0.0.1:{server.port}/v1/sandboxes/{sandbox.id}/code/stream"
            headers = {"Authorization": f"Bearer {server.admin_key}"}
            async with connect(url, additional_headers=headers) as ws:
                for message, status, code in [
                    ("not json", 400, "invalid_request"),
                    (json.dumps({"id": 1}), 400, "invalid_request"),
                    (
                        json.dumps({"id": 2, "code": "1", "language": "cobol"}),
                        422,
                        "unsupported_language",
                    ),
                    (
                        json.dumps({"id": 3, "code": "1", "context": "nope"}),
                        404,
                        "context_not_found",
                    ),
                ]:
                    await ws.send(message)
                    answer = json.loads(await ws.recv())
                    assert (answer["type"], answer["status"], answer["error"]["code"]) == (
                        "failed",
                        status,
                        code,
                    ), answer
                await ws.send(json.dumps({"id": 4, "code": "import time\ntime.sleep(60)"}))
                assert json.loads(await ws.recv())["type"] == "started"
                await ws.send(json.dumps({"type": "cancel", "id": 4}))
                await ws.send(json.dumps({"id": 5, "code": "'after'"}))
                events = [json.loads(await ws.recv()) for _ in range(3)]
                assert [(e["id"], e["type"]) for e in events] == [
                    (5, "started"),
                    (5, "result"),
                    (5, "end"),
                ]
        finally:
            await sandbox.terminate()
