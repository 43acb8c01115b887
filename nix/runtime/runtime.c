/*
 * AppImage type 2 runtime for the reconciler's host images.
 *
 * The file is this static ELF executable followed directly by a squashfs image
 * (the payload). Run without --appimage-* options, the runtime mounts the payload
 * read-only with FUSE (squashfuse's low-level operations, served by a forked
 * child) or, when FUSE cannot be used or APPIMAGE_EXTRACT_AND_RUN=1, extracts it
 * to a private temporary directory; then it runs $APPDIR/AppRun in a child,
 * forwards SIGTERM, SIGINT and SIGHUP to it, and cleans up after it.
 *
 * Written for this project; the behaviour (options, environment, magic bytes,
 * reserved ELF sections, payload offset) follows the official type 2 runtime.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* squashfuse's installed config.h defines _POSIX_C_SOURCE itself; every system
   header is already in, so dropping ours only avoids a redefinition warning. */
#undef _POSIX_C_SOURCE
#include <squashfuse/ll.h>

#define RUNTIME_VERSION "1.0"

/* Sections reserved for AppImage tooling, with the names and sizes the official
   runtime has: appimagetool writes update information, libappimage's MD5 digest
   (.digest_md5), the signature and its key into them in the file; here the
   publisher does, after the build (reconciler/adapters/appimage.py). They must be
   PROGBITS (present in the file), hence initialised. */
__attribute__((section(".upd_info"), used)) char appimage_update_information[1024] = {0};
__attribute__((section(".sha256_sig"), used)) char appimage_signature[1024] = {0};
__attribute__((section(".sig_key"), used)) char appimage_signature_key[8192] = {0};
__attribute__((section(".digest_md5"), used)) char appimage_digest_md5[16] = {0};

#if UINTPTR_MAX > 0xffffffffu
typedef Elf64_Ehdr Ehdr;
typedef Elf64_Shdr Shdr;
#define NATIVE_ELFCLASS ELFCLASS64
#else
typedef Elf32_Ehdr Ehdr;
typedef Elf32_Shdr Shdr;
#define NATIVE_ELFCLASS ELFCLASS32
#endif
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define NATIVE_ELFDATA ELFDATA2LSB
#else
#define NATIVE_ELFDATA ELFDATA2MSB
#endif

#define FUSE_MOUNT_TIMEOUT_MS 30000 /* how long the FUSE child may take to mount */
#define KILL_GRACE_MS 5000          /* SIGTERM to leftover processes, then SIGKILL */
#define FUSE_STOP_TIMEOUT_MS 5000   /* FUSE child unmounting, then SIGKILL */
#define REAP_TIMEOUT_MS 2000        /* helpers (fusermount3) exiting at the end */

/* ---------------------------------------------------------------- helpers */

static void vwarnx(const char *fmt, va_list ap) {
    fputs("appimage: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
}

static void warnx(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void warnx(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vwarnx(fmt, ap);
    va_end(ap);
}

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vwarnx(fmt, ap);
    va_end(ap);
    exit(1);
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p)
        die("out of memory");
    return p;
}

static char *xstrdup(const char *s) {
    char *p = strdup(s);
    if (!p)
        die("out of memory");
    return p;
}

static char *xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *xasprintf(const char *fmt, ...) {
    va_list ap;
    char *s;
    va_start(ap, fmt);
    int n = vasprintf(&s, fmt, ap);
    va_end(ap);
    if (n < 0)
        die("out of memory");
    return s;
}

