/*
 * reconciler-supervise: the process manager of the reconciler's host images.
 *
 *   reconciler-supervise [-t STOP_S] [-d FIRST_MS] [-D MAX_MS] [-s STABLE_MS] SHELL SERVICEDIR
 *
 * Every directory SERVICEDIR/<name> holding a file `run` is a service, started
 * as `SHELL sh SERVICEDIR/<name>/run` in the current directory, with standard
 * input from /dev/null and its output (stdout and stderr) written to ours line
 * by line, each line prefixed with "<name>: ". SERVICEDIR/<name>/restart says
 * when it is started again after it exits: `always` (the default), `on-failure`
 * (unless it exited with status 0) or `never`.
 *
 * Restarts back off: the first comes FIRST_MS (1 s) after the exit, and each
 * further exit in a row doubles the delay up to MAX_MS (60 s); a run that lasted
 * STABLE_MS (10 s) or more starts the count again. A service that stays down
 * leaves the others running: the supervisor goes on until it is told to stop.
 *
 * SIGTERM, SIGINT and SIGHUP stop everything: each service's process group is
 * sent SIGTERM (and SIGCONT), then, after STOP_S seconds (10) or at a second
 * signal, SIGKILL; the supervisor exits 0 once none of its descendants is left
 * (or a few seconds after SIGKILL, should one be stuck in the kernel). It is a
 * child subreaper, so what services leave behind (even in a session of its
 * own) becomes its child, is reaped and, with /proc, stopped too. Its parent's
 * death counts as SIGTERM, and each service is killed if the supervisor is.
 *
 * Static, single-threaded, no stdio: it must keep working after the image it
 * runs from is gone (a killed AppImage runtime takes its FUSE mount along), so
 * it locks its pages in memory at start and reads nothing of the image while
 * stopping.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define NAME "reconciler-supervise"
#define LINE_MAX_LEN 4096 /* longer lines are cut into pieces of this size */
#define SWEEP_MS 100      /* while stopping: how often leftovers are looked for */
#define GIVE_UP_MS 3000   /* after SIGKILL: what still has not gone cannot be waited for */

enum policy { ALWAYS, ON_FAILURE, NEVER };
static const char *const policy_names[] = {"always", "on-failure", "never"};

struct service {
    char *name;
    char *run;
    enum policy policy;
    pid_t pid;          /* running process (and its process group), or 0 */
    int log_rd, log_wr; /* one pipe for all of the service's runs */
    char line[LINE_MAX_LEN];
    size_t len;
    int64_t started;    /* ms, monotonic */
    int64_t restart_at; /* ms, or -1 when no start is due */
    unsigned crashes;   /* exits in a row, each before STABLE_MS */
};

static struct service *services;
static size_t nservices;
static const char *shell;
static int64_t first_delay = 1000, max_delay = 60000, stable_after = 10000, stop_timeout = 10000;

/* ------------------------------------------------------------- output */

static void write_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return; /* a closed or broken output is not a reason to stop services */
        buf += n;
        len -= (size_t)n;
    }
}

/* say("a", "b", NULL): one line "reconciler-supervise: ab" on stderr, in one write. */
static void say(const char *first, ...) __attribute__((sentinel));
static void say(const char *first, ...) {
    char buf[1024];
    size_t len = 0;
    const char *parts[16];
    size_t n = 0;
    parts[n++] = NAME ": ";
    parts[n++] = first;
    va_list ap;
    va_start(ap, first);
    const char *p;
    while (n < 15 && (p = va_arg(ap, const char *)))
        parts[n++] = p;
    va_end(ap);
    parts[n++] = "\n";
    for (size_t i = 0; i < n; i++)
        for (const char *c = parts[i]; *c && len < sizeof buf - 1; c++)
            buf[len++] = *c;
    if (buf[len - 1] != '\n')
        buf[len++] = '\n';
    write_all(2, buf, len);
}

static const char *num(char *buf, size_t size, long long v) {
    char tmp[24];
    size_t n = 0;
    bool neg = v < 0;
    unsigned long long u = neg ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u && n < sizeof tmp);
    size_t i = 0;
    if (neg && i < size - 1)
        buf[i++] = '-';
    while (n > 0 && i < size - 1)
        buf[i++] = tmp[--n];
    buf[i] = '\0';
    return buf;
}

static _Noreturn void die(const char *what, const char *detail) {
    say(what, detail ? ": " : "", detail ? detail : "", NULL);
    _exit(111);
}

static void *xmalloc(size_t n) {
    void *p = malloc(n);
    if (!p)
        die("out of memory", NULL);
    return p;
}

