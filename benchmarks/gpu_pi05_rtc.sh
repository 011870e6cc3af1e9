#!/usr/bin/env bash
# Pi0.5 and RTC on one GPU in one go: the GPU tests, Pi0 and Pi0.5 model latency (B = 1 and 8,
# 3 cameras, 10 steps; Pi0.5 also with fused_kernels true: its adaptive kernels), RTC-guided vs unguided at B = 1 (both gradient modes), and, when the peers'
# wheels are there, Pi0 beside FlagScale 0.8.0 / lerobot 0.4.4 and Pi0.5 beside lerobot's pi05
# (bench_peers.py). Ends with a summary of the ratios.
#
#   bash benchmarks/gpu_pi05_rtc.sh [OUT_DIR] [WHEELS_DIR]
#   (OUT_DIR default: $OUT, else /tmp/gpu_pi05_rtc; WHEELS_DIR default: .gpu/whl)
set -uo pipefail
cd "$(dirname "$0")/.."
O="${1:-${OUT:-/tmp/gpu_pi05_rtc}}"
W="${2:-.gpu/whl}"
mkdir -p "$O"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
step() { echo "== $* ($(date -u +%T))"; }
rows() { grep '"model_ms"' | python -c "import sys, json
for line in sys.stdin:
    r = json.loads(line)
    rtc = r.get('rtc') or {}
    extra = ' '.join(f\"{k} {v['p50']:.2f}\" for k, v in rtc.items() if isinstance(v, dict))
    print(r.get('precision', ''), 'B', r['batch'], 'steps', r['steps'],
          'p50 %.2f ms' % r['model_ms']['p50'], extra)"; }

step device
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$O/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$O/device.txt"

step "GPU tests (the model, op and engine layers; tests/serve needs the server packages)"
python -m pytest -q -m gpu tests/models tests/ops tests/engine 2>&1 | tail -5 | tee "$O/pytest_gpu.txt"

for preset in pi0 pi05; do  # fused_kernels auto, as served by default
  step "$preset latency, B = 1 and 8"
  python benchmarks/bench_model.py --preset "$preset" --fused auto --batch 1 8 --cameras 3 \
    --steps 10 --iters 20 --out "$O/model_$preset.json" | rows
done
step "pi05 latency with fused_kernels true (its adaptive kernels, not yet measured), B = 1 and 8"
python benchmarks/bench_model.py --preset pi05 --fused on --batch 1 8 --cameras 3 --steps 10 \
  --iters 20 --out "$O/model_pi05_fused.json" | rows

step "RTC guided vs unguided, B = 1 (inference_delay 5)"
python benchmarks/bench_model.py --batch 1 --cameras 3 --steps 10 --iters 20 --rtc 5 \
  --out "$O/model_rtc.json" | rows

if [ -d "$W" ]; then
  step "Pi0 beside FlagScale 0.8.0 and lerobot 0.4.4"
  python benchmarks/bench_peers.py --wheels "$W" --out "$O/peers_pi0.json" | tail -5
  step "Pi0.5 beside lerobot 0.4.4's pi05"
  python benchmarks/bench_peers.py --model pi05 --wheels "$W" --out "$O/peers_pi05.json" \
    | tail -4
fi

step summary
python - "$O" <<'EOF' | tee "$O/summary.txt"
import json, os, sys

out = sys.argv[1]


def p50(name, batch, key=None):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return None
    for r in json.load(open(path))["results"]:
        if r["batch"] == batch:
            return (r["rtc"][key] if key else r["model_ms"])["p50"]


for b in (1, 8):
    a, c = p50("model_pi0.json", b), p50("model_pi05.json", b)
    if a and c:
        print(f"B={b}: Pi0 {a:.2f} ms, Pi0.5 {c:.2f} ms, Pi0.5 / Pi0 {c / a:.3f} (target <= 1.15)")
    f = p50("model_pi05_fused.json", b)
    if a and c and f:
        print(f"B={b}: Pi0.5 with fused_kernels true {f:.2f} ms: {f / c:.3f}x auto, "
              f"{f / a:.3f}x Pi0")
plain = p50("model_rtc.json", 1)
for mode in ("lerobot", "vjp"):
    guided = p50("model_rtc.json", 1, f"{mode}_ms")
    if plain and guided:
        print(f"RTC ({mode}) B=1: guided {guided:.2f} ms vs unguided {plain:.2f} ms: "
              f"{guided / plain:.2f}x (target <= 2)")
EOF
step "done: $O"
