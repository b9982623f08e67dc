"""The `namespaces` runtime: bubblewrap, Linux namespaces, seccomp and cgroups.

Security model, layer by layer:

- **Unprivileged on the host.** bubblewrap runs as the sandbox's own host uid (a private range
  above 2,000,000,000, see `corral.host.userns`), inside a user namespace where that uid is root.
  Root in the sandbox can therefore do nothing on the host that an unknown user could not.
- **Namespaces.** Mount, pid, ipc, uts, cgroup and network namespaces are all new: the sandbox
  sees its own root filesystem, its own process tree and (unless `internet`) only a loopback.
- **Capabilities.** Root inside keeps only what package managers and `su` need within its own
  uid range (chown, dac_override, fowner, fsetid, kill, setuid, setgid, setpcap, setfcap,
  net_bind_service, sys_chroot); no CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_SYS_PTRACE.
- **seccomp.** `corral.host.seccomp` refuses mount, ptrace, namespace and kernel-loading calls.
- **cgroups.** Memory, pids and CPU limits, and the freezer for pause, applied before the first
  process of the sandbox runs.
- **Filesystem.** The root is an overlay built on the host; the writable layer is a quota disk.

No `--die-with-parent`, a session of its own, and stderr into a log file rather than a pipe
to the engine: a sandbox outlives the engine process that started it.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from corral.core.errors import SandboxFailed
from corral.host import mounts, network, seccomp, userns
from corral.host.cgroups import layout
from corral.runtimes.base import (
    SANDBOX_CAPS,
    Launch,
    Runtime,
    cgroup_for,
    create_cgroup,
    open_runtime_log,
    prepare_host,
    spawn,
)
from corral.runtimes.plan import Bind, MountOp, SandboxPlan, Tmpfs


class NamespacesRuntime(Runtime):
    """Sandboxes as bubblewrap process trees."""

    name = "namespaces"

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        # User namespaces made in `create`, handed to bubblewrap in `start`.
        self._userns: dict[str, int] = {}

    def unavailable_reason(self) -> str | None:
        if os.geteuid() != 0:
            return "the engine must run as root to set up sandboxes"
        for tool in ("bwrap", "unshare", "mkfs.ext4", "mount"):
            if shutil.which(tool) is None:
                return f"{tool} is not installed (run scripts/setup as root)"
        try:
            if int(Path("/proc/sys/user/max_user_namespaces").read_text()) == 0:
                return "user namespaces are disabled (user.max_user_namespaces = 0)"
        except (OSError, ValueError):
            return "this kernel has no user namespaces"
        if not layout():
            return "no usable cgroup hierarchy under /sys/fs/cgroup"
        try:
            seccomp.filter_program()
        except SandboxFailed as exc:
            return exc.message
        return None

    def build(self, plan: SandboxPlan) -> None:
        with userns.creating(plan.uid_slot) as userns_fd:
            lowers = prepare_host(plan, userns_fd, self.spares)
            self._userns[plan.sandbox_id] = os.dup(userns_fd())
        upper, work = plan.disk_dir / "upper", plan.disk_dir / "work"
        upper.mkdir(mode=0o755)
        work.mkdir(mode=0o700)
        uid = userns.host_uid(plan.uid_slot)
        os.chown(upper, uid, uid)  # so "/" belongs to root inside
        plan.rootfs.mkdir(exist_ok=True)
        try:
            mounts.overlay(lowers, upper, work, plan.rootfs)
        finally:
            # The overlay holds its own references to the layers; the staging mounts can go.
            mounts.unmount_all(lowers)
        create_cgroup(plan)

    def start(self, plan: SandboxPlan) -> Launch:
        fd = self._userns.pop(plan.sandbox_id, -1)
        if fd < 0:
            fd = userns.create(plan.uid_slot)
        program = seccomp.program_fd()
        log_fd = open_runtime_log(plan)
        try:
            argv = self.bwrap_argv(plan, userns_fd=fd, seccomp_fd=program)
            child = spawn(
                argv,
                cgroup=cgroup_for(plan),
                netns=network.netns_path(plan.sandbox_id)
                if plan.network.policy == "internet"
                else None,
                uid=userns.host_uid(plan.uid_slot),
                log_fd=log_fd,
                pass_fds=(fd, program),
                env=plan.guest_env,
                enter=plan.enter_program,
            )
        finally:
            os.close(fd)
            os.close(program)
            os.close(log_fd)
        return Launch(child.pid, child)

    def bwrap_argv(self, plan: SandboxPlan, *, userns_fd: int, seccomp_fd: int) -> list[str]:
        """The bubblewrap command line for `plan` (printable, for debugging)."""
        argv = ["bwrap", "--userns", str(userns_fd), "--uid", "0", "--gid", "0"]
        argv += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup"]
        # The agent is the sandbox's pid 1, as under gVisor: nothing inside can stop or kill
        # it (a pid namespace's init gets only the signals it handles), and it reaps orphans.
        argv.append("--as-pid-1")
        if plan.network.policy != "internet":
            argv.append("--unshare-net")  # its own loopback, nothing else
        argv += ["--hostname", plan.hostname, "--bind", str(plan.rootfs), "/"]
        for operation in plan.mounts():
            argv += _bwrap_mount(operation)
        argv += ["--chdir", "/", "--new-session", "--cap-drop", "ALL"]
        for cap in SANDBOX_CAPS:
            argv += ["--cap-add", cap]
        # The agent's environment is bubblewrap's own (`spawn`'s env), never on its command
        # line, which every local user can read.
        argv += ["--seccomp", str(seccomp_fd)]
        return [*argv, "--", *plan.agent_argv]

    def writable_layer(self, plan: SandboxPlan) -> Path | None:
        return plan.disk_dir / "upper"

    def pause(self, plan: SandboxPlan) -> None:
        cgroup_for(plan).freeze()

    def resume(self, plan: SandboxPlan) -> None:
        cgroup_for(plan).thaw()

    def destroy(self, plan: SandboxPlan) -> None:
        fd = self._userns.pop(plan.sandbox_id, -1)
        if fd >= 0:
            os.close(fd)
        cgroup = cgroup_for(plan)
        if cgroup.exists():
            cgroup.kill_all()
            deadline = time.monotonic() + 5
            while cgroup.pids() and time.monotonic() < deadline:
                time.sleep(0.005)
        network.destroy(plan.sandbox_id, plan.network.index, plan.host_scope)
        if cgroup.exists():
            cgroup.destroy()
        mounts.remove_tree(plan.dir)


def _bwrap_mount(operation: MountOp) -> list[str]:
    """One planned mount as bubblewrap arguments."""
    if isinstance(operation, Bind):
        return ["--ro-bind" if operation.readonly else "--bind", operation.source, operation.target]
    if isinstance(operation, Tmpfs):
        mode, size = f"{operation.mode:04o}", str(operation.size_bytes)
        return ["--perms", mode, "--size", size, "--tmpfs", operation.target]
    if operation.kind == "sys":
        # bubblewrap can only bind the host's own /sys, which would show the host's devices
        # and cgroups: sandboxes under this runtime get none.
        return []
    return [f"--{operation.kind}", operation.target]  # --proc, --dev
