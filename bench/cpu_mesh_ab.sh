#!/usr/bin/env bash
# Two settings of a colocated CPU mesh (SmolLM2, 0 prefill + 1 decode worker), A/B alternated
# round by round, and where each run's time went (issue 15: "Where a c1 token goes"). From the
# repository root, after `make install`:
#
#     A="" B="PDMESH_ENGINE_CPU_SMALL_STEP_MAX_TOKENS=0" CONCURRENCY=1 bench/cpu_mesh_ab.sh
#
# A and B are environment assignments for the mesh (space-separated NAME=VALUE), A_ARGS and B_ARGS
# more `pdmesh up` arguments for each side (e.g. B_ARGS=--no-kvstore). Each run starts a
# fresh mesh, sends 2 uncounted requests, then $REQUESTS of $INPUT_LEN (256) random prompt tokens
# x $OUTPUT_LEN (64) output tokens at $CONCURRENCY (`pdmesh bench serve`), and prints output
# tokens/s, TTFT and TPOT p50, each mesh process's CPU time over the counted requests, and the
# decode worker's step-loop summary (wall and the step thread's CPU time per phase: wall above CPU
# is time the step thread did not run).
#
# PRIORITY (an autogroup nice, e.g. -15; needs root) raises every mesh process and the load
# generator above the machine's other sessions: `pdmesh up` starts each process in a session of
# its own, and Linux's autogroup scheduling shares the cores between sessions, not threads, so on
# a shared machine a worker with more threads is not simply given more CPU. With it, a run on a
# busy machine comes close to one on an idle machine; without it, other sessions' load decides.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PDMESH=$ROOT/.venv/bin/pdmesh
MODEL_DIR=${MODEL_DIR:-${TMPDIR:-/tmp}/smollm2-hf}
A=${A:-}
B=${B:-}
A_ARGS=${A_ARGS:-}
B_ARGS=${B_ARGS:-}
CONCURRENCY=${CONCURRENCY:-1}
REQUESTS=${REQUESTS:-16}
INPUT_LEN=${INPUT_LEN:-256}
OUTPUT_LEN=${OUTPUT_LEN:-64}
ROUNDS=${ROUNDS:-2}
THREADS=${THREADS:-2}
PRIORITY=${PRIORITY:-}
PORT=${PORT:-33700}
OUT=${OUT:-$ROOT/bench/results/cpu_mesh_ab/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
[ -f "$MODEL_DIR/config.json" ] || .venv/bin/python bench/smollm2_hf.py "$MODEL_DIR"
export PDMESH_SCHEDULER_LOCAL_PREFILL_MAX_TOKENS=1000000  # colocated: the decode worker prefills

# shellcheck source=bench/mesh_lib.sh
. "$ROOT/bench/mesh_lib.sh"
cpu_ticks() { for p in "$@"; do echo "$p $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)"; done; }

run() {  # run NAME "ENV ASSIGNMENTS" "UP ARGUMENTS"
    local name=$1 dir=$OUT/$1 mesh pids
    mkdir -p "$dir"
    # shellcheck disable=SC2086  # the assignments are meant to split
    env $2 setsid "$PDMESH" up --port "$PORT" --http-port $((PORT + 350)) --prefill 0 --decode 1 \
        --model "$MODEL_DIR" --dtype bfloat16 --threads "$THREADS" --no-restart $3 > "$dir/mesh.log" 2>&1 &
    mesh=$!
    wait_up "$dir/mesh.log" "$mesh" 2
    pids=$(descendants "$mesh")
    # shellcheck disable=SC2086
    prioritize $pids
    local load=(--target "127.0.0.1:$PORT" --concurrency "$CONCURRENCY" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN"
        --no-progress)
    "$PDMESH" bench serve "${load[@]}" --requests 2 --seed 99 > /dev/null
    # shellcheck disable=SC2086
    cpu_ticks $pids > "$dir/cpu_before.txt"
    prioritized "$PDMESH" bench serve "${load[@]}" --requests "$REQUESTS" --seed 7 --out "$dir/run.json" > "$dir/bench.txt"
    # shellcheck disable=SC2086
    cpu_ticks $pids > "$dir/cpu_after.txt"
    ps -o pid=,args= -p "$(echo $pids | tr ' ' ,)" > "$dir/processes.txt"
    stop_mesh "$mesh"
    cp -r "$(grep -o '/tmp/pdmesh-up-[A-Za-z0-9_]*' "$dir/mesh.log" | head -1)" "$dir/logs"
    .venv/bin/python bench/cpu_mesh_ab_summary.py "$dir" "$name ($2 $3)"
}

echo "load before: $(uptime)" | tee "$OUT/machine.txt"
for round in $(seq 1 "$ROUNDS"); do
    if [ $((round % 2)) -eq 1 ]; then
        run "a$round" "$A" "$A_ARGS"; run "b$round" "$B" "$B_ARGS"
    else
        run "b$round" "$B" "$B_ARGS"; run "a$round" "$A" "$A_ARGS"
    fi
done
echo "load after: $(uptime)" | tee -a "$OUT/machine.txt"
