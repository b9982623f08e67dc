"""What the shell would do with a command line, where the agent can do it without the shell:
a `cmd` of plain words is executed directly, as `bash -c` would exec it, without paying for a
shell's start (a few milliseconds; over ten under gVisor).

Standard library only, for any Python >= 3.8, like the rest of the agent.
"""

from __future__ import annotations

import os
import stat

TYPE_CHECKING = False  # `typing` is for annotations only: 2 ms of every agent's start (aio)
if TYPE_CHECKING:
    from typing import Dict, List, Optional

try:
    from corral.agent.fileops import GuestError
except ImportError:  # inside the sandbox the agent directory itself is on sys.path
    from fileops import GuestError  # type: ignore[import-not-found,no-redef]

# The characters of a word the shell takes as it is: nothing it would quote, expand, glob,
# redirect or split on. (Sets, not `re`: its import is memory every idle agent keeps.)
PLAIN = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_./:=@%+,-")
# What the shell runs itself, or reads as syntax: never run from outside it.
# (bash's `compgen -b` and `compgen -k`, as printed)
BASH_WORDS = (
    ". : [ [[ ]] { } ! alias bg bind break builtin caller case cd command compgen complete "
    "compopt continue coproc declare dirs disown do done echo elif else enable esac eval exec "
    "exit export false fc fg fi for function getopts hash help history if in jobs kill let "
    "local logout mapfile popd printf pushd pwd read readarray readonly return select set "
    "shift shopt source suspend test then time times trap true type typeset ulimit umask "
    "unalias unset until wait while"
)
SHELL_WORDS = frozenset(BASH_WORDS.split())
# Builtins whose program prints and exits the same, given only plain words and no options.
SAME_AS_PROGRAM = frozenset(("echo", "true", "false"))


def plain(cmd: str, env: Dict[str, str], cwd: str) -> Optional[List[str]]:
    """`cmd` as the argv the shell would exec, where the shell would do nothing but that: plain
    words separated by spaces, the first a program (not a builtin, keyword or assignment).
    `env` gets what the shell would add (PWD, SHLVL, _). None: the shell must run it."""
    words = [word for word in cmd.replace("\t", " ").split(" ") if word]  # blanks separate
    if not words or not PLAIN.issuperset("".join(words)) or "=" in words[0]:
        return None
    if any(name in ("BASH_ENV", "ENV") or name.startswith("BASH_FUNC_") for name in env):
        return None  # the shell would read a file first, or run a function of that name
    if words[0] in SHELL_WORDS and (
        words[0] not in SAME_AS_PROGRAM or any(w.startswith("-") for w in words[1:])
    ):
        return None
    try:
        program = find_program(words[0], env, cwd)
        path = os.path.join(cwd, program)
        if not os.path.isfile(path):  # a FIFO or device would block or answer anything
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            magic = os.read(fd, 4)
        finally:
            os.close(fd)
    except (GuestError, OSError):
        return None
    if magic[:2] != b"#!" and magic != b"\x7fELF":
        return None  # the shell would read the file as a script of its own
    inherited = env.get("PWD", "")
    if not (inherited.startswith("/") and _same_dir(inherited, cwd)):
        env["PWD"] = os.path.realpath(cwd)
    level = env.get("SHLVL", "")
    env["SHLVL"] = level if level.isdigit() else "0"
    env["_"] = program
    return words


def _same_dir(one: str, other: str) -> bool:
    try:
        return os.path.samefile(one, other)
    except OSError:
        return False


def refuse_what_is_not_a_file(name: str, cwd: str) -> None:
    """A command named by a path to something that is not a file (a FIFO: gVisor's exec opens
    it first and blocks, and the agent with it; a directory) is refused as exec refuses it."""
    if "/" not in name:
        return
    try:
        mode = os.stat(os.path.join(cwd, name)).st_mode
    except OSError:
        return  # exec says what is wrong with it
    if not stat.S_ISREG(mode):
        raise GuestError("EACCES", "permission denied: %s" % name)


def find_program(name: str, env: Dict[str, str], cwd: str) -> str:
    """The file `name` names as a command, searched on `env`'s PATH like exec does (as
    `os.get_exec_path`, which imports `warnings` on its first call: 0.5 ms of a sandbox's first
    command, and memory the agent keeps)."""
    if "/" in name:
        return name  # the leader runs in the command's cwd, where a relative name is meant
    search = env.get("PATH")
    for directory in (os.defpath if search is None else search).split(os.pathsep):
        path = os.path.join(cwd, directory, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise GuestError("command_not_found", "command not found: %s" % name)
