#!/usr/bin/env bash
# Prepared for the next session lent a GPU (issue #8); NOT yet run on one. It answers, in this order, what the
# 2026-12-04 H200 session left open (docs/reproduction.md, "On one GPU"):
#   1. the full 64k-iteration cifar-paper ResNet-20 (FP32, CUDA graphs, channels-last) timed against the
#      3-minute target, evaluating and checkpointing every 4k iterations instead of every epoch (31 s of the 288
#      on 2026-12-04);
#   2. the stock loop under CUDA graphs, timed again now that each loop gets fresh compiler state, and a
#      torch.profiler trace of our graphed ResNet-20 step (kernel time vs the 3.4-3.5 ms step);
#   3. bf16 autocast for the same net, 3,000 steps (the lever left if the kernels fill the step; the
#      reproduction itself stays FP32), against step 1's FP32 steps.
# The paper set needs no GPU any more: all nine nets finished on the CPU.
# Use: copy ../shared/data/cifar10-jpeg.tar.xz into the git-ignored .carry/, then in one device call:
#   run(command="OUT=$OUT bash docs/gpu-runs/next-session.sh", carry=[".carry"], timeout_s=600)
# Every step is bounded so the whole ends by END_S seconds; its outputs come back from $OUT. Dry run on a CPU:
#   OUT=/tmp/out DEVICE=cpu TINY=1 END_S=400 bash docs/gpu-runs/next-session.sh
set -u
END_S=${END_S:-540}
DEVICE=${DEVICE:-cuda}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
T0=$(date +%s)
LOG=$OUT/session.log
elapsed() { echo $(($(date +%s) - T0)); }
within() { # within RESERVE_S CAP_S: seconds left before END_S - RESERVE_S, at most CAP_S
    local left=$((END_S - $1 - $(elapsed)))
    echo $((left < $2 ? left : $2))
}
say() { echo "=== [$(elapsed)s] $*" | tee -a "$LOG"; }
step() { # step LIMIT_S command...: run with a time limit, log, report exit code and seconds
    local limit=$1 start rc
    shift
    if [ "$limit" -lt 30 ]; then # timeout 0 would mean no limit, a negative one an error: skip instead
        say "skipped, ${limit}s left: $*"
        return 124
    fi
    say "$*"
    start=$(date +%s.%N)
    timeout --signal=TERM --kill-after=20 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    say "rc=$rc after $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s"
    return $rc
}

if [ -n "${TINY:-}" ]; then # CPU dry run: every step, tiny sizes, no compilation
    BENCH=(--steps 2 --warmup 1 --cifar-images 512 --stock-workers 0 --profile-steps 2)
    COMPILE=none ITERATIONS=20 FULL_ITERATIONS=40 EVERY=20
else
    BENCH=(--steps 300 --warmup 30 --profile-steps 20)
    COMPILE=reduce-overhead ITERATIONS=3000 FULL_ITERATIONS=64000 EVERY=4000
fi

{ nvidia-smi; nproc; git log --oneline -1; python3 -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version())"; } >>"$LOG" 2>&1

mkdir -p data runs
step 120 python3 -m training.cifar --tarball .carry/cifar10-jpeg.tar.xz --data-path data

train() { # train LIMIT_S NAME AMP ITERATIONS EVERY: the cifar-paper ResNet-20 with CUDA graphs
    step "$1" python3 -m cli.main train --recipe cifar-paper --arch resnet20 --data data/cifar10-jpeg \
        --output-dir "runs/gpu-resnet20-$2" --device "$DEVICE" --compile "$COMPILE" --amp "$3" --channels-last \
        --iterations "$4" --eval-every "$5" --checkpoint-every "$5" --log-every 50 --no-progress --no-tensorboard
}

# 1. the whole schedule, FP32; stopped by its limit it checkpoints and its metrics still time the steps
train "$(within 210 400)" full-fp32 none "$FULL_ITERATIONS" "$EVERY"

# 2. ours vs stock with CUDA graphs, each loop with fresh compiler state; then a profile of our step
step "$(within 90 150)" python3 -m training.benchmark --device "$DEVICE" --nets resnet20 --compile "$COMPILE" \
    "${BENCH[@]}" --profile "$OUT/resnet20-step-trace.json" &&
    gzip -f "$OUT/resnet20-step-trace.json" # a file comes back only under 16 MiB

# 3. bf16 autocast, 3,000 steps (metrics.jsonl img_per_s, summary.json)
limit=$(within 20 110)
[ "$limit" -gt 60 ] && train "$limit" bf16 bf16 "$ITERATIONS" "$ITERATIONS"

# What comes back (3 files, 8 allowed): the log, the trace, the training runs' small files.
tar czf "$OUT/gpu-runs.tgz" --exclude='*.pt' --exclude='*.tfevents*' runs/gpu-* >>"$LOG" 2>&1
say "done"