static int pread_full(int fd, void *buf, size_t len, off_t off) {
    char *p = buf;
    while (len > 0) {
        ssize_t n = pread(fd, p, len, off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        if (n == 0) {
            errno = EIO; /* the file is shorter than its headers say */
            return -1;
        }
        p += n;
        len -= (size_t)n;
        off += n;
    }
    return 0;
}

static int write_full(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Copy src into dst[size], cut short if needed (for messages). */
static void copy_text(char *dst, size_t size, const char *src) {
    size_t n = strnlen(src, size - 1);
    memcpy(dst, src, n);
    dst[n] = '\0';
}

/* readlink(2) into a buffer that grows as needed. */
static char *read_link(const char *path) {
    for (size_t cap = 256;; cap *= 2) {
        char *buf = xmalloc(cap);
        ssize_t n = readlink(path, buf, cap);
        if (n < 0) {
            free(buf);
            return NULL;
        }
        if ((size_t)n < cap) {
            buf[n] = '\0';
            return buf;
        }
        free(buf);
    }
}

static int64_t now_ms(void) {
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) < 0)
        die("clock_gettime: %s", strerror(errno));
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Signals the runtime waits for while it runs AppRun: they stay blocked from
   the start and are taken with sigtimedwait(), so none is lost or races. */
static sigset_t handled_signals(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    return set;
}

/* Wait up to timeout_ms for one of the blocked signals; returns it, or 0. */
static int wait_signal(int timeout_ms, siginfo_t *info) {
    sigset_t set = handled_signals();
    struct timespec ts = {timeout_ms / 1000, (long)(timeout_ms % 1000) * 1000000L};
    int sig = timeout_ms < 0 ? sigwaitinfo(&set, info) : sigtimedwait(&set, info, &ts);
    if (sig < 0) {
        if (errno == EAGAIN || errno == EINTR)
            return 0;
        die("sigtimedwait: %s", strerror(errno));
    }
    return sig;
}

/* A stop signal (TERM, INT, HUP) that arrived while it was blocked, or 0. */
static int pending_stop_signal(void) {
    sigset_t pending;
    if (sigpending(&pending) < 0)
        die("sigpending: %s", strerror(errno));
    const int sigs[] = {SIGTERM, SIGINT, SIGHUP};
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
        if (sigismember(&pending, sigs[i]) == 1)
            return sigs[i];
    return 0;
}

/* -------------------------------------------------------- payload offset */

/* The payload starts where the ELF file ends: after the section header table
   (e_shoff + e_shnum * e_shentsize), or after the last section should one lie
   beyond it. With nothing appended, this is the size of the runtime file. */
static int elf_payload_offset(int fd, off_t *offset, char *why, size_t whylen) {
    Ehdr eh;
    struct stat st;
    if (fstat(fd, &st) < 0) {
        snprintf(why, whylen, "cannot stat: %s", strerror(errno));
        return -1;
    }
    if (pread_full(fd, &eh, sizeof eh, 0) < 0) {
        snprintf(why, whylen, "cannot read the ELF header: %s", strerror(errno));
        return -1;
    }
    if (memcmp(eh.e_ident, ELFMAG, SELFMAG) != 0 || eh.e_ident[EI_CLASS] != NATIVE_ELFCLASS ||
        eh.e_ident[EI_DATA] != NATIVE_ELFDATA) {
        snprintf(why, whylen, "not an ELF file of this machine's class and byte order");
        return -1;
    }
    if (eh.e_shnum == 0 || eh.e_shentsize != sizeof(Shdr)) {
        snprintf(why, whylen, "unexpected ELF section header table (%u entries of %u bytes)",
                 (unsigned)eh.e_shnum, (unsigned)eh.e_shentsize);
        return -1;
    }
    uint64_t end = (uint64_t)eh.e_shoff + (uint64_t)eh.e_shnum * eh.e_shentsize;
    for (unsigned i = 0; i < eh.e_shnum; i++) {
        Shdr sh;
        if (pread_full(fd, &sh, sizeof sh, (off_t)(eh.e_shoff + (uint64_t)i * eh.e_shentsize)) < 0) {
            snprintf(why, whylen, "cannot read ELF section header %u: %s", i, strerror(errno));
            return -1;
        }
        if (sh.sh_type != SHT_NOBITS && (uint64_t)sh.sh_offset + sh.sh_size > end)
            end = (uint64_t)sh.sh_offset + sh.sh_size;
    }
    if (end > (uint64_t)st.st_size) {
        snprintf(why, whylen, "the file is truncated (%llu bytes, the ELF part alone has %llu)",
                 (unsigned long long)st.st_size, (unsigned long long)end);
        return -1;
    }
    *offset = (off_t)end;
    return 0;
}

/* Open the squashfs payload with libsquashfuse, explaining failures. */
static int open_payload(sqfs *fs, int fd, off_t offset, char *why, size_t whylen) {
    memset(fs, 0, sizeof *fs);
    sqfs_err err = sqfs_init(fs, fd, (size_t)offset);
    if (err == SQFS_OK)
        return 0;
    int major = 0, minor = 0;
    switch (err) {
    case SQFS_BADFORMAT:
        snprintf(why, whylen, "no squashfs payload at offset %lld (was one appended to the runtime?)",
                 (long long)offset);
        break;
    case SQFS_BADVERSION:
        sqfs_version(fs, &major, &minor);
        snprintf(why, whylen, "unsupported squashfs version %d.%d in the payload", major, minor);
        break;
    case SQFS_BADCOMP: {
        const char *name = sqfs_compression_name(sqfs_compression(fs));
        snprintf(why, whylen, "the payload is compressed with %s, which this runtime cannot read",
                 name ? name : "an unknown method");
        break;
    }
    default:
        snprintf(why, whylen, "cannot read the squashfs payload at offset %lld", (long long)offset);
    }
    sqfs_destroy(fs);
    return -1;
}

/* ------------------------------------------------------------ extraction */

struct level {
    char *name;     /* NULL for the root */
    int fd;         /* -1 until the directory is created */
    sqfs_inode inode;
};

struct extractor {
    sqfs fs;
    const char *pattern;    /* fnmatch pattern, or NULL for everything */
    const char *show;       /* print "<show>/<path>" per entry, or NULL */
    bool check_signals;     /* abort when a stop signal is pending */
    struct level *levels;
    size_t depth, cap;
    char **links;           /* first extracted path of each multiply linked inode */
    size_t nlinks;
    char *buf;
    size_t bufsize;
};

static bool safe_name(const char *name) {
    return name[0] != '\0' && strcmp(name, ".") != 0 && strcmp(name, "..") != 0 && !strchr(name, '/');
}

static void set_times(struct timespec ts[2], const sqfs_inode *inode) {
    ts[0].tv_sec = ts[1].tv_sec = (time_t)inode->base.mtime;
    ts[0].tv_nsec = ts[1].tv_nsec = 0;
}

/* Create (or reuse) the directories of the current path that do not exist yet. */
static int open_levels(struct extractor *x, const char *path) {
    for (size_t i = 1; i < x->depth; i++) {
        struct level *lv = &x->levels[i];
        int parent = x->levels[i - 1].fd;
        if (lv->fd >= 0)
            continue;
        if (mkdirat(parent, lv->name, 0700) < 0 && errno != EEXIST) {
            warnx("cannot create directory %s: %s", path, strerror(errno));
            return -1;
        }
        lv->fd = openat(parent, lv->name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (lv->fd < 0 && (errno == ENOTDIR || errno == ELOOP)) {
            /* Something else is in the way: replace it. */
            if (unlinkat(parent, lv->name, 0) == 0 && mkdirat(parent, lv->name, 0700) == 0)
                lv->fd = openat(parent, lv->name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        }
        if (lv->fd < 0) {
            warnx("cannot open directory %s: %s", path, strerror(errno));
            return -1;
        }
        /* Until it is finished, the directory must stay writable for us. */
        if (fchmod(lv->fd, 0700) < 0) {
            warnx("cannot chmod directory %s: %s", path, strerror(errno));
            return -1;
        }
    }
    return 0;
}

/* Give a finished directory its mode and time, and close it. */
static int close_level(struct level *lv, const char *path) {
    int rc = 0;
    if (lv->fd >= 0) {
        struct timespec ts[2];
        set_times(ts, &lv->inode);
        if (fchmod(lv->fd, lv->inode.base.mode & 07777) < 0 || futimens(lv->fd, ts) < 0) {
            warnx("cannot set the mode or time of %s: %s", path, strerror(errno));
            rc = -1;
        }
        if (close(lv->fd) < 0 && rc == 0) {
            warnx("cannot close %s: %s", path, strerror(errno));
            rc = -1;
        }
        lv->fd = -1;
    }
    free(lv->name);
    lv->name = NULL;
    return rc;
}

static void push_level(struct extractor *x, const char *name, const sqfs_inode *inode) {
    if (x->depth == x->cap) {
        size_t cap = x->cap ? x->cap * 2 : 16;
        struct level *lv = realloc(x->levels, cap * sizeof *lv);
        if (!lv)
            die("out of memory");
        x->levels = lv;
        x->cap = cap;
    }
    struct level *lv = &x->levels[x->depth++];
    lv->name = name ? xstrdup(name) : NULL;
    lv->fd = -1;
    lv->inode = *inode;
}

/* Remove whatever is at parent/name so that a non-directory can take its place. */
static int clear_entry(int parent, const char *name, const char *path) {
    if (unlinkat(parent, name, 0) == 0 || errno == ENOENT)
        return 0;
    warnx("cannot replace %s: %s", path, strerror(errno));
    return -1;
}

static int write_regular(struct extractor *x, int parent, const char *name, const char *path,
                         sqfs_inode *inode) {
    uint32_t ino = inode->base.inode_number;
    if (inode->nlink > 1 && ino < x->nlinks && x->links[ino]) {
        int root = x->levels[0].fd;
        if (linkat(root, x->links[ino], parent, name, 0) == 0)
            return 0;
        /* Fall through: copy the data instead (e.g. the path grew too long). */
    }
    int fd = openat(parent, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) {
        warnx("cannot create %s: %s", path, strerror(errno));
        return -1;
    }
    uint64_t size = inode->xtra.reg.file_size;
    for (uint64_t off = 0; off < size;) {
        sqfs_off_t n = (sqfs_off_t)(size - off < x->bufsize ? size - off : x->bufsize);
        if (sqfs_read_range(&x->fs, inode, (sqfs_off_t)off, &n, x->buf) != SQFS_OK || n <= 0) {
            warnx("cannot read %s from the payload", path);
            close(fd);
            return -1;
        }
        if (write_full(fd, x->buf, (size_t)n) < 0) {
            warnx("cannot write %s: %s", path, strerror(errno));
            close(fd);
            return -1;
        }
        off += (uint64_t)n;
    }
    struct timespec ts[2];
    set_times(ts, inode);
    if (fchmod(fd, inode->base.mode & 07777) < 0 || futimens(fd, ts) < 0) {
        warnx("cannot set the mode or time of %s: %s", path, strerror(errno));
        close(fd);
        return -1;
    }
    if (close(fd) < 0) {
        warnx("cannot write %s: %s", path, strerror(errno));
        return -1;
    }
    if (inode->nlink > 1 && ino < x->nlinks && !x->links[ino])
        x->links[ino] = xstrdup(path);
    return 0;
}

static int write_symlink(struct extractor *x, int parent, const char *name, const char *path,
                         sqfs_inode *inode) {
    size_t size = inode->xtra.symlink_size + 1;
    char *target = xmalloc(size);
    if (sqfs_readlink(&x->fs, inode, target, &size) != SQFS_OK) {
        warnx("cannot read the symlink %s from the payload", path);
        free(target);
        return -1;
    }
    int rc = symlinkat(target, parent, name);
    free(target);
    if (rc < 0) {
        warnx("cannot create the symlink %s: %s", path, strerror(errno));
        return -1;
    }
    struct timespec ts[2];
    set_times(ts, inode);
    if (utimensat(parent, name, ts, AT_SYMLINK_NOFOLLOW) < 0) {
        warnx("cannot set the time of %s: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}

static int write_special(int parent, const char *name, const char *path, sqfs_inode *inode) {
    mode_t mode = inode->base.mode;
    if (S_ISSOCK(mode)) {
        warnx("skipping the socket %s", path);
        return 0;
    }
    dev_t dev = S_ISFIFO(mode) ? 0 : makedev(inode->xtra.dev.major, inode->xtra.dev.minor);
    if (mknodat(parent, name, (mode & S_IFMT) | (mode & 07777), dev) < 0) {
        if (!S_ISFIFO(mode) && errno == EPERM) {
            warnx("skipping the device node %s (not permitted)", path);
            return 0;
        }
        warnx("cannot create %s: %s", path, strerror(errno));
        return -1;
    }
    struct timespec ts[2];
    set_times(ts, inode);
    if (fchmodat(parent, name, mode & 07777, 0) < 0 || utimensat(parent, name, ts, 0) < 0) {
        warnx("cannot set the mode or time of %s: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}

/* Extract the payload (or the entries whose path matches pattern) into dest,
   which is created if missing. Returns 0, or -1 after printing why. */
static int extract_payload(int imgfd, off_t offset, const char *dest, const char *pattern, const char *show,
                           bool check_signals) {
    struct extractor x = {0};
    char why[512];
    x.pattern = pattern;
    x.show = show;
    x.check_signals = check_signals;
    if (open_payload(&x.fs, imgfd, offset, why, sizeof why) < 0) {
        warnx("%s", why);
        return -1;
    }
    int rc = -1;
    bool traversing = false;
    sqfs_traverse trv;
    sqfs_inode root;
    x.bufsize = 256 * 1024;
    x.buf = xmalloc(x.bufsize);
    x.nlinks = (size_t)x.fs.sb.inodes + 1;
    x.links = calloc(x.nlinks, sizeof *x.links);
    if (!x.links)
        die("out of memory");

    if (sqfs_inode_get(&x.fs, &root, sqfs_inode_root(&x.fs)) != SQFS_OK) {
        warnx("cannot read the root directory of the payload");
        goto out;
    }
    if (mkdir(dest, 0700) < 0 && errno != EEXIST) {
        warnx("cannot create %s: %s", dest, strerror(errno));
        goto out;
    }
    push_level(&x, NULL, &root);
    x.levels[0].fd = open(dest, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (x.levels[0].fd < 0) {
        warnx("cannot open %s: %s", dest, strerror(errno));
        goto out;
    }
    if (sqfs_traverse_open_inode(&trv, &x.fs, &root) != SQFS_OK) {
        warnx("cannot read the root directory of the payload");
        goto out;
    }
    traversing = true;

    sqfs_err err = SQFS_OK;
    bool failed = false;
    while (!failed && sqfs_traverse_next(&trv, &err)) {
        if (check_signals && pending_stop_signal()) {
            warnx("extraction interrupted");
            failed = true;
            break;
        }
        if (trv.dir_end) {
            if (x.depth <= 1) {
                warnx("malformed directory tree in the payload");
                failed = true;
                break;
            }
            failed = close_level(&x.levels[--x.depth], trv.path) < 0;
            continue;
        }
        const char *name = sqfs_dentry_name(&trv.entry);
        if (!safe_name(name)) {
            warnx("refusing unsafe file name in the payload: \"%s\"", name);
            failed = true;
            break;
        }
        sqfs_inode inode;
        if (sqfs_inode_get(&x.fs, &inode, sqfs_dentry_inode(&trv.entry)) != SQFS_OK) {
            warnx("cannot read %s from the payload", trv.path);
            failed = true;
            break;
        }
        bool match = !pattern || fnmatch(pattern, trv.path, 0) == 0;
        if (S_ISDIR(inode.base.mode)) {
            push_level(&x, name, &inode);
            if (match) {
                failed = open_levels(&x, trv.path) < 0;
                if (!failed && show)
                    printf("%s/%s\n", show, trv.path);
            }
            continue;
        }
        if (!match)
            continue;
        if (open_levels(&x, trv.path) < 0) {
            failed = true;
            break;
        }
        int parent = x.levels[x.depth - 1].fd;
        if (clear_entry(parent, name, trv.path) < 0) {
            failed = true;
            break;
        }
        if (S_ISREG(inode.base.mode))
            failed = write_regular(&x, parent, name, trv.path, &inode) < 0;
        else if (S_ISLNK(inode.base.mode))
            failed = write_symlink(&x, parent, name, trv.path, &inode) < 0;
        else
            failed = write_special(parent, name, trv.path, &inode) < 0;
        if (!failed && show)
            printf("%s/%s\n", show, trv.path);
    }
    if (!failed && err != SQFS_OK) {
        warnx("cannot read the directory tree of the payload");
        failed = true;
    }
    if (!failed && x.depth != 1) {
        warnx("malformed directory tree in the payload");
        failed = true;
    }
    rc = failed ? -1 : 0;

out:
    if (traversing)
        sqfs_traverse_close(&trv);
    while (x.depth > 1) {
        struct level *lv = &x.levels[--x.depth];
        if (lv->fd >= 0)
            close(lv->fd);
        free(lv->name);
    }
    if (x.depth == 1) {
        struct level *lv = &x.levels[0];
        /* The root gets the payload root's mode only when all was extracted. */
        if (rc == 0 && !pattern) {
            if (close_level(lv, dest) < 0)
                rc = -1;
        } else if (lv->fd >= 0) {
            close(lv->fd);
        }
    }
    if (show && fflush(stdout) != 0 && rc == 0) {
        warnx("cannot write to standard output: %s", strerror(errno));
        rc = -1;
    }
    for (size_t i = 0; i < x.nlinks; i++)
        free(x.links[i]);
    free(x.links);
    free(x.levels);
    free(x.buf);
    sqfs_destroy(&x.fs);
    return rc;
}

/* Remove everything below the directory dfd, not crossing into other mounts. */
static int remove_contents(int dfd, dev_t dev, const char *path) {
    int rc = 0;
    /* Extracted directories may be read-only; best effort (only the owner can). */
    (void)fchmod(dfd, 0700);
    int dup_fd = fcntl(dfd, F_DUPFD_CLOEXEC, 0);
    if (dup_fd < 0) {
        warnx("cannot remove %s: %s", path, strerror(errno));
        return -1;
    }
    DIR *d = fdopendir(dup_fd);
    if (!d) {
        warnx("cannot remove %s: %s", path, strerror(errno));
        close(dup_fd);
        return -1;
    }
    for (;;) {
        errno = 0;
        struct dirent *e = readdir(d);
        if (!e) {
            if (errno) {
                warnx("cannot list %s: %s", path, strerror(errno));
                rc = -1;
            }
            break;
        }
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        struct stat st;
        if (fstatat(dfd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
            if (errno != ENOENT) {
                warnx("cannot stat %s/%s: %s", path, e->d_name, strerror(errno));
                rc = -1;
            }
            continue;
        }
        if (S_ISDIR(st.st_mode)) {
            char *sub = xasprintf("%s/%s", path, e->d_name);
            if (st.st_dev != dev) {
                warnx("not removing %s: another file system is mounted there", sub);
                rc = -1;
                free(sub);
                continue;
            }
            int fd = openat(dfd, e->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (fd < 0 || remove_contents(fd, dev, sub) < 0)
                rc = -1;
            if (fd >= 0)
                close(fd);
            if (unlinkat(dfd, e->d_name, AT_REMOVEDIR) < 0) {
                warnx("cannot remove %s: %s", sub, strerror(errno));
                rc = -1;
            }
            free(sub);
        } else if (unlinkat(dfd, e->d_name, 0) < 0 && errno != ENOENT) {
            warnx("cannot remove %s/%s: %s", path, e->d_name, strerror(errno));
            rc = -1;
        }
    }
    closedir(d);
    return rc;
}

static int remove_tree(const char *path) {
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT)
            return 0;
        warnx("cannot remove %s: %s", path, strerror(errno));
        return -1;
    }
    struct stat st;
    int rc = fstat(fd, &st) < 0 ? -1 : remove_contents(fd, st.st_dev, path);
    close(fd);
    if (rmdir(path) < 0) {
        warnx("cannot remove %s: %s", path, strerror(errno));
        rc = -1;
    }
    return rc;
}

/* ------------------------------------------------------------------ FUSE */

static struct fuse_session *served_session;

static void stop_serving(int sig) {
    (void)sig;
    if (served_session)
        fuse_session_exit(served_session);
}

static void op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup) {
    sqfs_ll_op_forget(req, ino, (unsigned long)nlookup);
}

static struct fuse_session *try_mount(sqfs_ll *ll, const char *mountpoint, bool auto_unmount) {
    static struct fuse_lowlevel_ops ops;
    ops.getattr = sqfs_ll_op_getattr;
    ops.opendir = sqfs_ll_op_opendir;
    ops.releasedir = sqfs_ll_op_releasedir;
    ops.readdir = sqfs_ll_op_readdir;
    ops.lookup = sqfs_ll_op_lookup;
    ops.open = sqfs_ll_op_open;
    ops.create = sqfs_ll_op_create;
    ops.release = sqfs_ll_op_release;
    ops.read = sqfs_ll_op_read;
    ops.readlink = sqfs_ll_op_readlink;
    ops.listxattr = sqfs_ll_op_listxattr;
    ops.getxattr = sqfs_ll_op_getxattr;
    ops.forget = op_forget;
    ops.statfs = stfs_ll_op_statfs;

    char *argv[] = {"appimage", "-o",
                    auto_unmount ? "ro,nosuid,nodev,fsname=appimage,subtype=appimage,auto_unmount"
                                 : "ro,nosuid,nodev,fsname=appimage,subtype=appimage",
                    NULL};
    struct fuse_args args = FUSE_ARGS_INIT(3, argv);
    struct fuse_session *se = fuse_session_new(&args, &ops, sizeof ops, ll);
    fuse_opt_free_args(&args);
    if (!se)
        return NULL;
    if (fuse_session_mount(se, mountpoint) != 0) {
        fuse_session_destroy(se);
        return NULL;
    }
    return se;
}

/* The last non-empty line of what was written to fd (captured stderr). */
static void last_line(int fd, char *out, size_t outlen) {
    char buf[2048];
    struct stat st;
    out[0] = '\0';
    if (fstat(fd, &st) < 0 || st.st_size <= 0)
        return;
    off_t start = st.st_size > (off_t)sizeof buf - 1 ? st.st_size - (off_t)(sizeof buf - 1) : 0;
    ssize_t n = pread(fd, buf, (size_t)(st.st_size - start), start);
    if (n <= 0)
        return;
    buf[n] = '\0';
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' '))
        buf[--n] = '\0';
    char *line = strrchr(buf, '\n');
    copy_text(out, outlen, line ? line + 1 : buf);
}

/* Body of the FUSE child: mount, report to the parent through status_fd
   ("o" or "e<reason>"), serve until SIGUSR1 (or the parent's death), unmount. */
static void fuse_child(int imgfd, off_t offset, const char *mountpoint, int status_fd, pid_t parent) {
    char why[512] = "";
    /* Stop serving if the parent dies; tty signals are for AppRun, not for us. */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = stop_serving; /* no SA_RESTART: the blocking read returns EINTR */
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGUSR1, &sa, NULL) < 0 || signal(SIGINT, SIG_IGN) == SIG_ERR ||
        signal(SIGTERM, SIG_IGN) == SIG_ERR || signal(SIGHUP, SIG_IGN) == SIG_ERR ||
        signal(SIGPIPE, SIG_IGN) == SIG_ERR || prctl(PR_SET_PDEATHSIG, SIGUSR1) < 0) {
        snprintf(why, sizeof why, "cannot set up signals: %s", strerror(errno));
        goto fail;
    }
    if (getppid() != parent)
        _exit(1);
    sigset_t none;
    sigemptyset(&none);
    if (sigprocmask(SIG_SETMASK, &none, NULL) < 0) {
        snprintf(why, sizeof why, "sigprocmask: %s", strerror(errno));
        goto fail;
    }
    /* Standard input and output are not ours to hold (nor fusermount3's);
       without /dev/null, mounting fails below with a better reason. */
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null >= 0) {
        if (dup2(null, 0) < 0 || dup2(null, 1) < 0) {
            snprintf(why, sizeof why, "dup2: %s", strerror(errno));
            goto fail;
        }
        close(null);
    }

    sqfs_ll *ll = calloc(1, sizeof *ll);
    if (!ll) {
        snprintf(why, sizeof why, "out of memory");
        goto fail;
    }
    if (open_payload(&ll->fs, imgfd, offset, why, sizeof why) < 0)
        goto fail;
    if (sqfs_ll_init(ll) != SQFS_OK) {
        snprintf(why, sizeof why, "cannot set up the squashfs inode table");
        goto fail;
    }

    /* libfuse and fusermount3 explain failures on stderr: keep that for the
       one-line reason instead of letting it through. */
    int saved_err = fcntl(2, F_DUPFD_CLOEXEC, 3);
    int capture = memfd_create("appimage-fuse-errors", MFD_CLOEXEC);
    if (saved_err < 0 || capture < 0 || dup2(capture, 2) < 0) {
        snprintf(why, sizeof why, "cannot capture FUSE errors: %s", strerror(errno));
        goto fail;
    }
    /* auto_unmount (through fusermount3) unmounts even if we are killed;
       without it, root can still mount directly. */
    struct fuse_session *se = try_mount(ll, mountpoint, true);
    if (!se)
        se = try_mount(ll, mountpoint, false);
    fflush(stderr);
    if (!se)
        last_line(capture, why, sizeof why);
    if (dup2(saved_err, 2) < 0)
        _exit(1);
    close(saved_err);
    close(capture);
    if (!se) {
        if (!why[0])
            snprintf(why, sizeof why, "mounting failed");
        goto fail;
    }

    served_session = se;
    if (write_full(status_fd, "o", 1) < 0) {
        fuse_session_unmount(se);
        _exit(1);
    }
    close(status_fd);

    fuse_session_loop(se);
    served_session = NULL;
    fuse_session_unmount(se);
    fuse_session_destroy(se);
    if (rmdir(mountpoint) < 0 && errno != ENOENT)
        warnx("cannot remove the mount point %s: %s", mountpoint, strerror(errno));
    sqfs_ll_destroy(ll);
    free(ll);
    _exit(0);

fail: {
    char msg[sizeof why + 1];
    msg[0] = 'e';
    memcpy(msg + 1, why, strlen(why) + 1);
    (void)write_full(status_fd, msg, strlen(msg));
    _exit(1);
}
}

/* Fork the FUSE child and wait until it has mounted mountpoint. Returns its
   pid, or -1 with the reason in why (the child is gone by then). */
static pid_t start_fuse(int imgfd, off_t offset, const char *mountpoint, char *why, size_t whylen) {
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) < 0) {
        snprintf(why, whylen, "pipe: %s", strerror(errno));
        return -1;
    }
    pid_t parent = getpid();
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) {
        snprintf(why, whylen, "fork: %s", strerror(errno));
        close(fds[0]);
        close(fds[1]);
        return -1;
    }
    if (pid == 0) {
        close(fds[0]);
        fuse_child(imgfd, offset, mountpoint, fds[1], parent);
        _exit(1);
    }
    close(fds[1]);

    char msg[600];
    size_t len = 0;
    int64_t deadline = now_ms() + FUSE_MOUNT_TIMEOUT_MS;
    bool timed_out = false;
    for (;;) {
        int64_t left = deadline - now_ms();
        if (left <= 0) {
            timed_out = true;
            break;
        }
        struct pollfd pfd = {fds[0], POLLIN, 0};
        int r = poll(&pfd, 1, (int)left);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            snprintf(why, whylen, "poll: %s", strerror(errno));
            timed_out = true;
            break;
        }
        if (r == 0)
            continue;
        if (len == sizeof msg - 1)
            break;
        ssize_t n = read(fds[0], msg + len, sizeof msg - 1 - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        len += (size_t)n;
        if (msg[0] == 'o')
            break;
    }
    close(fds[0]);
    msg[len] = '\0';
    if (!timed_out && len > 0 && msg[0] == 'o')
        return pid;

    if (timed_out) {
        kill(pid, SIGKILL);
        if (!why[0] || strncmp(why, "poll", 4) != 0)
            snprintf(why, whylen, "mounting took longer than %d s", FUSE_MOUNT_TIMEOUT_MS / 1000);
    } else if (len > 1) {
        copy_text(why, whylen, msg + 1);
    } else {
        snprintf(why, whylen, "the FUSE process died");
    }
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
        ;
    if (timed_out)
        umount2(mountpoint, MNT_DETACH); /* in case it got that far; errors are expected */
    return -1;
}

/* ------------------------------------------------------------ supervision */

struct children {
    pid_t app;        /* AppRun, or -1 */
    int app_status;
    bool app_done;
    pid_t fuse;       /* FUSE child, or -1 once gone */
};

static void reap(struct children *c) {
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid < 0 && errno == EINTR)
            continue;
        if (pid <= 0)
            return;
        if (pid == c->app) {
            c->app_status = status;
            c->app_done = true;
        } else if (pid == c->fuse) {
            c->fuse = -1;
        }
    }
}

