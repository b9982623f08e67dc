"""Pause, hibernate and wake through the SDK: state kept exactly, lifetimes that stop, restarts."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import corral
from corral import Sandbox, SandboxState
from tests.conftest import require_runtime
from tests.e2e.conftest import SERVER_DIR, Server, start_server

# A process whose state lives in its memory (n), in an open file descriptor (never reopened)
# and in a listening socket: after a wake it must go on from where it was.
COUNTER = """
import socket, threading, time
out = open('/root/count', 'w')
server = socket.socket()
server.bind(('127.0.0.1', 7000))
server.listen()
def answer():
    while True:
        conn, _ = server.accept()
        conn.sendall(b'still listening')
        conn.close()
threading.Thread(target=answer, daemon=True).start()
n = 0
while True:
    n += 1
    out.seek(0)
    out.write('%09d' % n)
    out.flush()
    time.sleep(0.05)
"""
ASK = (
    "python3 -c \"import socket; s = socket.create_connection(('127.0.0.1', 7000)); "
    'print(s.recv(100).decode())"'
)


def count(sandbox: Sandbox) -> int:
    return int(sandbox.files.read_text("/root/count"))


def runsc_processes(sandbox_id: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            # The Sentry and the Gofer (runsc's own commands may still be tidying up).
            if cmdline.startswith((b"runsc-sandbox", b"runsc-gofer")) and (
                sandbox_id.encode() in cmdline
            ):
                found.append(proc.name)
    return found


@pytest.mark.parametrize("runtime", ["namespaces", "gvisor"])
def test_pause_stops_the_clock_and_any_use_resumes(client: corral.Client, runtime: str) -> None:
    require_runtime(runtime)
    with Sandbox.create(runtime=runtime, timeout=120, client=client) as sandbox:
        sandbox.exec("python3", "-c", COUNTER)
        time.sleep(0.5)
        paused = sandbox.pause()
        assert paused.state is SandboxState.PAUSED and paused.expires_at is None
        left = paused.timeout_remaining
        assert left is not None and 100 < left <= 120
        frozen = count(sandbox)  # reading a file resumes it (auto_resume)
        assert sandbox.info().state is SandboxState.RUNNING
        time.sleep(0.3)
        assert count(sandbox) > frozen
        info = sandbox.info()
        assert info.expires_at is not None and info.expires_at - time.time() > left - 5
        stopped = sandbox.pause().timeout_remaining
        time.sleep(1.5)
        assert sandbox.info().timeout_remaining == stopped  # the clock does not run
        assert sandbox.run("echo awake").stdout == "awake\n"  # exec resumes too
    with Sandbox.create(runtime=runtime, auto_resume=False, client=client) as manual:
        manual.pause()
        with pytest.raises(corral.InvalidState):
            manual.run("true")
        with pytest.raises(corral.InvalidState):
            manual.files.read_text("/etc/hostname")
        manual.resume()
        assert manual.run("echo ok").stdout == "ok\n"


def test_hibernate_keeps_memory_files_descriptors_and_listeners(client: corral.Client) -> None:
    require_runtime("gvisor")
    with Sandbox.create(
        runtime="gvisor", timeout=300, env={"STAGE": "before"}, workdir="/tmp", client=client
    ) as sandbox:
        sandbox.exec("python3", "-c", COUNTER)
        time.sleep(0.5)
        sandbox.files.write("/root/notes.txt", "written before")
        before = count(sandbox)
        slept = sandbox.hibernate()
        assert slept.state is SandboxState.HIBERNATED and slept.expires_at is None
        assert runsc_processes(sandbox.id) == []  # nothing runs: no memory, no CPU
        assert [h.state for h in slept.history][-1] is SandboxState.HIBERNATED
        time.sleep(1)
        woken = sandbox.wake()
        assert woken.state is SandboxState.RUNNING
        after = count(sandbox)
        assert before <= after < before + 20, (before, after)  # went on, did not restart
        time.sleep(0.3)
        assert count(sandbox) > after
        assert sandbox.run(ASK).stdout == "still listening\n"
        assert sandbox.run("pwd; echo $STAGE").stdout == "/tmp\nbefore\n"
        assert sandbox.files.read_text("/root/notes.txt") == "written before"
        # Any use of a hibernated sandbox wakes it.
        sandbox.hibernate()
        assert sandbox.run(ASK).stdout == "still listening\n"
        assert sandbox.info().state is SandboxState.RUNNING


def test_hibernate_is_refused_clearly_where_it_cannot_work(client: corral.Client) -> None:
    with Sandbox.create(runtime="namespaces", client=client) as sandbox:
        with pytest.raises(corral.InvalidRequest) as refused:
            sandbox.hibernate()
        assert refused.value.code == "not_supported" and "gvisor" in refused.value.message
        with pytest.raises(corral.InvalidState):
            sandbox.wake()
        assert sandbox.run("echo fine").stdout == "fine\n"
    require_runtime("gvisor")
    with Sandbox.create(runtime="gvisor", network="internet", client=client) as online:
        with pytest.raises(corral.InvalidRequest) as refused:
            online.hibernate()
        assert refused.value.code == "not_supported"
        assert online.run("echo fine").stdout == "fine\n"


@pytest.fixture
def own_server(data_dir: Path) -> Iterator[Server]:
    require_runtime("gvisor")
    running = start_server(SERVER_DIR.with_name(SERVER_DIR.name + "-sleep"), data_dir / "images")
    yield running
    running.stop_and_clean()


def test_a_hibernated_sandbox_wakes_after_a_server_sigkill(own_server: Server) -> None:
    with own_server.client() as sdk:
        sandbox = Sandbox.create(runtime="gvisor", timeout=300, client=sdk)
        sandbox.exec("python3", "-c", COUNTER)
        time.sleep(0.5)
        before = count(sandbox)
        left = sandbox.hibernate().timeout_remaining
    own_server.stop(signal.SIGKILL)
    time.sleep(1)
    own_server.start()
    with own_server.client() as sdk:
        info = Sandbox.connect(sandbox.id, client=sdk).info()  # connect wakes it
        assert info.state is SandboxState.RUNNING
        assert info.expires_at is not None and left is not None
        assert info.expires_at - time.time() == pytest.approx(left, abs=15)
        again = Sandbox.connect(sandbox.id, client=sdk)
        assert count(again) >= before
        assert again.run(ASK).stdout == "still listening\n"
        again.terminate()


def wait_for_state(sandbox: Sandbox, state: SandboxState, within: float = 30) -> corral.SandboxInfo:
    deadline = time.monotonic() + within
    while True:
        info = sandbox.info()
        if info.state is state:
            return info
        assert time.monotonic() < deadline, f"still {info.state}, expected {state}"
        time.sleep(0.2)


@pytest.mark.parametrize("runtime", ["namespaces", "gvisor"])
def test_idle_sandboxes_pause_or_end_and_streams_count_as_use(
    client: corral.Client, runtime: str
) -> None:
    require_runtime(runtime)
    with Sandbox.create(runtime=runtime, idle_timeout=2, client=client) as sandbox:
        # A client attached to a command's output is use, however long it lasts.
        assert sandbox.run("sleep 3; echo done").stdout == "done\n"
        assert sandbox.info().state is SandboxState.RUNNING
        paused = wait_for_state(sandbox, SandboxState.PAUSED)
        assert paused.history[-1].reason == "idle"
        assert sandbox.run("echo back").stdout == "back\n"  # any use resumes it
    with Sandbox.create(runtime=runtime, idle_timeout=1, keep_alive=True, client=client) as kept:
        time.sleep(2.5)
        assert kept.info().state is SandboxState.RUNNING
    ends = Sandbox.create(runtime=runtime, idle_timeout=1, on_idle="terminate", client=client)
    ended = wait_for_state(ends, SandboxState.TERMINATED)
    assert ended.end_reason is corral.EndReason.IDLE and "idle" in (ended.end_detail or "")


def test_idle_and_timeout_can_hibernate(client: corral.Client) -> None:
    require_runtime("gvisor")
    with Sandbox.create(
        runtime="gvisor", idle_timeout=1, on_idle="hibernate", client=client
    ) as sandbox:
        sandbox.files.write("/root/kept", "yes")
        slept = wait_for_state(sandbox, SandboxState.HIBERNATED)
        assert slept.history[-1].reason == "idle"
        assert sandbox.files.read_text("/root/kept") == "yes"  # use wakes it
    with Sandbox.create(runtime="gvisor", timeout=2, on_timeout="hibernate", client=client) as due:
        due.files.write("/root/kept", "still")
        slept = wait_for_state(due, SandboxState.HIBERNATED)
        assert slept.history[-1].reason == "timeout"
        assert slept.timeout_remaining == 2  # a fresh lifetime for when it wakes
        assert due.files.read_text("/root/kept") == "still"
        assert due.info().state is SandboxState.RUNNING


def test_lifecycle_options_are_checked(client: corral.Client) -> None:
    bad = [
        {"idle_timeout": 0},
        {"on_idle": "sleep"},
        {"on_timeout": "pause"},
        {"keep_alive": "yes"},
        {"runtime": "namespaces", "on_idle": "hibernate", "idle_timeout": 5},
    ]
    for options in bad:
        with pytest.raises(corral.InvalidRequest):
            Sandbox.create(client=client, **options)  # type: ignore[arg-type]


def test_events_stream_every_state_change_to_its_owner_only(server: Server) -> None:
    seen: list[dict[str, object]] = []
    others: list[str] = []

    def follow() -> None:
        with server.client() as sdk:
            for event in sdk.events():
                seen.append(event)
                if event.get("state") == "terminated":
                    return

    def overhear(key: str) -> None:  # another key's raw stream, until 3 s of silence
        headers = {"Authorization": f"Bearer {key}"}
        with (
            contextlib.suppress(httpx.ReadTimeout),
            httpx.stream("GET", f"{server.url}/v1/events", headers=headers, timeout=3) as response,
        ):
            others.extend(response.iter_lines())

    with server.client() as sdk:
        watcher = threading.Thread(target=follow, daemon=True)
        stranger = threading.Thread(target=overhear, args=(server.new_key("stranger"),))
        watcher.start()
        stranger.start()
        time.sleep(0.5)  # both are subscribed
        sandbox = Sandbox.create(runtime="namespaces", client=sdk)
        sandbox.pause()
        sandbox.resume()
        sandbox.terminate()
        watcher.join(timeout=30)
        stranger.join(timeout=30)
    mine = [(e["sandbox_id"], e["state"]) for e in seen]
    assert mine == [
        (sandbox.id, "running"),
        (sandbox.id, "paused"),
        (sandbox.id, "running"),
        (sandbox.id, "terminated"),
    ]
    assert seen[-1]["end_reason"] == "terminated_by_user"
    assert others[0] == ": connected" and not any(sandbox.id in line for line in others)
