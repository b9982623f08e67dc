/* The first program of every command the guest agent starts (see procs.py): it makes itself a
 * child subreaper (what the command starts stays in its tree, see tree.py), takes its terminal
 * as the session's, becomes the command's user, and execs the command.
 *
 * Why a program and not Python's preexec_fn: a preexec_fn makes Python fork the whole agent,
 * and under gVisor a fork costs tens of milliseconds; without one, Python starts this small
 * static program with vfork, which costs a fraction of that.
 *
 * Why without a C library: a statically linked C library reads /proc/self/exe as it starts,
 * and under gVisor (runsc 20240729, measured) once a process of a sandbox has looked up
 * /proc/self, every process started after it costs the Sentry about 90 KiB that it never gives
 * back. A checkpoint must then encode all of it: after 600 commands a snapshot took the Sentry
 * from 93 to 440 MiB, and the next one was killed at the sandbox's memory limit. So this
 * program makes its few system calls itself, and touches nothing but them.
 *
 * Usage: leader ERRFD[:KEEP] TERMINAL UID GID GROUPS PATH ARGV0 ARGS...
 *   ERRFD     a pipe's writing end: on failure 8 bytes (step, errno) are written to it; it is
 *             closed by a successful exec, so the agent reading it learns which happened
 *   KEEP      with the colon, every descriptor from 3 up is closed at the exec but these
 *             (ascending, comma-separated, maybe none): the agent starts the leader with
 *             posix_spawn, which closes only what is close-on-exec. Without it (agents before
 *             it, whose Python closed the rest), nothing more is closed
 *   TERMINAL  1 to take standard input (a terminal) as the controlling terminal, else 0
 *   UID GID   the user and group to become, or -1 to stay
 *   GROUPS    the supplementary groups, comma-separated, or - to keep them
 *   PATH      the program, as the agent found it on the command's PATH
 *
 * Built by the host (corral.engine.datadir) with the host's C compiler, statically and with
 * no C library (x86-64 and arm64), so it runs in any image. It is trusted like the agent and
 * mounted read-only into the sandbox.
 */
#include <asm/ioctls.h>
#include <asm/unistd.h>
#include <linux/errno.h>
#include <linux/fcntl.h>
#include <linux/prctl.h>

/* Linux 5.11's, where the headers are older (the same number on x86-64 and arm64) */
#ifndef __NR_close_range
#define __NR_close_range 436
#endif
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

enum { SUBREAPER = 1, TERMINAL, GROUPS, GROUP, USER, EXEC, USAGE, CLOSE };
enum { MAX_KEEP = 64 };
enum { MAX_GROUPS = 256 };

/* A system call: its result, or -errno. */
static long sys(long n, long a, long b, long c) {
#if defined(__x86_64__)
    long result;
    __asm__ volatile("syscall"
                     : "=a"(result)
                     : "a"(n), "D"(a), "S"(b), "d"(c)
                     : "rcx", "r11", "memory");
    return result;
#elif defined(__aarch64__)
    register long x8 __asm__("x8") = n;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    __asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2) : "memory");
    return x0;
#else
#error "leader.c knows the system calls of x86-64 and arm64 only"
#endif
}

/* The process starts here, with argc, argv and the environment on the stack (the program; the
 * library is entered at corral_spawn, at the end). */
#ifndef CORRAL_LIBRARY
#if defined(__x86_64__)
__asm__(".text\n.global _start\n_start:\n"
        "  xor %ebp, %ebp\n  mov %rsp, %rdi\n  and $-16, %rsp\n  call leader\n  hlt\n");
#elif defined(__aarch64__)
__asm__(".text\n.global _start\n_start:\n"
        "  mov x29, #0\n  mov x30, #0\n  mov x0, sp\n  bl leader\n  brk #0\n");
#endif
#endif

static __attribute__((noreturn)) void leave(int code) {
    for (;;) {
        sys(__NR_exit_group, code, 0, 0);
    }
}

static __attribute__((noreturn)) void fail(int fd, int step, long error) {
    int report[2];
    report[0] = step;
    report[1] = (int)-error;
    sys(__NR_write, fd, (long)report, sizeof report);
    leave(127);
}