/* Send sig to our live children (not the FUSE one), each once: orphaned
   descendants of AppRun are ours too (we are their subreaper). Returns how
   many are still alive. */
static size_t signal_children(const struct children *c, int sig, pid_t **sent, size_t *nsent, size_t *capsent) {
    size_t alive = 0;
    DIR *d = opendir("/proc");
    if (!d) {
        warnx("cannot list /proc to find leftover processes: %s", strerror(errno));
        return 0;
    }
    pid_t self = getpid();
    struct dirent *e;
    while ((e = readdir(d))) {
        char *end;
        long pid = strtol(e->d_name, &end, 10);
        if (*end || pid <= 0 || pid == c->fuse)
            continue;
        char path[64], buf[512];
        snprintf(path, sizeof path, "/proc/%ld/stat", pid);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            continue; /* gone meanwhile */
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n <= 0)
            continue;
        buf[n] = '\0';
        char *p = strrchr(buf, ')'); /* the command name may contain anything */
        char state;
        long ppid;
        if (!p || sscanf(p + 1, " %c %ld", &state, &ppid) != 2 || ppid != self || state == 'Z')
            continue;
        alive++;
        bool already = false;
        for (size_t i = 0; i < *nsent; i++)
            if ((*sent)[i] == (pid_t)pid)
                already = true;
        if (already && sig == SIGTERM)
            continue;
        if (kill((pid_t)pid, sig) < 0 && errno != ESRCH)
            warnx("cannot signal process %ld: %s", pid, strerror(errno));
        if (!already) {
            if (*nsent == *capsent) {
                *capsent = *capsent ? *capsent * 2 : 16;
                pid_t *p2 = realloc(*sent, *capsent * sizeof **sent);
                if (!p2)
                    die("out of memory");
                *sent = p2;
            }
            (*sent)[(*nsent)++] = (pid_t)pid;
        }
    }
    closedir(d);
    return alive;
}

