#!/usr/bin/env bash
# Issue 13 in one device call on two GPUs: prefill on GPU 1, decode on GPU 0.
#   1. kv      KV transfer GPU1 -> GPU0 between two worker processes (bench/kv_transfer.py), beside a
#              torch peer copy of the same bytes in the same run: direct writes over CUDA IPC and
#              the UCX path (direct writes off), each its own pair of processes.
#   kv-timeline  (not in the default PHASES) where a direct-write ticket's time goes, step by step
#              on both sides (bench/kv_transfer.py --timeline; 1k and 4k tokens).
#   2. mesh    `pdmesh bench serve` against 1 prefill (GPU1) + 1 decode (GPU0), disaggregated, and
#              against two colocated workers (one per GPU, every prompt prefilled where it is
#              decoded): the same Mooncake trace replay and the same mixed long-prompt/long-output
#              load on each.
#   mesh-slo   (not in the default PHASES) 1 prefill + 1 decode under the slo policy, which may also
#              prefill on the decode GPU when the prefill GPU's queue would miss the TTFT SLO.
#   3. failures  SIGKILL the prefill worker mid-push and the decode worker mid-stream under 64
#              concurrent requests (bench/two_gpu_failures.py).
#
#   TRACE=../shared/traces/mooncake_synthetic_trace.jsonl bench/two_gpu_run.sh     # repository root
#   DEVICE=cpu MODEL=/tmp/tiny PHASES="mesh" bench/two_gpu_run.sh                   # CPU rehearsal
# COMMIT names the commit measured where the tree travels without its .git (the device copy).
#
# Every step has its own time limit and the whole run a deadline (BUDGET_S), with time held back
# for the failure step, so a stuck step costs only itself. Writes $OUT/summary.txt (what each step
# printed last, and the comparison), $OUT/results.json (every figure) and $OUT/logs.tgz (all logs).
set -u
# The disaggregated meshes here hand every long prompt off (least_loaded's fixed rule), as when the
# figures were recorded; the default slo policy would decide per request instead.
export PDMESH_SCHEDULER_POLICY=${PDMESH_SCHEDULER_POLICY:-least_loaded}
OUT=${OUT:-/tmp/two_gpu_run}
LOGS=$OUT/logs
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 UCX_WARN_UNUSED_ENV_VARS=n
# Never NVLink multicast on shared hosts (the device notes); the workers inherit these.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PHASES=${PHASES:-"setup model kv mesh failures"}
BUDGET_S=${BUDGET_S:-465}
FAILURE_RESERVE_S=${FAILURE_RESERVE_S:-130}  # the mesh steps stop short of this
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-/tmp/llama8b-random}
KV_BLOCKS=${KV_BLOCKS:-16384}
TRACE=${TRACE:-../shared/traces/mooncake_synthetic_trace.jsonl}
SLO_TTFT_MS=${SLO_TTFT_MS:-3000}
SLO_TPOT_MS=${SLO_TPOT_MS:-50}
# The first 100 records of the trace (28 s at 1x); prompt lengths x0.25 (p50 ~2.9k, max 14.1k tokens),
# outputs as recorded; replayed at 1x to 4x, each speed with prompts of its own (cold caches), so
# that DistServe's goodput (the highest speed at which 90% meet both SLOs) is read off the sweep.
TRACE_ARGS=${TRACE_ARGS:-"--requests 100 --trace-input-scale 0.25 --trace-speedup 1,1.5,2,3,4"}
# Which loads each mesh carries: the trace replay, the mixed load, or both.
MESH_LOADS=${MESH_LOADS:-"trace mixed"}
MIXED_ARGS=${MIXED_ARGS:-"--rate 4,8,12 --requests 90 --input-len 512:8192 --output-len 32:512"}
KV_ARGS=${KV_ARGS:-"--pairs 1:0 --message-mib 32,512"}
FAILURE_ARGS=${FAILURE_ARGS:-""}
# Extra `pdmesh up` flags for every mesh, e.g. MESH_ARGS=--no-kvstore to compare the two plans alone.
MESH_ARGS=${MESH_ARGS:-""}
T0=$(date +%s)
PY=${PY:-python3}

left() { echo $((BUDGET_S - ($(date +%s) - T0))); }
say() { echo "$*" | tee -a "$OUT/summary.txt"; }
wants() { [[ " $PHASES " == *" $1 "* ]]; }

# phase NAME LIMIT_S RESERVE_S CMD...: run with a limit that ends RESERVE_S before the deadline.
phase() {
  local name=$1 limit=$2 reserve=$3
  shift 3
  local remaining=$(($(left) - reserve))
  if ((remaining < 20)); then say "== $name skipped: $remaining s left before the reserve"; return 1; fi
  ((limit > remaining - 5)) && limit=$((remaining - 5))
  local start=$(date +%s)
  timeout -k 5 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  say "== $name rc=$rc $(($(date +%s) - start))s (limit ${limit}s)"
  tail -n "${TAIL:-8}" "$LOGS/$name.log" | cut -c1-300 | tee -a "$OUT/summary.txt"
  return $rc
}

