#!/bin/bash
# usage: PART=replay|continual|all ho.sh TAG VARIANT...   (two PARTs may run side by side)
tag=$1; shift
V=(); for v in "$@"; do V+=(--variant "$v"); done
D=docs/results/smallbatch/session8
H="nice -n 15 .venv/bin/python scripts/smallbatch_heldout.py --models resnet --threads 1"
export HF_HUB_OFFLINE=1
if [ "${PART:-all}" != continual ]; then
  for s in 1 2 3 4 5; do
    $H --kind replay --replay-domains 12 --seed $s "${V[@]}" --json $D/ho8_${tag}_rep$s.json
  done
fi
if [ "${PART:-all}" != replay ]; then
  $H --kind continual --images 200 --seed 1 "${V[@]}" --json $D/ho8_${tag}_c200.json
  for s in 1 2 3 4 5; do
    $H --kind continual --images 400 --seed $s "${V[@]}" --json $D/ho8_${tag}_c400s$s.json
  done
fi
echo DONE
