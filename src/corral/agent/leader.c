/* The first program of every command the guest agent starts (see procs.py): it makes itself a
 * child subreaper (what the command starts stays in its tree, see tree.py), takes its terminal
 * as the session's, becomes the command's user, and execs the command.
 *
 * Why a program and not Python's preexec_fn: a preexec_fn makes Python fork the whole agent,
 * and under gVisor a fork costs tens of milliseconds; without one, Python starts this small
 * static program with vfork, which costs a fraction of that.
 *
 * Usage: leader ERRFD TERMINAL UID GID GROUPS PATH ARGV0 ARGS...
 *   ERRFD     a pipe's writing end: on failure 8 bytes (step, errno) are written to it; it is
 *             closed by a successful exec, so the agent reading it learns which happened
 *   TERMINAL  1 to take standard input (a terminal) as the controlling terminal, else 0
 *   UID GID   the user and group to become, or -1 to stay
 *   GROUPS    the supplementary groups, comma-separated, or - to keep them
 *   PATH      the program, as the agent found it on the command's PATH
 *
 * Built by the host (corral.engine.datadir) with the host's C compiler, statically, so it runs
 * in any image. It is trusted like the agent and mounted read-only into the sandbox.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <unistd.h>

enum { SUBREAPER = 1, TERMINAL, GROUPS, GROUP, USER, EXEC, USAGE };
enum { MAX_GROUPS = 256 };

static void fail(int fd, int step) {
    int report[2] = {step, errno};
    ssize_t ignored = write(fd, report, sizeof report);
    (void)ignored;
    _exit(127);
}

static long number(const char *text, int fd) {
    char *end;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno != 0 || *text == '\0' || *end != '\0') {
        errno = EINVAL;
        fail(fd, USAGE);
    }
    return value;
}

int main(int argc, char **argv) {
    if (argc < 8) {
        _exit(127);
    }
    int fd = (int)number(argv[1], 2);
    if (fcntl(fd, F_SETFD, FD_CLOEXEC) != 0) {
        _exit(127);
    }
    if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0) {
        fail(fd, SUBREAPER);
    }
    if (number(argv[2], fd) == 1 && ioctl(0, TIOCSCTTY, 0) != 0) {
        fail(fd, TERMINAL);
    }
    long uid = number(argv[3], fd), gid = number(argv[4], fd);
    if (argv[5][0] != '-') {
        gid_t groups[MAX_GROUPS];
        size_t count = 0;
        for (char *item = argv[5]; *item != '\0';) {
            char *end;
            if (count == MAX_GROUPS) {
                errno = E2BIG;
                fail(fd, GROUPS);
            }
            errno = 0;
            groups[count++] = (gid_t)strtoul(item, &end, 10);
            if (errno != 0 || end == item || (*end != ',' && *end != '\0')) {
                errno = EINVAL;
                fail(fd, USAGE);
            }
            item = *end == ',' ? end + 1 : end;
        }
        if (setgroups(count, groups) != 0) {
            fail(fd, GROUPS);
        }
    }
    if (gid >= 0 && setresgid((gid_t)gid, (gid_t)gid, (gid_t)gid) != 0) {
        fail(fd, GROUP);
    }
    if (uid >= 0 && setresuid((uid_t)uid, (uid_t)uid, (uid_t)uid) != 0) {
        fail(fd, USER);
    }
    execv(argv[6], argv + 7);
    fail(fd, EXEC);
    return 127;
}
