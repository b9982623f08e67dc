/* How the engine starts a sandbox's runtime (bubblewrap, runsc): this program joins the
 * sandbox's cgroups, its network namespace and its host user, then execs the runtime, so not
 * even the runtime's first instruction runs outside the sandbox's limits (runtimes.base.spawn).
 *
 * Why a program and not Python's preexec_fn: a preexec_fn makes Python fork the whole engine,
 * and copying the page tables of an engine of 150 MiB took 7 to 10 ms of every start on the
 * development machine, more as the engine grows. Without one, Python starts this small
 * program with vfork (0.6 ms).
 *
 * Usage: enter ERRFD NETNS UID CGROUP-PROCS... -- PROGRAM ARGV0 ARGS...
 *   ERRFD         a pipe's writing end: on failure a line saying what failed is written to it;
 *                 the exec closes it, so the engine reading it to its end learns which happened
 *   NETNS         an open descriptor of the network namespace to join, or -1
 *   UID           the host uid (and gid) to become, with no supplementary groups, or -1
 *   CGROUP-PROCS  each cgroup's `cgroup.procs` file, which this process joins
 *   PROGRAM       the runtime, an absolute path
 *
 * Built by the engine (corral.engine.datadir) with the host's C compiler. It runs on the host
 * as root, started only by the engine.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern char **environ;

static int errfd = -1;

static void fail(const char *what, const char *detail) {
    dprintf(errfd, "cannot %s%s: %s\n", what, detail, strerror(errno));
    _exit(126);
}

static long number(const char *text) {
    char *end;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno != 0 || *text == '\0' || *end != '\0' || value < -1 || value > 0xfffffffeL) {
        errno = EINVAL;
        fail("read the arguments", "");
    }
    return value;
}

int main(int argc, char **argv) {
    if (argc < 7) {
        dprintf(2, "usage: enter ERRFD NETNS UID CGROUP-PROCS... -- PROGRAM ARGV0 ARGS...\n");
        return 2;
    }
    errfd = (int)number(argv[1]);
    if (fcntl(errfd, F_SETFD, FD_CLOEXEC) != 0) {  /* so the exec closes it */
        return 126;
    }
    long netns = number(argv[2]);
    long uid = number(argv[3]);
    int at = 4;
    for (; at < argc && strcmp(argv[at], "--") != 0; at++) {
        int procs = open(argv[at], O_WRONLY | O_CLOEXEC);
        if (procs < 0 || write(procs, "0", 1) != 1) {
            fail("join the cgroup ", argv[at]);
        }
        close(procs);
    }
    if (at + 2 >= argc) {
        errno = EINVAL;
        fail("read the arguments", "");
    }
    if (netns >= 0) {
        if (setns((int)netns, CLONE_NEWNET) != 0) {
            fail("join the network namespace", "");
        }
        close((int)netns);
    }
    if (uid >= 0) {
        if (setgroups(0, NULL) != 0) {
            fail("drop the groups", "");
        }
        if (setresgid((gid_t)uid, (gid_t)uid, (gid_t)uid) != 0) {
            fail("become the group", "");
        }
        if (setresuid((uid_t)uid, (uid_t)uid, (uid_t)uid) != 0) {
            fail("become the user", "");
        }
    }
    execve(argv[at + 1], argv + at + 2, environ);
    fail("run ", argv[at + 1]);
    return 126;
}
