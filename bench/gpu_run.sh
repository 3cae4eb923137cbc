#!/usr/bin/env bash
# Every GPU figure of issue 15 in one run on one GPU: the engine's offline rates (the baseline),
# the GPU tests, and the mesh under load, disaggregated and colocated, with the load generator.
#
#   PHASES="engine tests mesh" bench/gpu_run.sh            # from the repository root
#
# Writes $OUT/summary.txt (what each phase printed last) and $OUT/logs.tgz (every log and JSON).
# Each phase has its own time limit and the whole run a deadline (BUDGET_S), so that a stuck phase
# costs only itself. Phases: setup model tests engine profile mesh-disagg mesh-coloc mesh-coloc512
# mesh-disagg-nostore mesh-coloc-nostore (`--no-kvstore`) mesh-disagg-nooffers (the store looked up, offers
# all but off) kvstore (issue 8: a GPU test of the store, then bench/kv_store.py, ~4 min;
# `PHASES="setup model kvstore"`). The engine phase also prints bench/serving_bound.py's bound for c64;
# each mesh's per-process logs (PDMESH_TELEMETRY_LOG_LEVEL=debug for per-request lines) land in the logs.
# MESH_AFTER_UP: a shell command run once each mesh is up, before its loads.
set -u
# The disaggregated meshes here hand every long prompt off (least_loaded's fixed rule), as when the
# figures were recorded; the default slo policy would decide per request instead.
export PDMESH_SCHEDULER_POLICY=${PDMESH_SCHEDULER_POLICY:-least_loaded}
OUT=${OUT:-/tmp/gpu_run}
LOGS=$OUT/logs
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
PHASES=${PHASES:-"setup model tests engine mesh-disagg mesh-coloc mesh-coloc512"}
BUDGET_S=${BUDGET_S:-570}
MODEL=${MODEL:-/tmp/llama8b-random}
KV_BLOCKS=${KV_BLOCKS:-8192}
LOADS=${LOADS:-"seq4k c16 c64 c256 c16x4k"}  # the loads run on each mesh (see load_args; bd4k: bench/ttft_breakdown.py)
T0=$(date +%s)
PY=python3

left() { echo $((BUDGET_S - ($(date +%s) - T0))); }
say() { echo "$*" | tee -a "$OUT/summary.txt"; }

# phase NAME LIMIT_S CMD...: run with a limit (never past the deadline), log to $LOGS/NAME.log.
phase() {
  local name=$1 limit=$2
  shift 2
  local remaining
  remaining=$(left)
  if ((remaining < 20)); then say "== $name skipped: $remaining s left"; return 1; fi
  ((limit > remaining - 10)) && limit=$((remaining - 10))
  local start=$(date +%s)
  timeout -k 5 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  say "== $name rc=$rc $(($(date +%s) - start))s (limit ${limit}s)"
  tail -n "${TAIL:-12}" "$LOGS/$name.log" | cut -c1-300 | tee -a "$OUT/summary.txt"
  return $rc
}

brief() {  # one line per load point of a bench serve JSON
  $PY - "$1" <<'PYEOF' | tee -a "$OUT/summary.txt"
import json, sys
d = json.load(open(sys.argv[1]))
f = lambda x, n=0: "-" if x is None else f"{x:.{n}f}"
for r in d["runs"]:
    t, p, i = r["ttft_ms"], r["tpot_ms"], r["itl_ms"]
    print(f"  {sys.argv[1].rsplit('/', 1)[-1]} {r['load']['mode']}={r['load']['value']}: ok {r['ok']} failed "
          f"{r['failed']} {r['failed_by_code'] or ''} out_tok/s {f(r['output_tokens_per_s'])} TTFT p50/p99 "
          f"{f(t['p50'])}/{f(t['p99'])} TPOT p50/p99 {f(p['p50'], 1)}/{f(p['p99'], 1)} ITL p50 {f(i['p50'], 1)} "
          f"in {f(r['duration_s'], 1)}s")
PYEOF
}

wants() { [[ " $PHASES " == *" $1 "* ]]; }

