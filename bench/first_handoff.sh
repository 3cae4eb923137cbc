#!/usr/bin/env bash
# The first hand-off on a fresh prefill -> decode KV connection: a fresh 1 prefill + 1 decode mesh
# per run, its first requests timed one at a time (bench/ttft_breakdown.py: TTFT and its phases),
# with the prefill worker's preconnect on and off (PDMESH_WORKER_KV_PRECONNECT), alternated run by
# run. Off, the first ticket dials the decode worker (UCX endpoint, handshake; on GPUs also the
# CUDA IPC mapping) while its prompt computes; on, the connection was made when the scheduler named
# the decode worker, before any request. From the repository root, after `make install`:
#
#     PRIORITY=-15 ROUNDS=3 bench/first_handoff.sh                       # CPU, SmolLM2
#     MODEL_DIR=/path/to/hf-dir DEVICE=cuda INPUT_LEN=4096 bench/first_handoff.sh   # one GPU
#
# Each run waits SETTLE_S after the mesh is up (a user's first request does not come the same
# millisecond), then sends $REQUESTS requests of $INPUT_LEN random prompt tokens, one at a time;
# the first is the one that paid the dial with preconnect off. PRIORITY: an autogroup nice for
# every mesh process and the client (bench/cpu_mesh_ab.sh says why; needs root).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PDMESH=$ROOT/.venv/bin/pdmesh
MODEL_DIR=${MODEL_DIR:-${TMPDIR:-/tmp}/smollm2-hf}
DEVICE=${DEVICE:-cpu}
INPUT_LEN=${INPUT_LEN:-256}
REQUESTS=${REQUESTS:-3}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-1}
KV_BLOCKS=${KV_BLOCKS:-256}
SETTLE_S=${SETTLE_S:-3}
VOCAB=${VOCAB:-49152}
PRIORITY=${PRIORITY:-}
PORT=${PORT:-33900}
OUT=${OUT:-$ROOT/bench/results/first_handoff/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
[ "$DEVICE" != cpu ] || [ -f "$MODEL_DIR/config.json" ] || .venv/bin/python bench/smollm2_hf.py "$MODEL_DIR"
export PDMESH_SCHEDULER_POLICY=least_loaded PDMESH_SCHEDULER_LOCAL_PREFILL_MAX_TOKENS=0  # every prompt disaggregated

# shellcheck source=bench/mesh_lib.sh
. "$ROOT/bench/mesh_lib.sh"

run() {  # run NAME PRECONNECT(1|0)
    local name=$1 dir=$OUT/$1 mesh
    mkdir -p "$dir"
    PDMESH_WORKER_KV_PRECONNECT=$2 setsid "$PDMESH" up --port "$PORT" --http-port $((PORT + 350)) --prefill 1 \
        --decode 1 --model "$MODEL_DIR" --device "$DEVICE" --threads "$THREADS" --kv-blocks "$KV_BLOCKS" \
        --no-kvstore --no-restart > "$dir/mesh.log" 2>&1 &
    mesh=$!
    wait_up "$dir/mesh.log" "$mesh" 1
    # shellcheck disable=SC2046
    prioritize $(descendants "$mesh")
    sleep "$SETTLE_S"
    prioritized .venv/bin/python bench/ttft_breakdown.py --target "127.0.0.1:$PORT" --input-len "$INPUT_LEN" --output-len 2 \
        --warmup 0 --requests "$REQUESTS" --vocab "$VOCAB" --seed "$RANDOM" --out "$dir/run.json" > "$dir/ttft.txt"
    stop_mesh "$mesh"
    .venv/bin/python - "$dir/run.json" "$name" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["requests"]
cells = [f"ttft {r['ttft']:7.1f} (prefill {r['prefill']:6.1f}, kv wait {r['kv wait']:5.1f}, {r['plan']})" for r in rows]
print(f"{sys.argv[2]:>4}: first {cells[0]} | then " + " | ".join(c.split(' (')[0] for c in cells[1:]))
PY
}

echo "load before: $(uptime)" | tee "$OUT/machine.txt"
for round in $(seq 1 "$ROUNDS"); do
    if [ $((round % 2)) -eq 1 ]; then run "on$round" 1; run "off$round" 0; else run "off$round" 0; run "on$round" 1; fi
done
echo "load after: $(uptime)" | tee -a "$OUT/machine.txt"
