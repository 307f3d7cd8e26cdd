#!/usr/bin/env bash
# Distillation on the builtin corpus: from one student checkpoint and for the same number of steps,
# held-out perplexity after (a) the hard loss only, (b) a local teacher (full-vocabulary forward KL),
# (c) top-k KD through `nanogpt serve` at k = 5 and 20. Results: docs/distillation.md ("Measurements").
#
# usage: scripts/distill_experiment.sh [WORKDIR]   (default /tmp/kd; ~25 min on a shared 2-core CPU)
#
# Fixed seeds and --threads 1 per process make each run repeatable on one machine. Scale knobs (env):
# S0_ITERS, TEACHER_ITERS, KD_ITERS, KD_LR, PORT; the table in the doc used the defaults below.
set -euo pipefail

WORK=${1:-/tmp/kd}
S0_ITERS=${S0_ITERS:-60}
TEACHER_ITERS=${TEACHER_ITERS:-100}
KD_ITERS=${KD_ITERS:-30}
KD_LR=${KD_LR:-5e-4}
PORT=${PORT:-8765}

mkdir -p "$WORK"
cd "$WORK"
: >times.txt
timed() { # timed NAME CMD...: run CMD, append "NAME SECONDS" to times.txt
    local name=$1 t0
    shift
    t0=$(date +%s.%N)
    "$@"
    echo "$name $(echo "$(date +%s.%N) - $t0" | bc)" >>times.txt
}

# 1. data: 1.48M train + 85.5K val tokens (2 held-out works)
nanogpt prepare --source builtin --out data/builtin --quiet

# 2. student start S0 (tiny: d128, 4 layers, context 128, 60 steps) and 3. a larger teacher T
# (d256, 4 layers, context 128, 100 steps), side by side, one thread each
echo '{"d_model": 256, "n_layers": 4, "n_heads": 4, "d_ff": 1024, "context_length": 128, "dropout": 0.0}' \
    >teacher.json
COMMON="--data data/builtin --batch-size 16 --warmup-iters 10 --eval-interval 50 --eval-iters 10"
COMMON="$COMMON --seed 1337 --threads 1 --no-progress"
timed T nanogpt train --config teacher.json --out T --learning-rate 2e-3 --min-lr 2e-4 \
    --max-iters "$TEACHER_ITERS" $COMMON >T.log 2>&1 &
timed S0 nanogpt train --preset tiny --out S0 --learning-rate 2e-3 --min-lr 2e-4 \
    --max-iters "$S0_ITERS" $COMMON >S0.log 2>&1

# 4. from S0 (its best/ equals last/ here), KD_ITERS steps each: same batches (seed), same constant lr,
# no warmup. (a) and the S0 eval run while the teacher still trains. Evals: full val split, stride =
# context (128), of each run's last/ (a run's best/ may be its step-0 copy of S0).
KD="--data data/builtin --batch-size 16 --learning-rate $KD_LR --min-lr $KD_LR --warmup-iters 0"
KD="$KD --max-iters $KD_ITERS --eval-interval $KD_ITERS --eval-iters 10 --seed 1337 --threads 1 --no-progress"
EVAL="--data data/builtin --split val --json"
timed a_hard nanogpt train --init-from S0 --out a_hard $KD >a_hard.log 2>&1 &
nanogpt eval --model S0/last $EVAL >eval_S0.json
wait # a_hard and the teacher
nanogpt eval --model a_hard/last $EVAL >eval_a_hard.json &
nanogpt eval --model T/last $EVAL >eval_T.json &

# (b), (c5) and (c20) side by side: one local-teacher run and two clients of one server
nanogpt serve --model T --name T --port "$PORT" --threads 1 2>serve.log &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break || sleep 1; done
timed b_local nanogpt distill --student S0 --teacher T --alpha 0.5 --temperature 1 --kind forward_kl \
    --out b_local $KD >b_local.log 2>&1 &
KD_PIDS=$!
API="completions:T@http://127.0.0.1:$PORT/v1"
for k in 5 20; do
    timed "c_k$k" nanogpt distill --student S0 --teacher "$API" --top-k "$k" --alpha 0.5 --temperature 1 \
        --out "c_k$k" $KD >"c_k$k.log" 2>&1 &
    KD_PIDS="$KD_PIDS $!"
done
wait $KD_PIDS # the three distillations (the server keeps running)
kill $SERVER
for r in b_local c_k5 c_k20; do nanogpt eval --model $r/last $EVAL >eval_$r.json & done
wait

# 5. the table (s/step from each run's own wall time; the machine may be shared)
echo "server: $(grep -c 'POST /v1/completions' serve.log) POST /v1/completions requests"
python - "$KD_ITERS" "$S0_ITERS" "$TEACHER_ITERS" <<'PY'
import json, sqlite3, sys

kd, s0, t = (int(a) for a in sys.argv[1:])
times = dict(line.split() for line in open("times.txt"))
steps = {"S0": s0, "T": t}
print("| run | steps | val loss (nats) | ppl | bits/byte | wall s | s/step | teacher answers cached |")
print("|---|---|---|---|---|---|---|---|")
for r in ["S0", "T", "a_hard", "b_local", "c_k5", "c_k20"]:
    e = json.load(open(f"eval_{r}.json"))
    n, sec = steps.get(r, kd), float(times[r])
    rows = ""
    if r.startswith("c_"):
        rows = sqlite3.connect(f"{r}.teacher/cache.sqlite").execute("select count(*) from answers").fetchone()[0]
    print(f"| {r} | {n} | {e['mean_nll']:.4f} | {e['perplexity']:.1f} | {e['bits_per_byte']:.4f} "
          f"| {sec:.0f} | {sec / n:.2f} | {rows} |")
PY
