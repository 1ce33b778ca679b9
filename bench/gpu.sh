#!/usr/bin/env bash
# The GPU measurements of issue 26 in one prepared run, for a session lent a GPU machine (nothing in CI needs one).
# The machine has torch (CUDA) but older transformers/peft than llmeraser works with: carry the wheels, once, here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl transformers==5.24.0 peft==0.21.2
# then run it there with `carry: [".whl"]` and a limit that leaves time to rerun:  bash bench/gpu.sh [SECONDS]
# Writes under $OUT (or bench/results/gpu): the device check (every method and solver on cuda, a random-weight
# TinyLlama-1.1B, 1,000 examples of 128 tokens) and bench/scale.py --gpu (TinyLlama-1.1B and LLaMA-2-7B shapes, bf16,
# LoRA r 8 q/v and r 16 on every linear layer, N = 1,000 and 10,000; each operation capped at SECONDS, default 90).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results/gpu}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="$PWD/src:/tmp/site"
else
    export PYTHONPATH="$PWD/src"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" \
    | tee -a "$out/gpu.txt"
python3 bench/device_check.py --device cuda --shape tinyllama-1.1b --n-train 1000 --out "$out/device-check" 2>&1 \
    | grep -v "it/s]" | tee "$out/device-check.log"
python3 bench/scale.py --gpu --n 1000 10000 --max-seconds "${1:-90}" --out "$out/scale" 2>&1 \
    | grep -v "it/s]" | tee "$out/scale.log"