/* After AppRun exits: stop what it left running (SIGTERM, then SIGKILL after
   a grace period, or at once on a second stop signal), so nothing keeps
   using the mount or the extracted files. */
static void end_leftovers(struct children *c) {
    pid_t *sent = NULL;
    size_t nsent = 0, capsent = 0;
    int sig = SIGTERM;
    int64_t deadline = now_ms() + KILL_GRACE_MS;
    for (;;) {
        reap(c);
        if (signal_children(c, sig, &sent, &nsent, &capsent) == 0)
            break;
        if (sig == SIGTERM && now_ms() >= deadline)
            sig = SIGKILL;
        siginfo_t si;
        int got = wait_signal(50, &si);
        if (got == SIGTERM || got == SIGINT || got == SIGHUP)
            sig = SIGKILL;
    }
    free(sent);
}

/* Ask the FUSE child to unmount and exit; wait for it, with a fallback. */
static void stop_fuse(struct children *c, const char *mountpoint) {
    int64_t deadline = now_ms() + FUSE_STOP_TIMEOUT_MS;
    reap(c);
    while (c->fuse > 0 && now_ms() < deadline) {
        /* Repeated: a signal landing just before the child blocks in read()
           would otherwise go unnoticed until the next request. */
        if (kill(c->fuse, SIGUSR1) < 0 && errno != ESRCH)
            warnx("cannot signal the FUSE process: %s", strerror(errno));
        siginfo_t si;
        wait_signal(100, &si);
        reap(c);
    }
    if (c->fuse > 0) {
        warnx("the FUSE process did not stop; killing it");
        kill(c->fuse, SIGKILL);
        while (waitpid(c->fuse, NULL, 0) < 0 && errno == EINTR)
            ;
        c->fuse = -1;
    }
    /* Normally already unmounted and removed by the FUSE process. */
    if (umount2(mountpoint, MNT_DETACH) < 0 && errno != EINVAL && errno != ENOENT && errno != EPERM)
        warnx("cannot unmount %s: %s", mountpoint, strerror(errno));
    if (rmdir(mountpoint) < 0 && errno != ENOENT)
        warnx("cannot remove the mount point %s: %s", mountpoint, strerror(errno));
    /* Give helpers (fusermount3 watching for auto_unmount) a moment to exit. */
    int64_t reap_deadline = now_ms() + REAP_TIMEOUT_MS;
    while (now_ms() < reap_deadline) {
        pid_t pid = waitpid(-1, NULL, WNOHANG);
        if (pid < 0 && errno == EINTR)
            continue;
        if (pid < 0)
            break; /* no children left */
        if (pid == 0) {
            siginfo_t si;
            wait_signal(50, &si);
        }
    }
}

