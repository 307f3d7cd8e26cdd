#!/usr/bin/env bash
# The CUDA checks and the GPU figures of docs/benchmarks.md, in one script for a GPU machine that has
# PyTorch and transformers but no network (wheels of other dependencies may sit in .whl/).
#
#   scripts/gpu_checks.sh checks   # pytest -m gpu, the card bench fp32 and bf16 + compile vs HF, a timed
#                                  # sample of the card's training recipe
#   scripts/gpu_checks.sh recipe-base  # the card's recipe, stage 1: 20K base iterations (~6-7 min on an H200)
#   scripts/gpu_checks.sh recipe-kd    # stage 2: 15K distillation iterations from runs/base (same machine)
#
# The two recipe stages are two commands because each must stay under the device tool's 10 minutes; with
# 15 minutes of device time in all, run them first, on a fresh budget, with nothing else, and the second
# right after the first: runs/base only survives on the same warm machine (given back after ~30 s idle).
#
# Logs and results go to $OUT (default gpu_out/); every step has its own time limit.
set -u
stage=${1:-checks}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
log="$OUT/gpu.log"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

step() {  # step LIMIT_S CMD...: run, log everything, print the tail
    local limit=$1 t0 rc
    shift
    echo "== $* (limit ${limit}s)" | tee -a "$log"
    t0=$(date +%s)
    timeout "$limit" "$@" >"$OUT/step.txt" 2>&1
    rc=$?
    cat "$OUT/step.txt" >>"$log"
    tail -n 25 "$OUT/step.txt"
    echo "== rc=$rc in $(($(date +%s) - t0)) s" | tee -a "$log"
}
ng="python3 -m nanogpt.cli"

step 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step 30 python3 -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
step 60 $ng prepare --source builtin --out data/builtin --quiet

if [ "$stage" = checks ]; then
    step 240 python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider
    step 120 $ng bench --preset card --peers --device cuda --dtype fp32 --repeats 5 --out "$OUT/fp32"
    step 180 $ng bench --preset card --peers --device cuda --dtype bf16 --compile --repeats 5 --out "$OUT/bf16"
    step 120 python3 scripts/profile_step.py --device cuda --dtype bf16 --compile --batch 12
    # a sample of the card's base recipe (batch 12 x 512, lr 3e-4 cosine, eval every 500) in bf16 + compile
    step 180 $ng train --preset card --data data/builtin --out runs/sample --device cuda --dtype bf16 \
        --compile --max-time 100 --no-progress
    cp runs/sample/log.jsonl "$OUT/sample_log.jsonl" 2>/dev/null
elif [ "$stage" = recipe-base ]; then
    # 20K steps at 16.5 ms (measured with the evaluations) = 330 s, plus compilation and data
    step 540 $ng train --preset card --data data/builtin --out runs/base --device cuda --dtype bf16 \
        --compile --no-progress
    cp runs/base/log.jsonl "$OUT/base_log.jsonl" 2>/dev/null
    cp runs/base/loss.png "$OUT/base_loss.png" 2>/dev/null
elif [ "$stage" = recipe-kd ]; then
    if [ ! -f runs/base/last/model.safetensors ]; then
        echo "runs/base is missing: run recipe-base first, on the same machine" | tee -a "$log" >&2
        exit 2
    fi
    # the card's teacher (GPT-OSS-20B behind an API) cannot be reached from the device: the base model
    # teaches itself, which times the stage's loop with one local teacher forward per step
    step 570 $ng distill --preset card --student runs/base --teacher runs/base --teacher-dtype bf16 \
        --data data/builtin --out runs/kd --device cuda --dtype bf16 --compile --no-progress
    cp runs/kd/log.jsonl "$OUT/kd_log.jsonl" 2>/dev/null
else
    echo "unknown stage $stage: use checks, recipe-base or recipe-kd" >&2
    exit 2
fi
rm -f "$OUT/step.txt"
