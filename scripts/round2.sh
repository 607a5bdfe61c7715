#!/usr/bin/env bash
# Round 2 of the MNIST-5k benchmark: every committed number of docs/results.md "Round 2" (run from the repo root).
#   bash scripts/round2.sh [pretrain] [bench] [summary]      (default: all three)
# Protocol: CIFAR-10-C corruption constants (--profile cifar-c), severity 5, the 15 test corruptions of the
# MNIST-5k TEST split (1,000 images each), batch 16 (63 batches = 63 update opportunities per domain), one online
# pass; reset per domain and continual. Step sizes of every gradient method (MGG's included) are chosen on the 4
# held-out corruptions of a 500-image validation subset of the TRAIN split, under both corruption profiles
# (8 held-out domains), with the test stream's batch size and reset policy.
set -euo pipefail
export HF_HUB_OFFLINE=1
MGG=${MGG:-.venv/bin/mgg}
steps=${*:-pretrain bench summary}
G=1e-3,3e-3,1e-2,3e-2,1e-1,3e-1
COMMON=(--profile cifar-c --batch-size 16 --heldout-profiles cifar-c imagenet-c --val-images 500 --sweep-lrs $G
        --no-progress)
declare -A ALPHA=([vit]=1e-2 [resnet]=1e-3) VAL_LR=([vit]=3e-2 [resnet]=1e-2)

for kind in vit resnet; do
  ckpt=mgg_core/assets/mgg_mnist5k_test_${kind}_r2.safetensors
  if [[ $steps == *pretrain* ]]; then
    # MGG meta-training: 512 TRAIN images over the 4 held-out corruptions x severities 3,4,5 x both profiles,
    # batch 2, truncation 1; the epoch kept is the best on the 8 held-out validation domains at batch 16
    time nice -n 10 "$MGG" pretrain --classifier $kind --out $ckpt --profiles cifar-c imagenet-c --severities 3 4 5 \
      --samples 512 --batch-size 2 --val-batch-size 16 --alpha-train ${ALPHA[$kind]} --val-lr ${VAL_LR[$kind]} \
      --epochs 4 --no-progress
  fi
  if [[ $steps == *bench* ]]; then
    # the classic methods, COME and ROID (independent of the MGG checkpoint, so they could start before it existed)
    for reset in per_domain never; do
      name=$([[ $reset == per_domain ]] && echo reset || echo continual)
      time nice -n 10 "$MGG" bench --classifier $kind --out docs/results/r2_${kind}_${name} --reset $reset \
        --methods noadapt bn tent eata sar deyo foa come roid "${COMMON[@]}"
      # MGG (FOA loss + the round-2 GML), with TENT again as the reference of "updates to reach TENT's final"
      time nice -n 10 "$MGG" bench --classifier $kind --mgg-checkpoint $ckpt --out docs/results/r2_${kind}_${name}_mgg \
        --reset $reset --methods noadapt tent mgg "${COMMON[@]}"
    done
  fi
done
if [[ $steps == *summary* ]]; then
  .venv/bin/python scripts/summary.py docs/results/r2_{vit,resnet}_{reset,continual}{,_mgg} --out docs/results/summary.json
  .venv/bin/python scripts/contact_sheet.py --out docs/corruptions_severity5.png
fi
