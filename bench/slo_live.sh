#!/usr/bin/env bash
# Issue 9, live on CPU: SmolLM2, 2 prefill + 2 decode, the shared Mooncake trace scaled down.
#   1. profile   a least_loaded mesh: `pdmesh bench profile` records its profile (the models the
#                scheduler fitted to its workers' step and push samples, the step gap and request
#                overhead its calibration requests show beyond them, and the host's cores, shared).
#   2. least     the same mesh under the trace at SPEEDUP and 2 x SPEEDUP (SPEEDUP: the sustainable
#                load), SLOs sent with every request; then `pdmesh bench profile --no-load` records
#                the models the scheduler fitted under that load (profile-loaded.json).
#   3. slo       a fresh mesh under the slo policy, profile-loaded.json its predictors' prior: a short
#                warm-up point, then the trace at 2 x SPEEDUP.
#   4. sim       `pdmesh sim` with each recorded profile, the same trace, loads and policies: its
#                TTFT/TPOT percentiles beside the live ones (the simulator's truth check).
# Writes $OUT/{profile,profile-loaded,least,slo,sim-profile,sim-loaded}.json, loadavg.txt and each
# process's logs; `python bench/slo_live_summary.py $OUT` prints the tables for BENCHMARKS.md.
#
#   SPEEDUP=0.1 bench/slo_live.sh        # from the repository root, with `make install` done
set -euo pipefail
OUT=${OUT:-bench/results/slo_live}
PORT=${PORT:-37300}
HTTP_PORT=${HTTP_PORT:-$((PORT + 350))}  # the OpenAI door: clear of the mesh's port block and of 8000
TRACE=${TRACE:-../shared/traces/mooncake_synthetic_trace.jsonl}
SPEEDUP=${SPEEDUP:?the sustainable trace speed-up, e.g. 0.1}
REQUESTS=${REQUESTS:-120}
SLO_TTFT_MS=${SLO_TTFT_MS:-4000}
SLO_TPOT_MS=${SLO_TPOT_MS:-400}
# Prompts x0.02 (mean ~300 tokens, the 512-token hash block becomes 10), outputs x0.1 (mean ~15).
SCALE=${SCALE:-"--trace-input-scale 0.02 --trace-output-scale 0.1"}
PDMESH=${PDMESH:-.venv/bin/pdmesh}
DOUBLE=$(python3 -c "print(2 * $SPEEDUP)")
mkdir -p "$OUT"
: > "$OUT/loadavg.txt"

loadavg() { echo "$1 $(date -Is) $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/loadavg.txt"; }

MESH_PID=""
start_mesh() {  # policy [prior profile]
    local prior=()
    [ -n "${2:-}" ] && prior=("PDMESH_SLO_PROFILE=$2")
    env "${prior[@]}" PDMESH_SCHEDULER_POLICY=$1 PDMESH_SLO_DEFAULT_TTFT_MS=$SLO_TTFT_MS PDMESH_SLO_DEFAULT_TPOT_MS=$SLO_TPOT_MS \
        $PDMESH up --port "$PORT" --http-port "$HTTP_PORT" --prefill 2 --decode 2 --threads 1 --log-dir "$OUT/logs-$1" > "$OUT/up-$1.log" 2>&1 &
    MESH_PID=$!
    for _ in $(seq 600); do
        grep -q "pdmesh is up" "$OUT/up-$1.log" && return 0
        kill -0 "$MESH_PID" 2>/dev/null || { cat "$OUT/up-$1.log"; return 1; }
        sleep 1
    done
    echo "the mesh never came up"; return 1
}
stop_mesh() {
    [ -n "$MESH_PID" ] && kill -INT "$MESH_PID" 2>/dev/null && wait "$MESH_PID" || true
    MESH_PID=""
}
trap stop_mesh EXIT

serve() {  # out speedups [extra...]
    local out=$1 speedups=$2; shift 2
    # shellcheck disable=SC2086
    $PDMESH bench serve --target "127.0.0.1:$PORT" --trace "$TRACE" --requests "$REQUESTS" $SCALE \
        --trace-speedup "$speedups" --slo-ttft-ms "$SLO_TTFT_MS" --slo-tpot-ms "$SLO_TPOT_MS" --send-slo \
        --timeout-s 600 --per-request --out "$out" "$@"
}

loadavg "start"
start_mesh least_loaded
# The workers share this host's cores: the simulator shares them as well (pdmesh/sim/cores.py).
$PDMESH bench profile --target "127.0.0.1:$PORT" --out "$OUT/profile.json" --max-prompt 1024 --concurrency 1,4,8 \
    --shared-cores "$(nproc)"
loadavg "profiled"
serve "$OUT/least.json" "$SPEEDUP,$DOUBLE"
loadavg "least_loaded done"
$PDMESH bench profile --target "127.0.0.1:$PORT" --out "$OUT/profile-loaded.json" --no-load
stop_mesh

if [ "${SLO_MESH:-1}" = 1 ]; then  # SLO_MESH=0: the truth check alone (least_loaded live and simulated)
    start_mesh slo "$OUT/profile-loaded.json"
    serve "$OUT/slo-warmup.json" "$DOUBLE" --requests 24 --seed 1
    serve "$OUT/slo.json" "$DOUBLE"
    loadavg "slo done"
    stop_mesh
fi

for p in profile profile-loaded; do
    # shellcheck disable=SC2086
    $PDMESH sim --profile "$OUT/$p.json" --prefill 2 --decode 2 --trace "$TRACE" --requests "$REQUESTS" $SCALE \
        --trace-speedup "$SPEEDUP,$DOUBLE" --slo-ttft-ms "$SLO_TTFT_MS" --slo-tpot-ms "$SLO_TPOT_MS" \
        --policy least_loaded,slo --out "$OUT/sim-${p#profile-}.json" --no-progress
done
loadavg "end"