/* A decimal number that fills all of `text`, or a failure (USAGE) reported on `fd`. */
static long number(const char *text, const char **end, int fd) {
    int negative = *text == '-';
    const char *at = text + negative;
    long value = 0;
    if (*at < '0' || *at > '9') {
        fail(fd, USAGE, -EINVAL);
    }
    for (; *at >= '0' && *at <= '9'; at++) {
        if (value > 0x7fffffffL) {
            fail(fd, USAGE, -EINVAL);
        }
        value = value * 10 + (*at - '0');
    }
    if (end != 0) {
        *end = at;
    } else if (*at != '\0') {
        fail(fd, USAGE, -EINVAL);
    }
    return negative ? -value : value;
}

/* The comma-separated numbers of `list`, none negative, into `out`: how many. More than `max`
 * is a failure at `step`. */
static long numbers(const char *list, long *out, long max, int step, int fd) {
    long count = 0;
    for (const char *item = list; *item != '\0';) {
        const char *end;
        if (count == max) {
            fail(fd, step, -E2BIG);
        }
        long value = number(item, &end, fd);
        if (value < 0 || (*end != ',' && *end != '\0')) {
            fail(fd, USAGE, -EINVAL);
        }
        out[count++] = value;
        item = *end == ',' ? end + 1 : end;
    }
    return count;
}

static void set_groups(const char *list, int fd) {
    long listed[MAX_GROUPS];
    unsigned int groups[MAX_GROUPS];
    long count = numbers(list, listed, MAX_GROUPS, GROUPS, fd);
    for (long i = 0; i < count; i++) {
        groups[i] = (unsigned int)listed[i];
    }
    long done = sys(__NR_setgroups, count, (long)groups, 0);
    if (done != 0) {
        fail(fd, GROUPS, done);
    }
}

/* One entry of getdents64's answer. */
struct entry {
    unsigned long long inode;
    long long next;
    unsigned short size;
    unsigned char type;
    char name[];
};

static int kept(long at, const long *keep, long count) {
    for (long i = 0; i < count; i++) {
        if (keep[i] == at) {
            return 1;
        }
    }
    return 0;
}

/* Close-on-exec, one by one, every descriptor from 3 up that /proc/self/fd lists but those in
 * `keep`: where close_range is refused (Linux before 5.11, a seccomp filter that does not
 * know it). Not under gVisor, whose close_range works (see the top of this file for why that
 * matters). */
static void by_listing(const long *keep, long count, int fd) {
    long dir = sys(__NR_openat, AT_FDCWD, (long)"/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir < 0) {
        fail(fd, CLOSE, dir);
    }
    char buffer[4096] __attribute__((aligned(8)));
    long got;
    while ((got = sys(__NR_getdents64, dir, (long)buffer, sizeof buffer)) > 0) {
        for (long at = 0; at < got;) {
            const struct entry *entry = (const struct entry *)(buffer + at);
            at += entry->size;
            if (entry->name[0] < '0' || entry->name[0] > '9') {
                continue; /* . and .. */
            }
            long listed = number(entry->name, 0, fd);
            if (listed >= 3 && listed != dir && !kept(listed, keep, count)) {
                sys(__NR_fcntl, listed, F_SETFD, FD_CLOEXEC);
            }
        }
    }
    if (got < 0) {
        fail(fd, CLOSE, got);
    }
    sys(__NR_close, dir, 0, 0);
}

/* Every descriptor from 3 up closed at the exec but those in `list` (see KEEP). */
static void keep_only(const char *list, int fd) {
    long keep[MAX_KEEP];
    long count = numbers(list, keep, MAX_KEEP, USAGE, fd);
    for (long i = 0; i < count; i++) {
        if (keep[i] < (i > 0 ? keep[i - 1] + 1 : 3)) {
            fail(fd, USAGE, -EINVAL); /* not ascending, or not a descriptor above 2 */
        }
    }
    long from = 3;
    for (long i = 0; i <= count; i++) {
        long to = i < count ? keep[i] - 1 : 0x7fffffffL; /* the largest (gVisor refuses ~0U) */
        if (to >= from && sys(__NR_close_range, from, to, CLOSE_RANGE_CLOEXEC) != 0) {
            by_listing(keep, count, fd);
            return;
        }
        from = to + 2;
    }
}