/* Forward stop signals to AppRun until it exits; returns its exit code. */
static int supervise(struct children *c) {
    for (;;) {
        reap(c);
        if (c->app_done)
            break;
        siginfo_t si;
        int sig = wait_signal(-1, &si);
        /* Signals from the terminal (si_code > 0) reach AppRun by themselves,
           being in our process group; forward only those sent by processes. */
        if ((sig == SIGTERM || sig == SIGINT || sig == SIGHUP) && si.si_code <= 0) {
            if (kill(c->app, sig) < 0 && errno != ESRCH)
                warnx("cannot forward signal %d: %s", sig, strerror(errno));
        }
    }
    if (WIFEXITED(c->app_status))
        return WEXITSTATUS(c->app_status);
    if (WIFSIGNALED(c->app_status))
        return 128 + WTERMSIG(c->app_status);
    return 1;
}

/* --------------------------------------------------------------- running */

/* $TMPDIR (or /tmp), absolute, so that APPDIR stays valid wherever AppRun goes. */
static char *temp_base(void) {
    const char *tmp = getenv("TMPDIR");
    if (!tmp || !*tmp)
        tmp = "/tmp";
    char *base = realpath(tmp, NULL);
    if (!base)
        die("cannot use the temporary directory %s: %s", tmp, strerror(errno));
    return base;
}