load_args() {  # the bench serve arguments of a load name
  case $1 in
    c8) echo "--concurrency 8 --requests 16 --input-len 1024 --output-len 256" ;;
    c16) echo "--concurrency 16 --requests 32 --input-len 1024 --output-len 256" ;;
    c64) echo "--concurrency 64 --requests 128 --input-len 1024 --output-len 256" ;;
    c64long) echo "--concurrency 64 --requests 512 --input-len 1024 --output-len 256" ;;  # eight waves: the ramps weigh less
    c256) echo "--concurrency 256 --requests 256 --input-len 1024 --output-len 128" ;;
    seq4k) echo "--concurrency 1 --requests 6 --input-len 4096 --output-len 16" ;;
    bd4k) echo "--requests ${BD_N:-8} --warmup 2 --input-len ${BD_LEN:-4096} --output-len 16" ;;  # bench/ttft_breakdown.py's
    c16x4k) echo "--concurrency 16 --requests 32 --input-len 4096 --output-len 32" ;;
    # The same, four waves: with two, the p50 fell between the first wave's queue and the second's (issue 15)
    c16x4kl) echo "--concurrency 16 --requests 64 --input-len 4096 --output-len 32" ;;
    seq4kl) echo "--concurrency 1 --requests 12 --input-len 4096 --output-len 16" ;;
  esac
}

# mesh NAME PORT UP_ARGS...: start `pdmesh up`, run every load of $LOADS against it, stop it (its
# workers log their step-loop summaries as they stop).
mesh() {
  local name=$1 port=$2
  shift 2
  if (($(left) < ${MESH_MIN_S:-80})); then say "== $name skipped: $(left) s left"; return 1; fi
  $PY -m pdmesh up --model "$MODEL" --device "${DEVICE:-cuda}" --kv-blocks "$KV_BLOCKS" --port "$port" "$@" \
    >"$LOGS/$name.up.log" 2>&1 &
  local pid=$!
  local waited=0
  until grep -q "pdmesh is up" "$LOGS/$name.up.log" 2>/dev/null; do
    if ! kill -0 $pid 2>/dev/null || ((waited > 240)); then
      say "== $name: the mesh did not come up"; tail -n 30 "$LOGS/$name.up.log" | tee -a "$OUT/summary.txt"
      kill -INT $pid 2>/dev/null; wait $pid; return 1
    fi
    sleep 1; waited=$((waited + 1))
  done
  say "== $name up after ${waited}s"
  if [[ -n ${MESH_AFTER_UP:-} ]]; then  # e.g. stop a worker: what the mesh does without it (its context kept)
    bash -c "$MESH_AFTER_UP" >>"$LOGS/$name.up.log" 2>&1; say "== $name: ran MESH_AFTER_UP"
  fi
  local seed=0
  for load in $LOADS; do
    seed=$((seed + 1))  # each load its own prompts: a later load must not hit an earlier one's prefix cache
    if [[ $load == bd* ]]; then  # sequential requests, each one's TTFT phases from its Usage
      # shellcheck disable=SC2046
      TAIL=3 phase "$name-$load" 100 $PY bench/ttft_breakdown.py --target "127.0.0.1:$port" $(load_args "$load") \
        --seed "$((seed + 1000))" --vocab 128000 --out "$LOGS/$name-$load.json"
      continue
    fi
    # shellcheck disable=SC2046
    phase "$name-$load" 150 $PY -m pdmesh bench serve --target "127.0.0.1:$port" $(load_args "$load") \
      --seed "$seed" --warmup 2 --no-progress --out "$LOGS/$name-$load.json" && brief "$LOGS/$name-$load.json"
  done
  kill -INT $pid
  timeout 60 tail --pid=$pid -f /dev/null
  kill -9 $pid 2>/dev/null
  local procs
  procs=$(grep -o "every process logs to [^ ]*" "$LOGS/$name.up.log" | head -n 1 | cut -d' ' -f5)
  [[ -n $procs && -d $procs ]] && cp -r "$procs" "$LOGS/$name.procs"
  grep -a "step loop\|device is lost\|captured\|Traceback\|Error" "$LOGS/$name.up.log" | cut -c1-600 | tail -n 20 \
    | tee -a "$OUT/summary.txt"
}

