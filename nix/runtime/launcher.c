/*
 * AppRun for the reconciler's host images: a tiny static launcher at the image
 * root. Scripts inside an AppImage cannot name an interpreter by absolute path,
 * so this runs the image's own busybox on the image's entry script:
 *
 *   <dir>/bin/busybox sh <dir>/.reconciler/apprun.sh ARGS...
 *
 * where <dir> is the directory holding this executable (realpath of
 * /proc/self/exe). APPDIR is set to <dir> unless already set (the AppImage
 * runtime sets it; the ACI manifest sets it to /).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char *join(const char *dir, const char *rel) {
    /* "/" + "bin/busybox" must not become "//bin/busybox". */
    size_t n = strlen(dir);
    while (n > 0 && dir[n - 1] == '/')
        n--;
    size_t len = n + 1 + strlen(rel) + 1;
    char *s = malloc(len);
    if (!s) {
        fputs("AppRun: out of memory\n", stderr);
        exit(127);
    }
    snprintf(s, len, "%.*s/%s", (int)n, dir, rel);
    return s;
}

int main(int argc, char **argv) {
    char *dir = realpath("/proc/self/exe", NULL);
    if (!dir) {
        fprintf(stderr, "AppRun: cannot find its own path (/proc/self/exe): %s\n", strerror(errno));
        return 127;
    }
    char *slash = strrchr(dir, '/');
    if (!slash) {
        fprintf(stderr, "AppRun: unexpected path of its own: %s\n", dir);
        return 127;
    }
    if (slash == dir)
        slash[1] = '\0'; /* the executable is /AppRun */
    else
        *slash = '\0';

    if (!getenv("APPDIR") && setenv("APPDIR", dir, 1) < 0) {
        fprintf(stderr, "AppRun: cannot set APPDIR: %s\n", strerror(errno));
        return 127;
    }
    char *busybox = join(dir, "bin/busybox");
    char *script = join(dir, ".reconciler/apprun.sh");

    char **args = malloc(sizeof *args * ((size_t)argc + 2));
    if (!args) {
        fputs("AppRun: out of memory\n", stderr);
        return 127;
    }
    size_t n = 0;
    args[n++] = "sh";
    args[n++] = script;
    for (int i = 1; i < argc; i++)
        args[n++] = argv[i];
    args[n] = NULL;

    execv(busybox, args);
    fprintf(stderr, "AppRun: cannot execute %s: %s\n", busybox, strerror(errno));
    return 127;
}