static char *join(const char *a, const char *b, const char *c) {
    size_t la = strlen(a), lb = strlen(b), lc = strlen(c);
    char *s = xmalloc(la + lb + lc + 1);
    memcpy(s, a, la);
    memcpy(s + la, b, lb);
    memcpy(s + la + lb, c, lc + 1);
    return s;
}

/* Write the service's complete lines (all it has when flush) to stdout, prefixed. */
static void emit(struct service *s, bool flush) {
    size_t start = 0;
    for (;;) {
        char *nl = memchr(s->line + start, '\n', s->len - start);
        size_t end;
        if (nl)
            end = (size_t)(nl - s->line);
        else if (s->len - start == sizeof s->line || (flush && s->len > start))
            end = s->len;
        else
            break;
        char out[sizeof s->line + 256];
        size_t nlen = strlen(s->name);
        if (nlen > 200)
            nlen = 200;
        memcpy(out, s->name, nlen);
        memcpy(out + nlen, ": ", 2);
        memcpy(out + nlen + 2, s->line + start, end - start);
        out[nlen + 2 + end - start] = '\n';
        write_all(1, out, nlen + 3 + end - start);
        start = nl ? end + 1 : end;
    }
    memmove(s->line, s->line + start, s->len - start);
    s->len -= start;
}

/* Read what the service wrote so far (the pipe is non-blocking). */
static void drain(struct service *s) {
    for (;;) {
        ssize_t n = read(s->log_rd, s->line + s->len, sizeof s->line - s->len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        s->len += (size_t)n;
        emit(s, false);
    }
}

/* ------------------------------------------------------------- time */

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ------------------------------------------------------------- services */

static char *read_word(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    char buf[64];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n < 0)
        return NULL;
    buf[n] = '\0';
    size_t len = strcspn(buf, " \t\r\n");
    buf[len] = '\0';
    return join(buf, "", "");
}

static int by_name(const struct dirent **a, const struct dirent **b) {
    return strcmp((*a)->d_name, (*b)->d_name);
}

static void load_services(const char *dir) {
    struct dirent **list;
    int n = scandir(dir, &list, NULL, by_name);
    if (n < 0)
        die(dir, strerror(errno));
    services = xmalloc(sizeof *services * (size_t)(n > 0 ? n : 1));
    for (int i = 0; i < n; i++) {
        const char *name = list[i]->d_name;
        char *run = join(dir, "/", name);
        char *runfile = join(run, "/run", "");
        char *restartfile = join(run, "/restart", "");
        free(run);
        struct stat st;
        if (name[0] == '.' || stat(runfile, &st) < 0 || !S_ISREG(st.st_mode)) {
            free(runfile);
            free(restartfile);
            free(list[i]);
            continue;
        }
        struct service *s = &services[nservices];
        memset(s, 0, sizeof *s);
        s->name = join(name, "", "");
        s->run = runfile;
        s->restart_at = -1;
        char *word = read_word(restartfile);
        s->policy = ALWAYS;
        if (word && *word) {
            bool known = false;
            for (int p = 0; p < 3; p++)
                if (strcmp(word, policy_names[p]) == 0) {
                    s->policy = (enum policy)p;
                    known = true;
                }
            if (!known)
                die(restartfile, "not one of always, on-failure, never");
        }
        free(word);
        free(restartfile);
        int fds[2];
        if (pipe2(fds, O_CLOEXEC) < 0)
            die("pipe", strerror(errno));
        if (fcntl(fds[0], F_SETFL, O_NONBLOCK) < 0)
            die("fcntl", strerror(errno));
        s->log_rd = fds[0];
        s->log_wr = fds[1];
        nservices++;
        free(list[i]);
    }
    free(list);
}

static sigset_t handled;

static void start(struct service *s) {
    s->restart_at = -1;
    s->started = now_ms();
    pid_t self = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        say(s->name, ": cannot start (fork: ", strerror(errno), ")", NULL);
        s->restart_at = now_ms() + first_delay;
        return;
    }
    if (pid == 0) {
        /* Its own process group, so that a stop reaches what it started too;
           and killed with the supervisor, should that be killed. */
        setpgid(0, 0);
        if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0 || getppid() != self)
            _exit(127);
        /* No input (a closed one where a bare root has no /dev/null). */
        int null = open("/dev/null", O_RDONLY | O_CLOEXEC);
        if (null < 0 ? close(0) < 0 && errno != EBADF : dup2(null, 0) < 0)
            _exit(127);
        if (dup2(s->log_wr, 1) < 0 || dup2(s->log_wr, 2) < 0)
            _exit(127);
        signal(SIGPIPE, SIG_DFL);
        sigprocmask(SIG_UNBLOCK, &handled, NULL);
        char *argv[] = {"sh", s->run, NULL};
        execv(shell, argv);
        say("cannot execute ", shell, ": ", strerror(errno), NULL); /* into the log pipe */
        _exit(127);
    }
    setpgid(pid, pid); /* also here: whichever runs first, the group exists before it is signalled */
    s->pid = pid;
}