# mesh NAME PORT UP_ARGS...: start `pdmesh up`, replay the trace and the mixed load, stop it.
mesh() {
  local name=$1 port=$2
  shift 2
  # shellcheck disable=SC2086
  $PY -m pdmesh up --model "$MODEL" --device "$DEVICE" --kv-blocks "$KV_BLOCKS" --port "$port" $MESH_ARGS "$@" \
    >"$LOGS/$name.up.log" 2>&1 &
  local pid=$! waited=0
  until grep -q "pdmesh is up" "$LOGS/$name.up.log" 2>/dev/null; do
    if ! kill -0 $pid 2>/dev/null || ((waited > 150)) || (($(left) < FAILURE_RESERVE_S)); then
      say "== $name: the mesh did not come up in ${waited}s"; tail -n 20 "$LOGS/$name.up.log" | cut -c1-300 | tee -a "$OUT/summary.txt"
      kill -INT $pid 2>/dev/null; timeout 30 tail --pid=$pid -f /dev/null; kill -9 $pid 2>/dev/null; return 1
    fi
    sleep 1; waited=$((waited + 1))
  done
  say "== $name up after ${waited}s"
  local common="--target 127.0.0.1:$port --slo-ttft-ms $SLO_TTFT_MS --slo-tpot-ms $SLO_TPOT_MS --timeout-s 120 --no-progress"
  # shellcheck disable=SC2086
  [[ " $MESH_LOADS " == *" trace "* ]] && phase "$name-trace" 200 "$FAILURE_RESERVE_S" $PY -m pdmesh bench serve $common --warmup 4 --trace "$TRACE" \
    $TRACE_ARGS --out "$LOGS/$name-trace.json"
  # shellcheck disable=SC2086
  [[ " $MESH_LOADS " == *" mixed "* ]] && phase "$name-mixed" "${MIXED_LIMIT_S:-110}" "$FAILURE_RESERVE_S" $PY -m pdmesh bench serve $common --warmup 0 $MIXED_ARGS \
    --out "$LOGS/$name-mixed.json"
  kill -INT $pid
  timeout 40 tail --pid=$pid -f /dev/null
  kill -9 $pid 2>/dev/null
  grep -a "step loop\|device is lost\|Traceback\|Error" "$LOGS/$name.up.log" | cut -c1-400 | tail -n 8 \
    | tee -a "$OUT/summary.txt"
}

if wants setup; then
  phase setup 60 0 bash -c 'nvidia-smi -L; nvidia-smi topo -m; echo "measured commit: ${COMMIT:-$(git rev-parse HEAD 2>/dev/null)}";
    python3 -c "import torch, grpc, ucxx; n = torch.cuda.device_count(); print(torch.__version__, grpc.__version__, n, \"GPUs\");
print(\"peer access 1->0:\", n > 1 and torch.cuda.can_device_access_peer(1, 0))"'
fi
if wants model; then  # in the background, beside the KV transfer: its GPU use is fills and PCIe copies
  (timeout 200 $PY bench/random_model.py "$MODEL" --max-position 32768 >"$LOGS/model.log" 2>&1
   echo "rc=$?" >>"$LOGS/model.log") &
  MODEL_PID=$!
fi
if wants kv; then
  # shellcheck disable=SC2086
  phase kv 150 "$FAILURE_RESERVE_S" $PY bench/kv_transfer.py $KV_ARGS --out "$LOGS/kv_transfer.json"
fi
if wants kv-timeline; then
  TAIL=40 phase kv-timeline 60 "$FAILURE_RESERVE_S" $PY bench/kv_transfer.py --pairs 1:0 --paths direct --message-mib 512 \
    --tokens 1024,4096 --iters 3 --timeline --out "$LOGS/kv_timeline.json"
fi
if wants model; then
  wait "$MODEL_PID"; say "== model $(($(date +%s) - T0))s: $(tail -n 2 "$LOGS/model.log" | tr '\n' ' ')"
fi
# MESHES picks which of the two meshes the mesh phase runs, so that the comparison can span two
# device calls on one warm machine (the summary reads both calls' logs put side by side).
MESHES=${MESHES:-"disagg coloc"}
if wants mesh; then
  [[ " $MESHES " == *" disagg "* ]] && mesh disagg 50051 --prefill 1 --decode 1
  [[ " $MESHES " == *" coloc "* ]] && PDMESH_SCHEDULER_LOCAL_PREFILL_MAX_TOKENS=100000000 mesh coloc 51051 --prefill 0 --decode 2
fi
if wants mesh-slo; then  # the same two GPUs under the default slo policy: it may prefill on the decode GPU
  PDMESH_SCHEDULER_POLICY=slo mesh disagg-slo 52051 --prefill 1 --decode 1
fi
if wants failures; then
  # shellcheck disable=SC2086
  TAIL=12 phase failures $((FAILURE_RESERVE_S - 5)) 0 $PY bench/two_gpu_failures.py --model "$MODEL" \
    --device "$DEVICE" --out "$LOGS/failures.json" $FAILURE_ARGS
fi
$PY bench/two_gpu_summary.py "$LOGS" --out "$OUT/results.json" | tee -a "$OUT/summary.txt"
say "== total $(($(date +%s) - T0))s"
tar -czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOGS"
