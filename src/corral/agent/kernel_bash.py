"""A code interpreter's kernel for Bash: one interactive bash per code context, driven here.

It speaks the same JSON lines as `kernel` (see there). Every cell runs in the same shell, so
variables, functions, the working directory and exported variables last across cells. The
shell is interactive (without a terminal or line editing) for one reason: an interrupt then
ends the running cell and returns to the shell, as Ctrl-C does at a prompt, where a script
would exit. A cell's commands read /dev/null, never the channel. A cell that ends with a
non-zero status is an execution error, `ExitCode`, whose value is the status.

Standard library only, any Python 3.8+.

Usage: python3 kernel_bash.py CONTROL_IN_FD CONTROL_OUT_FD
"""

from __future__ import annotations

import codecs
import os
import secrets
import selectors
import signal
import subprocess
import sys
from typing import Any, Dict, List, Optional

try:
    from corral.agent.kernel import Channel
except ImportError:  # inside the sandbox the agent directory itself is on sys.path
    from kernel import Channel  # type: ignore[import-not-found,no-redef]

SHELL = ["bash", "--noprofile", "--norc", "--noediting", "-i"]
CHUNK = 65536


class Shell:
    """The bash, its output pipes, and the descriptor it reports each cell's status on."""

    def __init__(self) -> None:
        status_r, status_w = os.pipe()
        env = dict(os.environ, PS1="", PS2="", PS0="", HISTFILE="/dev/null", TERM="dumb")
        self.process = subprocess.Popen(
            SHELL,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(status_w,),
            env=env,
            start_new_session=True,  # its own process group: an interrupt reaches what it runs
        )
        os.close(status_w)
        self.status = status_r
        self.interrupted = False
        self.write(
            "set +H +o history; PS1=''; PS2=''; PROMPT_COMMAND=''\n"
            "__corral_status() { printf '%%s\\n' \"$1\" >&%d; }\n"
            "__corral_status ready\n" % status_w
        )

    def write(self, text: str) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        stdin.write(text.encode())
        stdin.flush()

    def interrupt(self, _signum: int, _frame: Any) -> None:
        self.interrupted = True
        try:
            os.killpg(self.process.pid, signal.SIGINT)
        except OSError:
            pass

    def run(self, code: str, forward: Any) -> Optional[str]:
        """Run `code`, passing its output to `forward(name, text)`; its status, or None if
        the shell is gone."""
        end = "CORRAL_%s" % secrets.token_hex(8)
        self.write(
            "eval \"$(cat <<'%s'\n%s\n%s\n)\" </dev/null\n__corral_status $?\n" % (end, code, end)
        )
        return self.follow(forward)

    def follow(self, forward: Any) -> Optional[str]:
        """Pass output on until the shell reports a status (the first is `ready`)."""
        pipes = {self.process.stdout: "stdout", self.process.stderr: "stderr"}
        decoders = {
            name: codecs.getincrementaldecoder("utf-8")("replace") for name in pipes.values()
        }
        selector = selectors.DefaultSelector()
        for pipe in pipes:
            selector.register(pipe, selectors.EVENT_READ)  # type: ignore[arg-type]
        selector.register(self.status, selectors.EVENT_READ)
        status = b""
        try:
            while not status.endswith(b"\n"):
                for key, _events in selector.select():
                    fd = key.fd
                    data = os.read(fd, CHUNK)
                    if fd == self.status:
                        if not data:
                            return None
                        status += data
                    elif data:
                        name = pipes[key.fileobj]  # type: ignore[index]
                        forward(name, decoders[name].decode(data))
                    else:
                        selector.unregister(key.fileobj)
            for pipe, name in pipes.items():  # what the cell wrote just before it ended
                self.drain(pipe, name, decoders[name], forward)
        finally:
            selector.close()
        return status.decode().strip()

    @staticmethod
    def drain(pipe: Any, name: str, decoder: Any, forward: Any) -> None:
        os.set_blocking(pipe.fileno(), False)
        try:
            while True:
                data = os.read(pipe.fileno(), CHUNK)
                if not data:
                    return
                forward(name, decoder.decode(data))
        except BlockingIOError:
            return
        finally:
            os.set_blocking(pipe.fileno(), True)


def _exports(env: Dict[str, str]) -> str:
    return "".join("export %s=%s\n" % (name, _quote(value)) for name, value in env.items())


def _quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def main() -> None:
    if len(sys.argv) != 3:
        sys.stderr.write("usage: kernel_bash.py CONTROL_IN_FD CONTROL_OUT_FD\n")
        sys.exit(2)
    channel = Channel(int(sys.argv[1]), int(sys.argv[2]))
    shell = Shell()
    signal.signal(signal.SIGINT, shell.interrupt)
    if shell.follow(lambda _name, _text: None) is None:  # bash's notes on job control: dropped
        sys.exit(1)
    channel.send({"type": "ready"})
    count = 0
    while True:
        request = channel.receive()
        if request is None:
            return
        count += 1
        setup = request.get("setup") or {}
        env = {str(k): str(v) for k, v in (request.get("env") or {}).items() if _name_ok(k)}
        prologue: List[str] = [
            _exports({str(k): str(v) for k, v in (setup.get("env") or {}).items() if _name_ok(k)})
        ]
        if setup.get("cwd"):
            prologue.append("cd %s 2>/dev/null\n" % _quote(str(setup["cwd"])))
        if env:  # for this cell only: saved, set, and put back after it
            prologue.append("__corral_saved=$(declare -px %s 2>/dev/null)\n" % " ".join(env))
            prologue.append(_exports(env))
        shell.write("".join(prologue))
        shell.interrupted = False
        status = shell.run(str(request.get("code", "")), channel.print)
        if status is None:
            return  # the shell exited (the cell ran `exit`): the agent reports the context lost
        if env:
            shell.write('unset %s; eval "$__corral_saved"; unset __corral_saved\n' % " ".join(env))
        if status != "0":
            name = "KeyboardInterrupt" if shell.interrupted else "ExitCode"
            channel.send({"type": "error", "name": name, "value": status, "traceback": ""})
        channel.send({"type": "done", "execution_count": count})


def _name_ok(name: Any) -> bool:
    text = str(name)
    return (
        bool(text)
        and (text[0].isalpha() or text[0] == "_")
        and all(c.isalnum() or c == "_" for c in text)
    )


if __name__ == "__main__":
    main()
