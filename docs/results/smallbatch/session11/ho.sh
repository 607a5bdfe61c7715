#!/bin/bash
# usage: PART=replay|continual|fresh|all ho.sh TAG VARIANT...   (PARTs may run side by side)
# replay/continual: session 8-10 held-out streams (files ho11_<tag>_rep<seed>.json, ho11_<tag>_c200.json,
# ho11_<tag>_c400s<seed>.json); fresh: the fresh-seed continual streams (seeds 6-10, 200 and 400 images per domain,
# files ho11_<tag>_c<images>s<seed>.json; pass base={} as a variant: base runs in the same invocations).
tag=$1; shift
V=(); for v in "$@"; do V+=(--variant "$v"); done
D=docs/results/smallbatch/session11
H="nice -n 10 .venv/bin/python scripts/smallbatch_heldout.py --models resnet --threads 1"
export HF_HUB_OFFLINE=1
if [ "${PART:-all}" = replay ] || [ "${PART:-all}" = all ]; then
  for s in 1 2 3 4 5; do
    $H --kind replay --replay-domains 12 --seed $s "${V[@]}" --json $D/ho11_${tag}_rep$s.json
  done
fi
if [ "${PART:-all}" = continual ] || [ "${PART:-all}" = all ]; then
  $H --kind continual --images 200 --seed 1 "${V[@]}" --json $D/ho11_${tag}_c200.json
  for s in 1 2 3 4 5; do
    $H --kind continual --images 400 --seed $s "${V[@]}" --json $D/ho11_${tag}_c400s$s.json
  done
fi
if [ "${PART:-all}" = fresh ]; then
  for s in 6 7 8 9 10; do
    for im in 200 400; do
      $H --kind continual --images $im --seed $s "${V[@]}" --json $D/ho11_${tag}_c${im}s$s.json
    done
  done
fi
echo DONE
