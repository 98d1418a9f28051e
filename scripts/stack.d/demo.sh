# shellcheck shell=bash
# Sourced by scripts/stack.
#
# What scripts/demo leaves running.

# Binaries started by scripts/demo leave pid files here; `down` stops them first.
stop_demo_processes() {
  local pidfile pid
  for pidfile in "$STATE"/benalsam-*.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
      say "stopping $(basename "$pidfile" .pid) (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$pidfile"
  done
}
