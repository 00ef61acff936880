#!/usr/bin/env bash
# The record of what ran on the H200 lent on 2026-12-04 (docs/reproduction.md, "On one GPU"); kept as run, not
# a tool. It ran from the repository root of a copy of the working tree, with the CIFAR-10 tarball and
# ../shared/data/imagenet-samples copied into the git-ignored .carry/ (../shared does not travel), and $OUT a
# folder whose files came back. Two calls followed on the same machine:
#   python3 -m cli.main train --recipe cifar-paper --arch resnet20 --data data/cifar10-jpeg \
#       --output-dir runs/gpu-resnet20 --compile reduce-overhead --no-progress --no-tensorboard --resume auto
#   python3 -m training.benchmark --device cuda --nets resnet20 --compile reduce-overhead --steps 300 --warmup 30
# Issue #8 on the lent GPU, in one call: every step is bounded so the whole ends by END_S seconds and its outputs
# come back from $OUT (at most 8 files).
set -u
END_S=${END_S:-560}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
T0=$(date +%s)
LOG=$OUT/session.log
elapsed() { echo $(($(date +%s) - T0)); }
say() { echo "=== [$(elapsed)s] $*" | tee -a "$LOG"; }
step() { # step LIMIT_S command...: run with a time limit, log, report exit code and seconds
    local limit=$1 start rc
    shift
    say "$*"
    start=$(date +%s.%N)
    timeout --signal=TERM --kill-after=20 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    say "rc=$rc after $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s"
    return $rc
}

{ nvidia-smi; nproc; python3 -c "import torch, torchvision, sys; print(sys.version); print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name(0), 'cudnn', torch.backends.cudnn.version())"; } >>"$LOG" 2>&1

mkdir -p data runs
step 120 python3 -m training.cifar --tarball .carry/cifar10-jpeg.tar.xz --data-path data

# 1. time per iteration: our loop vs the stock loop (eager), ResNet-20 and ResNet-50
step 120 python3 -m training.benchmark --device cuda --nets resnet20,resnet50 --steps 100 --warmup 20

# 2. the full 64k-iteration cifar-paper ResNet-20, CUDA graphs; eager if the compiled run fails outright
step 280 python3 -m cli.main train --recipe cifar-paper --arch resnet20 --data data/cifar10-jpeg \
    --output-dir runs/gpu-resnet20 --compile reduce-overhead --no-progress --no-tensorboard
rc=$?
if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 143 ] && [ "$(elapsed)" -lt 200 ]; then
    step $((END_S - 200 - $(elapsed))) python3 -m cli.main train --recipe cifar-paper --arch resnet20 \
        --data data/cifar10-jpeg --output-dir runs/gpu-resnet20-eager --no-progress --no-tensorboard
fi

# 3. the paper set's unfinished nets, sharing the GPU, until END_S (records come back; the same command continues)
limit=$((END_S - 40 - $(elapsed)))
if [ $limit -gt 90 ]; then
    say "reproduce for ${limit}s"
    timeout --signal=TERM --kill-after=30 $((limit + 30)) python3 -m training.reproduce run --data data/cifar10-jpeg \
        --archs resnet56 plain56 resnet110 --concurrent 3 --time-limit "$limit" >"$OUT/reproduce.log" 2>&1 &
    reproduce=$!
fi

# 4. imagenet-paper ResNet-50 smoke run under torchrun on the GPU, then 10-crop evaluation (beside step 3)
python3 - >>"$LOG" 2>&1 <<'EOF'
import shutil
from pathlib import Path
for photo in sorted(Path(".carry/imagenet-samples").glob("*.JPEG")):
    wnid = photo.name.split("_")[0]
    for split, copies in (("train", 6), ("val", 1)):
        folder = Path("data/imagenet-small") / split / wnid
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(copies):
            shutil.copy(photo, folder / f"{photo.stem}_{i}.JPEG")
print("imagenet-small:", sum(1 for _ in Path("data/imagenet-small").rglob("*.JPEG")), "images")
EOF
step 120 python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m cli.main train \
    --recipe imagenet-paper --arch resnet50 --data data/imagenet-small --output-dir runs/gpu-r50 \
    --batch-size 32 --iterations 30 --lr-milestones 15,25 --checkpoint-every 10 --eval-every 30 --log-every 5 \
    --workers 6 --amp bf16 --channels-last --no-progress --no-tensorboard
step 60 python3 -m cli.main evaluate --checkpoint runs/gpu-r50/best.pt --data data/imagenet-small --ten-crop \
    --workers 6 --json

if [ -n "${reproduce:-}" ]; then
    wait "$reproduce"
    say "reproduce rc=$?"
fi

# What comes back: the runs' small files (and the GPU ResNet-20's final checkpoint), each unfinished net's record.
tar czf "$OUT/gpu-runs.tgz" --exclude='*.pt' --exclude='*.tfevents*' runs/gpu-* >>"$LOG" 2>&1
last=$(ls runs/gpu-resnet20*/checkpoint-*.pt 2>/dev/null | sort | tail -1)
[ -n "$last" ] && cp "$last" "$OUT/gpu-resnet20-last.pt"
for net in resnet56 plain56 resnet110; do
    [ -d docs/reproduction-runs/$net ] && tar czf "$OUT/record-$net.tgz" docs/reproduction-runs/$net runs/reproduce/$net/train.log
done
tar czf "$OUT/docs.tgz" docs/reproduction.md docs/img/cifar10-figure6.png >>"$LOG" 2>&1
say "done"