/* The steps, from ERRFD on: argv[0] is the leader's own name, and is not used. */
static __attribute__((noreturn)) void lead(long argc, char **argv, char **envp) {
    if (argc < 8) {
        leave(127);
    }
    const char *keep;
    int fd = (int)number(argv[1], &keep, 2);
    long done;
    if (sys(__NR_fcntl, fd, F_SETFD, FD_CLOEXEC) != 0 || (*keep != ':' && *keep != '\0')) {
        leave(127);
    }
    if (*keep == ':') {
        keep_only(keep + 1, fd);
    }
    if ((done = sys(__NR_prctl, PR_SET_CHILD_SUBREAPER, 1, 0)) != 0) {
        fail(fd, SUBREAPER, done);
    }
    if (number(argv[2], 0, fd) == 1 && (done = sys(__NR_ioctl, 0, TIOCSCTTY, 0)) != 0) {
        fail(fd, TERMINAL, done);
    }
    long uid = number(argv[3], 0, fd), gid = number(argv[4], 0, fd);
    if (argv[5][0] != '-') {
        set_groups(argv[5], fd);
    }
    if (gid >= 0 && (done = sys(__NR_setresgid, gid, gid, gid)) != 0) {
        fail(fd, GROUP, done);
    }
    if (uid >= 0 && (done = sys(__NR_setresuid, uid, uid, uid)) != 0) {
        fail(fd, USER, done);
    }
    done = sys(__NR_execve, (long)argv[6], (long)(argv + 7), (long)envp);
    fail(fd, EXEC, done);
}

#ifndef CORRAL_LIBRARY
__attribute__((used, noreturn)) void leader(long *stack) {
    long argc = stack[0];
    char **argv = (char **)(stack + 1);
    lead(argc, argv, argv + argc + 1);
}
#else
/* The library (leader-<hash>.so, see engine/datadir.py): the agent's Python calls
 * corral_spawn, which starts the command the way posix_spawn would start the program (a vfork:
 * the child shares the agent's memory until its exec, on a stack of its own), and then takes
 * the program's steps in that child, so the
 * command costs one exec instead of two. Under gVisor that is 6 to 10 ms of every command's
 * 20 to 30 (measured, see docs/performance.md). x86-64 only: elsewhere it is not built, and the
 * agent starts the program. The agent starts the program, too, for a command run as another
 * user: after its setresuid this child, still on the agent's memory, could be stopped by that
 * user's processes, and the agent, waiting for its exec, with it. */
#if !defined(__x86_64__)
#error "the leader library is for x86-64 only (the program serves elsewhere)"
#endif
#include <asm/signal.h>
#include <linux/sched.h>

enum { SESSION = 9, STDIO };

/* The kernel's struct sigaction on x86-64. */
struct action {
    unsigned long handler;
    unsigned long flags;
    unsigned long restorer;
    unsigned long mask;
};

struct start {
    long argc;
    char **argv;
    char **envp;
    const int *stdio;   /* descriptors for 0, 1 and 2; -1 for /dev/null */
    unsigned long mask; /* the agent's signal mask, the child's at its exec */
};

/* The child's stack, and what it is told: one spawn at a time, as the agent calls corral_spawn
 * holding Python's GIL (ctypes.PyDLL). The parent waits in clone until the child has exec'd or
 * exited, and the agent then reads ERRFD to its end before it can call again (procs._lead), so
 * neither is reused while a child may still be on them, even if that wait ended early; nor is
 * anything the child reads on a stack the parent may have returned from. */
static struct start start;
static char child_stack[262144] __attribute__((aligned(16))); /* untouched pages cost nothing */

static long sys4(long n, long a, long b, long c, long d) {
    long result;
    register long r10 __asm__("r10") = d;
    __asm__ volatile("syscall"
                     : "=a"(result)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10)
                     : "rcx", "r11", "memory");
    return result;
}

