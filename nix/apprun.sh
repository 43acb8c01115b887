# The image's entry point, run by busybox sh from the AppRun launcher with APPDIR
# set to the image root (an AppImage mount, an extracted copy, or / in an ACI).
#
# It hands the host's services to the image's static supervisor,
# reconciler-supervise (nix/runtime/supervise.c), which starts each
# etc/service/<name>/run with this busybox from the image root, restarts it per
# etc/service/<name>/restart with backoff, prefixes each line of its output with
# the service name, and on SIGTERM, SIGINT or SIGHUP (or the death of the AppImage
# runtime) stops them all: TERM, then KILL after RECONCILER_STOP_TIMEOUT seconds.
#
# Nothing is written anywhere: the image stays read-only and needs no /tmp.
set -eu
: "${APPDIR:?APPDIR must name the image root}"

# The host's network config, for services that want it.
set -a
[ -f "$APPDIR/etc/reconciler/network.env" ] && . "$APPDIR/etc/reconciler/network.env"
set +a

root=${APPDIR%/}  # "/" in an ACI: "/.reconciler", not "//.reconciler"
cd "$APPDIR"
exec "$root/.reconciler/reconciler-supervise" -t "${RECONCILER_STOP_TIMEOUT:-10}" \
  "$root/bin/busybox" etc/service
