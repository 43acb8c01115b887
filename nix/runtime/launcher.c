/*
 * AppRun for the reconciler's host images: a tiny static launcher at the image
 * root. Scripts inside an AppImage cannot name an interpreter by absolute path,
 * so this runs the image's own busybox on the image's entry script:
 *
 *   <dir>/bin/busybox sh <dir>/.reconciler/apprun.sh ARGS...
 *
 * where <dir> is the directory holding this executable (realpath of
 * /proc/self/exe, or of argv[0] without /proc). APPDIR is set to <dir> unless already set (the AppImage
 * runtime sets it; the ACI manifest sets it to /).
 *
 * Linked statically against musl and without stdio, it stays a few kilobytes.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void say(const char *a, const char *b, const char *c, const char *d) {
    const char *parts[] = {"AppRun: ", a, b, c, d, "\n"};
    for (size_t i = 0; i < sizeof parts / sizeof *parts; i++) {
        size_t len = strlen(parts[i]);
        while (len > 0) {
            ssize_t n = write(2, parts[i], len);
            if (n <= 0)
                return;
            parts[i] += n;
            len -= (size_t)n;
        }
    }
}

static _Noreturn void fail(const char *a, const char *b, const char *c, const char *d) {
    say(a, b, c, d);
    _exit(127);
}

static char *join(const char *dir, const char *rel) {
    /* "/" + "bin/busybox" must not become "//bin/busybox". */
    size_t n = strlen(dir);
    while (n > 0 && dir[n - 1] == '/')
        n--;
    size_t len = strlen(rel);
    char *s = malloc(n + 1 + len + 1);
    if (!s)
        fail("out of memory", "", "", "");
    memcpy(s, dir, n);
    s[n] = '/';
    memcpy(s + n + 1, rel, len + 1);
    return s;
}

int main(int argc, char **argv) {
    char *dir = realpath("/proc/self/exe", NULL);
    /* A bare root (a chroot without /proc) still has the path it was run by. */
    if (!dir && argc > 0 && strchr(argv[0], '/'))
        dir = realpath(argv[0], NULL);
    if (!dir)
        fail("cannot find its own path (/proc/self/exe): ", strerror(errno), "", "");
    char *slash = strrchr(dir, '/');
    if (!slash)
        fail("unexpected path of its own: ", dir, "", "");
    if (slash == dir)
        slash[1] = '\0'; /* the executable is /AppRun */
    else
        *slash = '\0';

    if (!getenv("APPDIR") && setenv("APPDIR", dir, 1) < 0)
        fail("cannot set APPDIR: ", strerror(errno), "", "");
    char *busybox = join(dir, "bin/busybox");
    char *script = join(dir, ".reconciler/apprun.sh");

    char **args = malloc(sizeof *args * ((size_t)argc + 2));
    if (!args)
        fail("out of memory", "", "", "");
    size_t n = 0;
    args[n++] = "sh";
    args[n++] = script;
    for (int i = 1; i < argc; i++)
        args[n++] = argv[i];
    args[n] = NULL;

    execv(busybox, args);
    fail("cannot execute ", busybox, ": ", strerror(errno));
}
