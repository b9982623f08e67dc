/* How the engine starts runsc where it leaves processes running (`runsc create`, `runsc
 * restore --detach`): under this program, which becomes the parent of the sandbox's Sentry and
 * Gofer and reaps each of them the moment it exits.
 *
 * Why: runsc forks the sandbox's processes and exits, so the kernel hands them to the nearest
 * child subreaper above them, else to the host's pid 1. When the sandbox ends they stay
 * zombies until that process reaps them, and `runsc delete` waits for exactly that (it polls
 * the Sentry's pid every 100 ms). An init that reaps late made every gVisor terminate take 1.4
 * to 2 s (measured: the init of this project's VMs reaps orphans about every 1.6 s); one that
 * never reaps (a shell as a container's pid 1) would make `delete` give up.
 *
 * Usage: reaper STATUSFD PROGRAM ARGV0 ARGS...
 *   STATUSFD  a pipe's writing end. PROGRAM's pid is written to it as PROGRAM starts, then its
 *             wait status when it exits (each a native int), and it is closed. It ends early,
 *             and then holds fewer than two ints, if the reaper itself could not start.
 *   PROGRAM   what to run (runsc), an absolute path
 *
 * The process the engine starts forks and exits at once: the engine waits for nothing, and
 * nothing ties the sandbox to the engine's life. Its child is the reaper: a child subreaper
 * that starts PROGRAM, then reaps whatever exits under it until nothing is left, and exits.
 * Built by the engine (corral.engine.datadir) with the host's C compiler; it runs on the host
 * as root, started only by the engine.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

static void put(int fd, int value) {
    if (fd >= 0) {
        (void)!write(fd, &value, sizeof value);  /* a reader gone away is no reason to stop */
    }
}

int main(int argc, char **argv) {
    if (argc < 4) {
        dprintf(2, "usage: reaper STATUSFD PROGRAM ARGV0 ARGS...\n");
        return 2;
    }
    char *end;
    errno = 0;
    long number = strtol(argv[1], &end, 10);
    if (errno != 0 || end == argv[1] || *end != '\0' || number < 0 || number > INT_MAX) {
        dprintf(2, "reaper: STATUSFD must be a descriptor\n");
        return 2;
    }
    int status_fd = (int)number;
    if (fcntl(status_fd, F_SETFD, FD_CLOEXEC) != 0) {  /* PROGRAM must not hold it */
        return 126;
    }
    pid_t reaper = fork();
    if (reaper != 0) {
        return reaper < 0 ? 126 : 0;
    }
    if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0) {
        _exit(126);
    }
    pid_t program = fork();
    if (program < 0) {
        _exit(126);
    }
    if (program == 0) {
        execv(argv[2], argv + 3);
        _exit(127);
    }
    put(status_fd, (int)program);
    /* What the reaper keeps: no terminal, no log, no directory, and no SIGPIPE to die of
     * (set after the fork, as an ignored signal would stay ignored in PROGRAM). */
    signal(SIGPIPE, SIG_IGN);
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null >= 0) {
        dup2(null, 0);
        dup2(null, 1);
        dup2(null, 2);
    }
    if (chdir("/") != 0) {
        /* nothing depends on it */
    }
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, __WALL);
        if (pid < 0) {
            if (errno == EINTR) {
                continue;
            }
            return 0;  /* ECHILD: nothing left under it */
        }
        if (pid == program) {
            put(status_fd, status);
            close(status_fd);
            status_fd = -1;
        }
    }
}