/* Up to 6 characters of the AppImage's file name, as a hint in directory names. */
static void name_tag(const char *self, char tag[7]) {
    const char *name = strrchr(self, '/') ? strrchr(self, '/') + 1 : self;
    size_t i = 0;
    for (; i < 6 && name[i]; i++) {
        char ch = name[i];
        tag[i] = ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '-')
                     ? ch
                     : '_';
    }
    tag[i] = '\0';
}

static char *temp_dir(const char *kind, const char *self) {
    char *base = temp_base();
    char tag[7];
    name_tag(self, tag);
    char *path = xasprintf("%s/%s%sXXXXXX", base, kind, tag);
    if (!mkdtemp(path))
        die("cannot create a temporary directory in %s: %s", base, strerror(errno));
    free(base);
    return path;
}

/* Extracted copies are named appimage_extracted_<tag>.XXXXXX: the dot is in
   no name an older version of this runtime or the upstream runtime (which
   uses an MD5 in hex) gives, so only copies made as below are ever removed
   by remove_stale_copies. */
#define EXTRACTED_PREFIX "appimage_extracted_"

static bool is_locked_copy_name(const char *name) {
    size_t plen = strlen(EXTRACTED_PREFIX);
    if (strncmp(name, EXTRACTED_PREFIX, plen) != 0)
        return false;
    const char *p = name + plen;
    size_t tag = strspn(p, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_");
    if (tag > 6 || p[tag] != '.')
        return false;
    p += tag + 1;
    return strlen(p) == 6 && strspn(p, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") == 6;
}

/* Whether path still names the directory open as fd. */
static bool same_dir(int fd, const char *path) {
    struct stat a, b;
    return fstat(fd, &a) == 0 && lstat(path, &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

/* A new directory for the extracted payload, held with an exclusive flock()
   on *lockfd (close-on-exec: the lock is the runtime's alone) for as long as
   the runtime lives. The kernel drops the lock when the runtime dies however
   it dies, so a copy nobody holds is one a killed run left behind. */
static char *locked_copy_dir(const char *self, int *lockfd) {
    char *base = temp_base();
    char tag[7];
    name_tag(self, tag);
    for (int attempt = 0; attempt < 100; attempt++) {
        char *path = xasprintf("%s/" EXTRACTED_PREFIX "%s.XXXXXX", base, tag);
        if (!mkdtemp(path))
            die("cannot create a temporary directory in %s: %s", base, strerror(errno));
        int fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0)
            die("cannot open %s: %s", path, strerror(errno));
        /* Blocks only while another start is removing it (found unlocked
           between mkdtemp and here): then it is gone, and we try again. */
        while (flock(fd, LOCK_EX) < 0)
            if (errno != EINTR)
                die("cannot lock %s: %s", path, strerror(errno));
        if (same_dir(fd, path)) {
            free(base);
            *lockfd = fd;
            return path;
        }
        close(fd);
        free(path);
    }
    die("cannot create a temporary directory in %s that stays", base);
}

/* Remove the extracted copies in base that killed runs left: ours (by name and
   owner) that no live runtime holds locked. */
static void remove_stale_copies(const char *base) {
    DIR *d = opendir(base);
    if (!d)
        return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!is_locked_copy_name(e->d_name))
            continue;
        int fd = openat(dirfd(d), e->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0)
            continue;
        struct stat st;
        char *path = xasprintf("%s/%s", base, e->d_name);
        /* Removed while still locked, so a start that created it meanwhile
           (and waits for the lock) sees it gone and makes another. */
        if (fstat(fd, &st) == 0 && st.st_uid == geteuid() && flock(fd, LOCK_EX | LOCK_NB) == 0 &&
            same_dir(fd, path))
            remove_tree(path);
        free(path);
        close(fd);
    }
    closedir(d);
}

/* Fail early, with one clear message, if there is no readable payload. */
static void check_payload(int imgfd, off_t offset) {
    sqfs fs;
    char why[512];
    if (open_payload(&fs, imgfd, offset, why, sizeof why) < 0)
        die("%s", why);
    sqfs_destroy(&fs);
}

static int run_app(int argc, char **argv, int first_arg, const char *self, int imgfd, off_t offset,
                   bool extract) {
    check_payload(imgfd, offset);
    /* SIGUSR1 too: the FUSE child inherits it blocked until its handler is set. */
    sigset_t block = handled_signals(), old_mask;
    sigaddset(&block, SIGUSR1);
    if (sigprocmask(SIG_BLOCK, &block, &old_mask) < 0)
        die("sigprocmask: %s", strerror(errno));
    if (signal(SIGCHLD, SIG_DFL) == SIG_ERR)
        die("signal: %s", strerror(errno));
    if (prctl(PR_SET_CHILD_SUBREAPER, 1) < 0)
        die("cannot become a subreaper: %s", strerror(errno));

    char *owd = getcwd(NULL, 0);
    if (!owd)
        warnx("cannot get the working directory (%s); OWD is not set", strerror(errno));

    /* Whatever a killed run of ours extracted (the runtime could not clean up
       after itself) goes now. */
    char *base = temp_base();
    remove_stale_copies(base);
    free(base);

    struct children c = {.app = -1, .fuse = -1};
    char *appdir = NULL;
    int lockfd = -1;
    bool mounted = false;
    if (!extract) {
        char why[512] = "";
        appdir = temp_dir(".mount_", self);
        c.fuse = start_fuse(imgfd, offset, appdir, why, sizeof why);
        mounted = c.fuse > 0;
        if (!mounted) {
            if (rmdir(appdir) < 0 && errno != ENOENT)
                warnx("cannot remove %s: %s", appdir, strerror(errno));
            free(appdir);
            appdir = NULL;
            fprintf(stderr, "appimage: cannot mount with FUSE (%s); extracting to a temporary directory\n", why);
        }
    }
    if (!mounted) {
        appdir = locked_copy_dir(self, &lockfd);
        if (extract_payload(imgfd, offset, appdir, NULL, NULL, true) < 0) {
            remove_tree(appdir);
            close(lockfd);
            int sig = pending_stop_signal();
            return sig ? 128 + sig : 1;
        }
    }

    int code = 1;
    int sig = pending_stop_signal();
    if (sig) {
        code = 128 + sig;
    } else if (setenv("APPDIR", appdir, 1) < 0 || setenv("APPIMAGE", self, 1) < 0 ||
               setenv("ARGV0", argv[0], 1) < 0 || (owd && setenv("OWD", owd, 1) < 0)) {
        warnx("setenv: %s", strerror(errno));
    } else {
        char *apprun = xasprintf("%s/AppRun", appdir);
        char **cargv = xmalloc(sizeof *cargv * (size_t)(argc - first_arg + 2));
        size_t n = 0;
        cargv[n++] = apprun;
        for (int i = first_arg; i < argc; i++)
            cargv[n++] = argv[i];
        cargv[n] = NULL;

        fflush(stdout);
        fflush(stderr);
        pid_t parent = getpid();
        c.app = fork();
        if (c.app < 0)
            warnx("fork: %s", strerror(errno));
        if (c.app == 0) {
            /* AppRun should not outlive the runtime: the mount goes with it. */
            if (prctl(PR_SET_PDEATHSIG, SIGTERM) < 0 || getppid() != parent)
                _exit(127);
            if (sigprocmask(SIG_SETMASK, &old_mask, NULL) < 0)
                _exit(127);
            execv(apprun, cargv);
            fprintf(stderr, "appimage: cannot execute %s: %s\n", apprun, strerror(errno));
            _exit(127);
        }
        free(cargv);
        free(apprun);
        if (c.app > 0) {
            code = supervise(&c);
            end_leftovers(&c);
        }
    }

    if (mounted) {
        stop_fuse(&c, appdir);
    } else {
        if (remove_tree(appdir) < 0 && code == 0)
            code = 1;
        close(lockfd);
    }
    free(appdir);
    free(owd);
    return code;
}

static int mount_only(const char *self, int imgfd, off_t offset) {
    check_payload(imgfd, offset);
    sigset_t block = handled_signals();
    sigaddset(&block, SIGUSR1);
    if (sigprocmask(SIG_BLOCK, &block, NULL) < 0)
        die("sigprocmask: %s", strerror(errno));
    if (signal(SIGCHLD, SIG_DFL) == SIG_ERR)
        die("signal: %s", strerror(errno));
    struct children c = {.app = -1, .fuse = -1};
    char why[512] = "";
    char *dir = temp_dir(".mount_", self);
    c.fuse = start_fuse(imgfd, offset, dir, why, sizeof why);
    if (c.fuse < 0) {
        rmdir(dir);
        die("cannot mount with FUSE: %s", why);
    }
    printf("%s\n", dir);
    if (fflush(stdout) != 0)
        warnx("cannot write to standard output: %s", strerror(errno));
    int code = 0;
    for (;;) {
        siginfo_t si;
        int sig = wait_signal(-1, &si);
        if (sig == SIGTERM || sig == SIGINT || sig == SIGHUP)
            break;
        reap(&c);
        if (c.fuse < 0) {
            warnx("%s was unmounted", dir);
            code = 1;
            break;
        }
    }
    stop_fuse(&c, dir);
    free(dir);
    return code;
}

static void usage(void) {
    printf("AppImage type 2 runtime %s (reconciler)\n"
           "\n"
           "Without --appimage-* options, mounts the payload read-only with FUSE (or, when\n"
           "FUSE cannot be used or APPIMAGE_EXTRACT_AND_RUN=1, extracts it to a temporary\n"
           "directory) and runs $APPDIR/AppRun with the given arguments and APPDIR, APPIMAGE,\n"
           "ARGV0 and OWD set. SIGTERM, SIGINT and SIGHUP are passed on to AppRun; when it\n"
           "exits, processes it left behind are stopped, the payload is unmounted or\n"
           "removed, and its exit status is returned (128+N if killed by signal N).\n"
           "\n"
           "Options (as the first argument):\n"
           "  --appimage-extract [PATTERN]  extract the payload (or the paths matching the\n"
           "                                fnmatch PATTERN) into ./squashfs-root\n"
           "  --appimage-extract-and-run    run from an extracted copy instead of FUSE\n"
           "  --appimage-help               print this help\n"
           "  --appimage-mount              mount the payload, print the mount point and\n"
           "                                wait for SIGTERM or SIGINT, then unmount\n"
           "  --appimage-offset             print the byte offset of the payload\n"
           "  --appimage-signature          print the signature (.sha256_sig)\n"
           "  --appimage-updateinformation  print the update information (.upd_info)\n"
           "  --appimage-version            print the runtime version\n",
           RUNTIME_VERSION);
}

static int print_section(const char *data, size_t size) {
    printf("%.*s\n", (int)strnlen(data, size), data);
    return fflush(stdout) == 0 ? 0 : 1;
}

int main(int argc, char **argv) {
    const char *opt = argc > 1 ? argv[1] : "";
    if (strcmp(opt, "--appimage-help") == 0) {
        usage();
        return fflush(stdout) == 0 ? 0 : 1;
    }
    if (strcmp(opt, "--appimage-version") == 0) {
        printf("AppImage type 2 runtime %s (reconciler)\n", RUNTIME_VERSION);
        return fflush(stdout) == 0 ? 0 : 1;
    }
    if (strcmp(opt, "--appimage-updateinformation") == 0 || strcmp(opt, "--appimage-updateinfo") == 0)
        return print_section(appimage_update_information, sizeof appimage_update_information);
    if (strcmp(opt, "--appimage-signature") == 0)
        return print_section(appimage_signature, sizeof appimage_signature);

    char *self = read_link("/proc/self/exe");
    if (!self)
        die("cannot find the AppImage file: /proc/self/exe: %s", strerror(errno));
    int imgfd = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
    if (imgfd < 0)
        die("cannot open %s: %s", self, strerror(errno));
    off_t offset;
    char why[512];
    if (elf_payload_offset(imgfd, &offset, why, sizeof why) < 0)
        die("%s: %s", self, why);

    if (strcmp(opt, "--appimage-offset") == 0) {
        printf("%lld\n", (long long)offset);
        return fflush(stdout) == 0 ? 0 : 1;
    }
    if (strcmp(opt, "--appimage-extract") == 0) {
        if (argc > 3)
            die("usage: %s --appimage-extract [PATTERN]", argv[0]);
        return extract_payload(imgfd, offset, "squashfs-root", argc > 2 ? argv[2] : NULL, "squashfs-root",
                               false) == 0
                   ? 0
                   : 1;
    }
    if (strcmp(opt, "--appimage-mount") == 0)
        return mount_only(self, imgfd, offset);
    if (strcmp(opt, "--appimage-extract-and-run") == 0)
        return run_app(argc, argv, 2, self, imgfd, offset, true);
    if (strncmp(opt, "--appimage-", 11) == 0)
        die("unknown option %s (see --appimage-help)", opt);

    const char *env = getenv("APPIMAGE_EXTRACT_AND_RUN");
    return run_app(argc, argv, 1, self, imgfd, offset, env && strcmp(env, "1") == 0);
}