/* Signals: the command gets SIGPIPE and SIGXFSZ at their defaults (Python ignores them, as
 * posix_spawn's setsigdef undid), the agent's handlers reset by its exec, and the agent's mask,
 * which the parent blocked entirely around the clone (without that, four concurrent commands
 * hung the agent under gVisor; why is not known: gVisor's source ends a vfork wait only at the
 * child's exec or exit, or a SIGKILL). Unlike glibc's posix_spawn, the child does not reset
 * each handler before it unblocks (about 130 system calls, 1 to 3 ms of every command under
 * gVisor, measured): the agent's handlers are no-ops or a byte on its wakeup pipe
 * (shield.harden, aio), so one that runs in this child, on the agent's memory, only makes the
 * agent see a signal it was not sent, which whoever can signal this child (the agent's own
 * user) can cause by signalling the agent. */
static void default_signals(unsigned long mask) {
    struct action plain = {0, 0, 0, 0};
    sys4(__NR_rt_sigaction, SIGPIPE, (long)&plain, 0, 8);
    sys4(__NR_rt_sigaction, SIGXFSZ, (long)&plain, 0, 8);
    sys4(__NR_rt_sigprocmask, SIG_SETMASK, (long)&mask, 0, 8);
}

__attribute__((used, noreturn)) static void child(struct start *start) {
    const char *rest;
    int fd = (int)number(start->argv[1], &rest, 2);
    long done;
    default_signals(start->mask);
    if ((done = sys(__NR_setsid, 0, 0, 0)) < 0) {
        fail(fd, SESSION, done);
    }
    for (long target = 0; target < 3; target++) {
        long from = start->stdio[target];
        if (from < 0) {
            from = sys4(__NR_openat, AT_FDCWD, (long)"/dev/null", O_RDWR, 0);
            if (from < 0) {
                fail(fd, STDIO, from);
            }
        }
        if (from == target) {
            done = sys(__NR_fcntl, target, F_SETFD, 0);
        } else {
            done = sys(__NR_dup3, from, target, 0);
            if (start->stdio[target] < 0) {
                sys(__NR_close, from, 0, 0);
            }
        }
        if (done < 0) {
            fail(fd, STDIO, done);
        }
    }
    lead(start->argc, start->argv, start->envp);
}

/* Start the program of `argv` (the program's arguments, from ERRFD on: see the top) with `envp`
 * and `stdio` in a session of its own: its pid, or -errno where it could not be made. What
 * fails later is reported on ERRFD, as the program does. */
__attribute__((visibility("default"))) long corral_spawn(char **argv, char **envp, const int *stdio) {
    start.argc = 0;
    start.argv = argv;
    start.envp = envp;
    start.stdio = stdio;
    while (argv[start.argc] != 0) {
        start.argc++;
    }
    unsigned long all = ~0UL;
    sys4(__NR_rt_sigprocmask, SIG_SETMASK, (long)&all, (long)&start.mask, 8);
    long pid;
    register long r10 __asm__("r10") = 0;
    register long r8 __asm__("r8") = 0;
    register long r9 __asm__("r9") = (long)child;
    register long r12 __asm__("r12") = (long)&start;
    /* The child starts on its own stack, 16-byte aligned, and calls child(start); it never
     * returns. The parent goes on at 1 with the child's pid (or -errno) once the child has
     * exec'd or exited (CLONE_VFORK). */
    __asm__ volatile("syscall\n\t"
                     "test %%rax, %%rax\n\t"
                     "jnz 1f\n\t"
                     "mov %%r12, %%rdi\n\t"
                     "call *%%r9\n\t"
                     "hlt\n"
                     "1:"
                     : "=a"(pid)
                     : "a"(__NR_clone), "D"(CLONE_VM | CLONE_VFORK | SIGCHLD),
                       "S"(child_stack + sizeof child_stack), "d"(0), "r"(r10), "r"(r8), "r"(r9),
                       "r"(r12)
                     : "rcx", "r11", "memory");
    sys4(__NR_rt_sigprocmask, SIG_SETMASK, (long)&start.mask, 0, 8);
    return pid;
}
#endif
