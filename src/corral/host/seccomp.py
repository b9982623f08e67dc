"""The seccomp filter every namespaces sandbox runs under, compiled to BPF with libseccomp.

The filter allows by default and refuses, with EPERM, the system calls that let a process
escape or attack the kernel from inside a user namespace: tracing other processes, mounting,
creating or entering namespaces, loading code into the kernel (modules, BPF, kexec), the
keyring, userfaultfd (a favourite of kernel exploits) and io_uring. Sockets are an allow-list:
Unix, IPv4 and IPv6 only; every other address family (netlink, packet, vsock, AF_ALG, TIPC,
RDS... rarely used, often buggy, some reaching the hypervisor) answers EAFNOSUPPORT, as if the
kernel had none.
Docker's default profile and bubblewrap's own documentation are the references for the list.

libseccomp is loaded with ctypes from the system's libseccomp2 (present on every Debian and
Ubuntu), so no Python binding is needed and the filter is built for the machine's own
architecture. The compiled program is cached: building it takes ~15 ms.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os

from corral.core.errors import SandboxFailed

ACT_ALLOW = 0x7FFF0000


def _act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


CMP_EQ = 4
CMP_GE = 5
CMP_MASKED_EQ = 7

DENIED_SYSCALLS = (
    # tracing and reading other processes' memory
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    # filesystems and namespaces
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "unshare",
    "setns",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "open_by_handle_at",
    "name_to_handle_at",
    "quotactl",
    "quotactl_fd",
    "swapon",
    "swapoff",
    # code into the kernel
    "kexec_load",
    "kexec_file_load",
    "bpf",
    "init_module",
    "finit_module",
    "delete_module",
    "perf_event_open",
    "uselib",
    # kernel attack surface with a history of exploits
    "keyctl",
    "add_key",
    "request_key",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    # the host's clock, console and power
    "reboot",
    "acct",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "syslog",
    "vhangup",
    "iopl",
    "ioperm",
    "lookup_dcookie",
    "nfsservctl",
    "sysfs",
    "_sysctl",
)

AF_UNIX = 1
AF_INET = 2
AF_INET6 = 10
ALLOWED_SOCKET_FAMILIES = (AF_UNIX, AF_INET, AF_INET6)

# clone(2) flags that create namespaces; clone3 hides its flags in memory seccomp cannot read,
# so it answers ENOSYS and the C library falls back to clone(2), where the flags are checked.
CLONE_NAMESPACE_FLAGS = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
    0x00000080,  # CLONE_NEWTIME
)


class _ArgCmp(ctypes.Structure):
    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


def _libseccomp() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise SandboxFailed(
            "libseccomp is missing; install the libseccomp2 package (scripts/setup does)",
            code="missing_dependency",
        ) from exc
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = (ctypes.c_uint32,)
    lib.seccomp_release.argtypes = (ctypes.c_void_p,)
    lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
    lib.seccomp_rule_add_array.argtypes = (
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    )
    lib.seccomp_export_bpf.argtypes = (ctypes.c_void_p, ctypes.c_int)
    return lib


@functools.cache
def filter_program() -> bytes:
    """The compiled BPF program (struct sock_filter array) for this machine's architecture."""
    lib = _libseccomp()
    ctx = lib.seccomp_init(ACT_ALLOW)
    if not ctx:
        raise SandboxFailed("seccomp_init failed", code="seccomp_failed")
    try:

        def rule(name: str, action: int, *conds: tuple[int, int, int, int]) -> None:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number < 0:  # not a system call on this architecture
                return
            array = (_ArgCmp * max(1, len(conds)))(*[_ArgCmp(*c) for c in conds])
            rc = lib.seccomp_rule_add_array(ctx, action, number, len(conds), array)
            if rc < 0:
                raise SandboxFailed(
                    f"seccomp rule for {name} failed: {os.strerror(-rc)}", code="seccomp_failed"
                )

        eperm = _act_errno(errno.EPERM)
        for name in DENIED_SYSCALLS:
            rule(name, eperm)
        no_family = _act_errno(errno.EAFNOSUPPORT)
        highest = max(ALLOWED_SOCKET_FAMILIES)
        for call in ("socket", "socketpair"):
            # Every family below the highest allowed one that is not allowed, then all above
            # it (the comparison is unsigned: a negative family is above too).
            for family in set(range(highest)) - set(ALLOWED_SOCKET_FAMILIES):
                rule(call, no_family, (0, CMP_EQ, family, 0))
            rule(call, no_family, (0, CMP_GE, highest + 1, 0))
        for flag in CLONE_NAMESPACE_FLAGS:
            rule("clone", eperm, (0, CMP_MASKED_EQ, flag, flag))
        rule("clone3", _act_errno(errno.ENOSYS))

        fd = os.memfd_create("corral-seccomp-export", os.MFD_CLOEXEC)
        try:
            rc = lib.seccomp_export_bpf(ctx, fd)
            if rc < 0:
                raise SandboxFailed(
                    f"seccomp export failed: {os.strerror(-rc)}", code="seccomp_failed"
                )
            size = os.lseek(fd, 0, os.SEEK_CUR)
            return os.pread(fd, size, 0)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)


def program_fd() -> int:
    """A fresh file descriptor holding the BPF program, positioned at its start, for bwrap."""
    program = filter_program()
    fd = os.memfd_create("corral-seccomp", os.MFD_CLOEXEC)
    os.write(fd, program)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
