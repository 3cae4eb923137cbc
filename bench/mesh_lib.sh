# Helpers of the bench scripts that A/B fresh `pdmesh up` meshes (cpu_mesh_ab.sh, first_handoff.sh):
# source it after setting PRIORITY (an autogroup nice, or empty for none; cpu_mesh_ab.sh's header
# says why it matters on a shared machine).

# Every descendant of a process, depth first.
descendants() { local c; for c in $(ps -o pid= --ppid "$1"); do echo "$c"; descendants "$c"; done; }

# Move these processes' autogroups to $PRIORITY (needs root; nothing when PRIORITY is empty).
prioritize() { [ -z "$PRIORITY" ] || for p in "$@"; do echo "$PRIORITY" > "/proc/$p/autogroup"; done; }

# wait_up LOG PID POLL_S: until the mesh started as PID says "pdmesh is up" in LOG; exits the
# script if the mesh exits first.
wait_up() {
    until grep -qs "pdmesh is up" "$1"; do
        kill -0 "$2" 2>/dev/null || { echo "mesh exited: $1" >&2; exit 1; }
        sleep "$3"
    done
}

# stop_mesh PID: SIGTERM to the mesh's process group (it drains), SIGKILL after 40 s.
stop_mesh() {
    kill -TERM -- "-$1"
    for _ in $(seq 40); do kill -0 "$1" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$1" 2>/dev/null || true
}

# prioritized COMMAND...: run a command (the load generator) in a session of its own at $PRIORITY.
prioritized() { setsid bash -c '[ -z "$1" ] || echo "$1" > /proc/$$/autogroup; shift; exec "$@"' _ "$PRIORITY" "$@"; }
