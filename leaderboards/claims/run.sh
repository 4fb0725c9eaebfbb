#!/usr/bin/env bash
# The SimCLR guide's five claims at CPU scale: one `sslbench compare --vary` grid per claim, 3 seeds,
# then leaderboards/claims/README.md from the rows. About 27 minutes on a 2-core Intel Xeon (see README.md).
#
#   bash leaderboards/claims/run.sh            # from the repository root (or anywhere)
#
# Re-running continues where it stopped: finished runs are neither retrained nor re-scored.
# The variables below can be overridden from the environment (a smoke test uses a few images and
# one epoch: EPOCHS=1 TRAIN_PER_CLASS=20 TEST_PER_CLASS=20 SEEDS=0,1 LINEAR_EPOCHS=2 FINETUNE_MIN_STEPS=2
# OUT=/tmp/x RUNS=/tmp/y DATA=/tmp/z).
set -euo pipefail
cd "$(dirname "$0")/../.."

SOURCE=${SOURCE:-../shared/data/cifar10-jpeg/cifar10-jpeg.tar.gz}  # CIFAR-10 as JPEG image folders
DATA=${DATA:-/tmp/sslbench-claims-cifar10}  # the subset image folder written from SOURCE
TRAIN_PER_CLASS=${TRAIN_PER_CLASS:-500}     # 5,000 training images
TEST_PER_CLASS=${TEST_PER_CLASS:-1000}      # the whole test split
EPOCHS=${EPOCHS:-8}
SEEDS=${SEEDS:-0,1,2}
LINEAR_EPOCHS=${LINEAR_EPOCHS:-30}
FINETUNE_MIN_STEPS=${FINETUNE_MIN_STEPS:-100}
RUNS=${RUNS:-runs/claims}                   # run directories (checkpoints, encoders): not committed
OUT=${OUT:-leaderboards/claims}             # the result rows <claim>.jsonl and README.md: committed

python benchmarks/claims.py prepare --source "$SOURCE" --out "$DATA" \
  --train-per-class "$TRAIN_PER_CLASS" --test-per-class "$TEST_PER_CLASS"
mkdir -p "$RUNS" "$OUT"

# The same data, model, budget and seeds for every grid; a run another grid has trained with the same
# config (the baseline: full augmentation, 2-layer projector, tau 0.5, batch 256) is reused, not retrained.
COMMON=(--methods simclr --backbone resnet18 --data "imagefolder:$DATA" --image-size 16 --epochs "$EPOCHS"
        --precision no --seeds "$SEEDS" --set backbone_kwargs.channels=16,32,64,128 --linear-epochs "$LINEAR_EPOCHS"
        --reuse-from "$RUNS" --quiet)

# claim: colour
sslbench compare "${COMMON[@]}" --batch-size 256 --vary aug.jitter_p=0,0.8 --vary aug.grayscale_p=0,0.2 --protocol knn,linear --output "$RUNS/colour" --results "$OUT/colour.jsonl" --plot "$OUT/colour.png"

# claim: projector
sslbench compare "${COMMON[@]}" --batch-size 256 --vary method_cfg.projector=none,linear,v1 --protocol knn,linear --features h,z --output "$RUNS/projector" --results "$OUT/projector.jsonl" --plot "$OUT/projector.png"

# claim: batch
sslbench compare "${COMMON[@]}" --vary batch_size=64,128,256,512 --protocol knn,linear --output "$RUNS/batch" --results "$OUT/batch.jsonl" --plot "$OUT/batch.png"

# claim: temperature
sslbench compare "${COMMON[@]}" --batch-size 256 --vary method_cfg.temperature=0.1,0.5,1.0 --protocol knn,linear --output "$RUNS/temperature" --results "$OUT/temperature.jsonl" --plot "$OUT/temperature.png"

# claim: v2
sslbench compare "${COMMON[@]}" --batch-size 256 --vary method_cfg.projector=v1,v2 --protocol finetune --features h,proj1 --label-fractions 0.01,0.1 --finetune-batch-size 64 --finetune-min-steps "$FINETUNE_MIN_STEPS" --output "$RUNS/v2" --results "$OUT/v2.jsonl" --plot "$OUT/v2.png"

python benchmarks/claims.py readme --rows "$OUT" --script leaderboards/claims/run.sh --output "$OUT/README.md"