static void exited(struct service *s, int status, bool stopping) {
    s->pid = 0;
    drain(s); /* its last words before the news of its end */
    emit(s, true);
    char a[24];
    const char *how = WIFSIGNALED(status) ? "killed by signal " : "exited with status ";
    const char *code = num(a, sizeof a, WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
    if (stopping)
        return;
    bool failed = !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    if (s->policy == NEVER || (s->policy == ON_FAILURE && !failed)) {
        say(s->name, " ", how, code, "; not restarted (restart: ", policy_names[s->policy], ")", NULL);
        return;
    }
    int64_t now = now_ms();
    if (now - s->started >= stable_after)
        s->crashes = 0;
    int64_t delay = first_delay;
    for (unsigned i = 0; i < s->crashes && delay < max_delay; i++)
        delay *= 2;
    if (delay > max_delay)
        delay = max_delay;
    s->crashes++;
    s->restart_at = now + delay;
    char ms[24];
    say(s->name, " ", how, code, "; restarting in ", num(ms, sizeof ms, delay), " ms", NULL);
}

/* ------------------------------------------------------------- stopping */

/* Processes already sent SIGTERM: a second one could cut short the cleanup a
   first one started (a shell's trap), so each gets one. */
static pid_t *termed;
static size_t ntermed, captermed;

static bool first_term(pid_t pid) {
    for (size_t i = 0; i < ntermed; i++)
        if (termed[i] == pid)
            return false;
    if (ntermed == captermed) {
        captermed = captermed ? captermed * 2 : 32;
        pid_t *p = realloc(termed, captermed * sizeof *termed);
        if (!p)
            return true; /* then it may get TERM twice */
        termed = p;
    }
    termed[ntermed++] = pid;
    return true;
}

static void deliver(pid_t target, int sig) {
    kill(target, sig);
    if (sig == SIGTERM)
        kill(target, SIGCONT); /* a stopped process could not act on it */
}

/* Send sig to every process whose parent we are: services, and what they left
   behind (reparented to us, the subreaper). Best effort: it needs /proc. */
static void signal_children(int sig) {
    DIR *d = opendir("/proc");
    if (!d)
        return;
    pid_t self = getpid();
    struct dirent *e;
    while ((e = readdir(d))) {
        char *end;
        long pid = strtol(e->d_name, &end, 10);
        if (*end || pid <= 0)
            continue;
        char path[64] = "/proc/", buf[512];
        strcat(strcat(path, e->d_name), "/stat");
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            continue;
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n <= 0)
            continue;
        buf[n] = '\0';
        /* "pid (comm) state ppid ...": comm may hold anything, ")" included. */
        char *p = strrchr(buf, ')');
        if (!p || p[1] != ' ' || !p[2] || p[2] == 'Z' || p[3] != ' ')
            continue;
        if (strtol(p + 4, NULL, 10) != self)
            continue;
        if (sig != SIGTERM || first_term((pid_t)pid))
            deliver((pid_t)pid, sig);
    }
    closedir(d);
}

/* Whether any child of ours is left (exited ones not yet reaped count). */
static bool have_children(void) {
    siginfo_t info;
    memset(&info, 0, sizeof info);
    return waitid(P_ALL, 0, &info, WEXITED | WNOHANG | WNOWAIT) == 0;
}

/* Each running service's whole process group: what it started goes too. */
static void signal_groups(int sig) {
    for (size_t i = 0; i < nservices; i++) {
        pid_t pid = services[i].pid;
        if (pid <= 0)
            continue;
        if (sig == SIGTERM)
            first_term(pid);
        deliver(-pid, sig);
    }
}

/* ------------------------------------------------------------- main */

static int64_t parse_num(const char *s, const char *opt, int64_t scale) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < 0 || v > INT32_MAX)
        die(opt, "expects a non-negative whole number");
    return v * scale;
}

static _Noreturn void usage(void) {
    write_all(2,
              "usage: " NAME " [-t STOP_S] [-d FIRST_MS] [-D MAX_MS] [-s STABLE_MS] SHELL SERVICEDIR\n",
              sizeof "usage: " NAME " [-t STOP_S] [-d FIRST_MS] [-D MAX_MS] [-s STABLE_MS] SHELL SERVICEDIR\n" - 1);
    _exit(100);
}