if wants setup; then
  phase setup 60 bash -c 'nvidia-smi -L; nvidia-smi --query-gpu=memory.used,memory.total --format=csv;
    python3 -c "import torch, triton, grpc, ucxx, structlog; print(torch.__version__, triton.__version__, grpc.__version__)"'
fi
if wants model; then  # in the background: the tests below share the GPU but time nothing
  (timeout 240 $PY bench/random_model.py "$MODEL" --max-position 8192 >"$LOGS/model.log" 2>&1; echo "rc=$?" >>"$LOGS/model.log") &
  MODEL_PID=$!
fi
if wants tests; then
  phase tests 200 $PY -m pytest -q -m gpu -p no:cacheprovider --timeout 180 \
    tests/mesh/test_mesh_gpu.py tests/engine/test_oracle_gpu.py tests/engine/test_attention_gpu.py \
    tests/kvtransfer/test_transfer_gpu.py
fi
if wants model; then
  wait "$MODEL_PID"; say "== model: $(tail -n 2 "$LOGS/model.log" | tr '\n' ' ')"
fi
if wants engine; then
  phase engine 150 $PY bench/engine.py --device cuda --batches ${ENGINE_BATCHES:-1,16,64} --prompt-len 1024 --steps 30 \
    --mixed-chunks ${MIXED_CHUNKS:-256,512,1024,2048} --no-transformers --out "$LOGS/engine.json" &&
    TAIL=8 phase bound 20 $PY bench/serving_bound.py "$LOGS/engine.json" --batch 64 --input-len 1024 --output-len 256
fi
if wants profile; then
  phase profile 100 $PY bench/step_profile.py --batch 64 --prompt-len 1024 --chunks 0,256,1024 --steps 4 \
    --out-dir "$LOGS/profile"
fi
if wants mesh-disagg; then
  mesh mesh-disagg 50051 --prefill 1 --decode 1
fi
if wants mesh-coloc; then
  PDMESH_SCHEDULER_LOCAL_PREFILL_MAX_TOKENS=1000000 mesh mesh-coloc 51051 --prefill 0 --decode 1
fi
if wants mesh-coloc512; then  # colocated with 512-token steps: smaller prefill chunks beside the decodes
  PDMESH_BATCHER_MAX_BATCHED_TOKENS=512 PDMESH_SCHEDULER_LOCAL_PREFILL_MAX_TOKENS=1000000 LOADS=${LOADS512:-c64} \
    mesh mesh-coloc512 52051 --prefill 0 --decode 1
fi
if wants mesh-disagg-nostore; then
  LOADS=${LOADS_NOSTORE:-$LOADS} mesh mesh-disagg-nostore 54051 --prefill 1 --decode 1 --no-kvstore
fi
if wants mesh-coloc-nostore; then
  PDMESH_SCHEDULER_LOCAL_PREFILL_MAX_TOKENS=1000000 LOADS=${LOADS_NOSTORE:-$LOADS} \
    mesh mesh-coloc-nostore 55051 --prefill 0 --decode 1 --no-kvstore
fi
if wants mesh-disagg-nooffers; then  # lookups as usual; a backlog of one block leaves offers all but off
  PDMESH_WORKER_KVSTORE_OFFER_BACKLOG_MIB=1 LOADS=${LOADS_NOSTORE:-$LOADS} \
    mesh mesh-disagg-nooffers 56051 --prefill 1 --decode 1
fi
if wants kvstore; then  # 2 prefill + 1 decode 8B workers on the one GPU, and the KV store
  # First the store alone as GPU workers meet it (8 GiB pinned, 2 MiB blocks from and into GPU memory).
  phase kvstore-gpu-test 120 $PY -m pytest -q -m gpu -p no:cacheprovider --timeout 110 \
    tests/services/kvstore/test_kvstore_gpu.py
  TAIL=16 phase kvstore 230 $PY bench/kv_store.py --device cuda --model "$MODEL" --kv-blocks 2048 \
    --store-mib 8192 --port 53051 --rounds 2 --routing-rounds 1 --prefix 2048 --groups 8 --input 128 \
    --concurrency 16 --requests 64 --routing-output 32 --out "$LOGS/kvstore.json" --log-dir "$LOGS/kvstore"
fi
say "== total $(($(date +%s) - T0))s"
tar -czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOGS"
