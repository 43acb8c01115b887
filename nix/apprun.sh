# The image's entry point, run by busybox sh from the AppRun launcher with APPDIR
# set to the image root (an AppImage mount, an extracted copy, or / in an ACI).
#
# It runs every service of the host under runit: runsvdir starts one runsv per
# service, runsv restarts the service per its policy and pipes its output through
# a log process that prefixes each line with the service name. On SIGTERM, SIGINT
# or SIGHUP every service is stopped (TERM, then KILL after a grace period), runit
# is shut down and the script exits.
#
# The image is read-only and has no fixed path, so the runit service directories
# (which runsv writes its state into, and whose scripts need an absolute #!) are
# generated at start in a private runtime directory.
set -eu
: "${APPDIR:?APPDIR must name the image root}"
bb="$APPDIR/bin/busybox"
runit="$APPDIR/.reconciler/runit"
grace=${RECONCILER_STOP_TIMEOUT:-10}

run=$("$bb" mktemp -d "${TMPDIR:-/tmp}/reconciler-run.XXXXXX")
mkdir() { "$bb" mkdir "$@"; }
chmod() { "$bb" chmod "$@"; }

# Tools on PATH for the services and for runit itself (runsvdir finds runsv by name).
mkdir "$run/bin"
for applet in $("$bb" --list); do "$bb" ln -s "$bb" "$run/bin/$applet"; done
for tool in runsvdir runsv sv; do
  # The Debian toolchain's runit is dynamically linked and carries its own loader.
  via=""
  [ -x "$runit/lib/ld-linux-x86-64.so.2" ] &&
    via="\"$runit/lib/ld-linux-x86-64.so.2\" --library-path \"$runit/lib\" --argv0 $tool "
  printf '#!%s sh\nexec %s"%s/libexec/%s" "$@"\n' "$bb" "$via" "$runit" "$tool" > "$run/bin/$tool"
  chmod 755 "$run/bin/$tool"
done
export PATH="$run/bin:$PATH"

# The host's network config, for services that want it.
set -a
[ -f "$APPDIR/etc/reconciler/network.env" ] && . "$APPDIR/etc/reconciler/network.env"
set +a

mkdir "$run/service"
for def in "$APPDIR"/etc/service/*/; do
  [ -f "$def/run" ] || continue
  name=$(basename "$def")
  svc="$run/service/$name"
  mkdir -p "$svc/log"
  { printf '#!%s sh\nexec 2>&1\ncd "$APPDIR"\n' "$bb"; cat "$def/run"; } > "$svc/run"
  # runsv runs ./finish after each exit with the exit code as $1; `sv down` from
  # there keeps the service down instead of restarting it.
  case $(cat "$def/restart") in
    always) printf '#!%s sh\nexit 0\n' "$bb" ;;
    on-failure) printf '#!%s sh\n[ "$1" = 0 ] && exec sv down "$PWD"\nexit 0\n' "$bb" ;;
    never) printf '#!%s sh\nexec sv down "$PWD"\n' "$bb" ;;
  esac > "$svc/finish"
  printf '#!%s sh\nexec awk -v p=%s %s\n' "$bb" "$name" "'{ print p \": \" \$0; fflush() }'" > "$svc/log/run"
  chmod 755 "$svc/run" "$svc/finish" "$svc/log/run"
done

stop() {
  trap '' TERM INT HUP
  # force-stop sends TERM and waits; after the grace period it sends KILL.
  sv -w "$grace" force-stop "$run"/service/* >/dev/null 2>&1 || true
  # HUP makes runsvdir send TERM to every runsv (each stops its log, then exits).
  kill -HUP "$svdir" 2>/dev/null || true
  wait "$svdir" 2>/dev/null || true
  # runsv writes its state until it exits; remove the directory only after that.
  i=0
  while [ $i -lt $((grace * 10)) ] && sv status "$run"/service/* 2>&1 | grep -qv 'runsv not running'; do
    sleep 0.1; i=$((i + 1))
  done
  rm -rf "$run"
  exit 0
}
trap stop TERM INT HUP

runsvdir -P "$run/service" &
svdir=$!
while :; do
  wait "$svdir" && status=0 || status=$?
  # wait returns early (status > 128) when a trapped signal arrives; stop() exits.
  kill -0 "$svdir" 2>/dev/null || break
done
rm -rf "$run"
exit "$status"