int main(int argc, char **argv) {
    int opt;
    while ((opt = getopt(argc, argv, "t:d:D:s:")) != -1) {
        switch (opt) {
        case 't': stop_timeout = parse_num(optarg, "-t", 1000); break;
        case 'd': first_delay = parse_num(optarg, "-d", 1); break;
        case 'D': max_delay = parse_num(optarg, "-D", 1); break;
        case 's': stable_after = parse_num(optarg, "-s", 1); break;
        default: usage();
        }
    }
    if (argc - optind != 2)
        usage();
    if (first_delay < 1)
        first_delay = 1;
    if (max_delay < first_delay)
        max_delay = first_delay;
    shell = argv[optind];
    const char *dir = argv[optind + 1];

    /* Stop when whoever started us dies (the AppImage runtime sets this too).
       Not as a container's init (PID 1 of its namespace): whoever started it
       there (runc run --detach) exits at once by design. */
    if (getpid() != 1)
        prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (prctl(PR_SET_CHILD_SUBREAPER, 1) < 0)
        die("cannot become a subreaper", strerror(errno));
    /* Best effort: with the image unmounted, a page not yet read in could not
       be (SIGBUS). Some limits forbid it; the binary is small and usually read
       in whole at start anyway. */
    (void)mlockall(MCL_CURRENT);

    sigemptyset(&handled);
    sigaddset(&handled, SIGCHLD);
    sigaddset(&handled, SIGTERM);
    sigaddset(&handled, SIGINT);
    sigaddset(&handled, SIGHUP);
    if (sigprocmask(SIG_BLOCK, &handled, NULL) < 0)
        die("sigprocmask", strerror(errno));
    int sfd = signalfd(-1, &handled, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sfd < 0)
        die("signalfd", strerror(errno));
    signal(SIGPIPE, SIG_IGN);

    load_services(dir);
    if (nservices == 0)
        say("no service in ", dir, NULL);
    for (size_t i = 0; i < nservices; i++)
        start(&services[i]);

    struct pollfd *pfds = xmalloc(sizeof *pfds * (nservices + 1));
    bool stopping = false;
    int64_t kill_at = 0, give_up_at = 0;
    int kill_sig = SIGTERM;
    for (;;) {
        int64_t now = now_ms();
        int timeout = -1;
        if (stopping) {
            timeout = SWEEP_MS;
        } else {
            for (size_t i = 0; i < nservices; i++) {
                if (services[i].restart_at < 0)
                    continue;
                int64_t left = services[i].restart_at - now;
                if (left < 0)
                    left = 0;
                if (timeout < 0 || left < timeout)
                    timeout = (int)left;
            }
        }
        pfds[0] = (struct pollfd){sfd, POLLIN, 0};
        for (size_t i = 0; i < nservices; i++)
            pfds[i + 1] = (struct pollfd){services[i].log_rd, POLLIN, 0};
        int r = poll(pfds, nservices + 1, timeout);
        if (r < 0 && errno != EINTR)
            die("poll", strerror(errno));

        for (size_t i = 0; i < nservices; i++)
            if (r > 0 && (pfds[i + 1].revents & POLLIN))
                drain(&services[i]);

        struct signalfd_siginfo si;
        while (read(sfd, &si, sizeof si) == (ssize_t)sizeof si) {
            if (si.ssi_signo == SIGCHLD)
                continue; /* reaped below, whoever it was */
            if (stopping) {
                kill_at = 0; /* a second stop signal: no more waiting */
                continue;
            }
            char sn[24];
            say("stopping (signal ", num(sn, sizeof sn, si.ssi_signo), ")", NULL);
            stopping = true;
            kill_at = now_ms() + stop_timeout;
            signal_groups(SIGTERM);
            signal_children(SIGTERM);
        }

        for (;;) {
            int status;
            pid_t pid = waitpid(-1, &status, WNOHANG);
            if (pid < 0 && errno == EINTR)
                continue;
            if (pid <= 0)
                break;
            for (size_t i = 0; i < nservices; i++)
                if (services[i].pid == pid)
                    exited(&services[i], status, stopping);
        }

        if (stopping) {
            now = now_ms();
            if (kill_sig != SIGKILL && now >= kill_at && have_children()) {
                say("stop timeout reached; killing what is left", NULL);
                kill_sig = SIGKILL;
                give_up_at = now + GIVE_UP_MS;
            }
            if (kill_sig == SIGKILL)
                signal_groups(SIGKILL);
            /* Leftovers reparented to us since the last look get their TERM (or KILL). */
            signal_children(kill_sig);
            bool gave_up = kill_sig == SIGKILL && now >= give_up_at;
            if (!have_children() || gave_up) {
                if (gave_up)
                    say("some processes did not end; leaving them", NULL);
                for (size_t i = 0; i < nservices; i++) {
                    drain(&services[i]);
                    emit(&services[i], true);
                }
                return 0;
            }
            continue;
        }

        now = now_ms();
        for (size_t i = 0; i < nservices; i++)
            if (services[i].restart_at >= 0 && services[i].restart_at <= now)
                start(&services[i]);
    }
}
