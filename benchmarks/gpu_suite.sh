#!/usr/bin/env bash
# Every GPU measurement of docs/benchmarks.md in one go (one machine, one warm cache):
# GPU tests, the model latency grid (graphs off/on, compile on), HTTP end to end against the real
# server with full-size random weights, and FlagGems vs native.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]        (default: $OUT, else /tmp/gpu_suite)
#   FLAGGEMS=0 skips the FlagGems part; QUICK=1 runs B=1 / 3 cameras / 10 steps only.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-/tmp/gpu_suite}}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export FLAGGEMS_CACHE_DIR="${FLAGGEMS_CACHE_DIR:-$HOME/.flaggems}"
PORT="${PORT:-9310}"
step() { echo "== $* ($(date +%T))"; }

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT_DIR/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$OUT_DIR/device.txt"

step "GPU tests"
python -m pytest -q -m "gpu or not gpu" tests/engine tests/ops/test_triton_fused.py \
  tests/ops/test_triton_image.py tests/ops/test_fp8.py tests/models/test_fused_model.py tests/models/test_pi0_model.py tests/models/test_pi0_processing.py \
  tests/serve/test_serve_codec.py tests/serve/test_serve_http.py \
  tests/serve/test_serve_image_decoder.py 2>&1 | tail -5 | tee "$OUT_DIR/pytest_gpu.txt"

step "fused kernels vs composed ops (expert layer shapes)"
python benchmarks/bench_kernels.py --batch 1 2 4 8 --out "$OUT_DIR/kernels.json"
python benchmarks/bench_kernels.py --batch 1 --copies 8 --out "$OUT_DIR/kernels_hbm.json"
python benchmarks/bench_kernels.py --batch 1 --copies 8 --phases --out "$OUT_DIR/layer_phases.json"
python benchmarks/bench_gpu_probes.py --out "$OUT_DIR/gpu_probes.json"
python benchmarks/profile_model.py --steps 1 > "$OUT_DIR/profile_steps1.txt" 2>&1

step "model latency"
if [ "${QUICK:-0}" = 1 ]; then grid=(--batch 1 --cameras 3 --steps 10); else
  grid=(--batch 1 2 3 4 5 6 7 8 --cameras 1 2 3 --steps 10 20); fi
python benchmarks/bench_model.py --graphs off on --fused on ops off --batch 1 --cameras 3 --steps 1 10 \
  --iters 30 --out "$OUT_DIR/model_b1.json" | grep '"ops"'
python benchmarks/bench_model.py --graphs on "${grid[@]}" --iters 20 --out "$OUT_DIR/model_grid.json" \
  | grep '"ops"'
python benchmarks/bench_model.py --graphs on --compile --batch 1 --cameras 3 --steps 10 --iters 30 \
  --out "$OUT_DIR/model_compile.json" | grep '"ops"'

step "HTTP end to end (full-size random weights)"
serve=(--config-path ./examples/pi0/conf --config-name serve experiment.exp_dir="$OUT_DIR/serve"
       serve.engine.port="$PORT" serve.engine.random_init=true serve.engine.preset=pi0
       serve.engine.model=null serve.engine.tokenizer=null)
if python run.py "${serve[@]}" action=run; then
  python benchmarks/bench_http.py --port "$PORT" --clients 1 4 8 --requests 50 \
    | tee "$OUT_DIR/http.jsonl"
  python benchmarks/bench_http.py --port "$PORT" --clients 1 4 8 --requests 50 --keep-alive \
    | tee "$OUT_DIR/http_keepalive.jsonl"
  for size in "224 224" "480 640"; do  # openpi websocket, uint8 frames
    python benchmarks/bench_openpi.py --port "$PORT" --requests 50 --size $size \
      | tee -a "$OUT_DIR/openpi_ws.jsonl"
  done
  python run.py "${serve[@]}" action=stop
fi
step "HTTP end to end, JPEGs decoded on the GPU (engine.image_decoder=gpu)"
if python run.py "${serve[@]}" serve.engine.image_decoder=gpu action=run; then
  python benchmarks/bench_http.py --port "$PORT" --clients 1 4 8 --requests 50 --keep-alive \
    | tee "$OUT_DIR/http_keepalive_gpu_decode.jsonl"
  python run.py "${serve[@]}" action=stop
fi

if [ "${FLAGGEMS:-1}" = 1 ] && python -c "import flag_gems" 2>/dev/null; then
  step "FlagGems vs native (autotuning: minutes on a cold cache)"
  python -m flagscale.tools.compare_backends --preset pi0 --random --cameras 3 --steps 10 \
    --latency 15 --graphs --cache-dir "$FLAGGEMS_CACHE_DIR" --timeout 1500 --out "$OUT_DIR/cmp" \
    --fused-kernels off \
    2>&1 | tail -40 | tee "$OUT_DIR/flaggems.txt"
  step "FlagGems vs native, both with the fused expert kernels (warm cache)"
  python -m flagscale.tools.compare_backends --preset pi0 --random --cameras 3 --steps 10 \
    --latency 15 --graphs --cache-dir "$FLAGGEMS_CACHE_DIR" --timeout 1500 --out "$OUT_DIR/cmp_fused" \
    --fused-kernels on \
    2>&1 | tail -40 | tee "$OUT_DIR/flaggems_fused.txt"
  step "both backends by batch, cameras and steps (fused expert kernels, graphs)"
  python benchmarks/bench_model.py --ops native flaggems --fused on --graphs on "${grid[@]}" \
    --iters 15 --out "$OUT_DIR/model_grid_backends.json" | grep '"ops"'
  step "FlagGems GPU tests (incl. the full-size whole-model comparison)"
  python -m pytest -q -m flaggems tests/ops/test_flaggems_gpu.py 2>&1 | tail -3 \
    | tee "$OUT_DIR/pytest_flaggems.txt"
fi
step "done: $OUT_DIR"
