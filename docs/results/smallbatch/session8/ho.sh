#!/bin/bash
# usage: ho.sh TAG PREFIX VARIANT...   (PREFIX: "" or the patch path; env passes RD_*)
tag=$1; pre=$2; shift 2
V=(); for v in "$@"; do V+=(--variant "$v"); done
D=docs/results/smallbatch/session8
export HF_HUB_OFFLINE=1
for s in 1 2 3 4 5; do
  nice -n 15 .venv/bin/python $pre scripts/smallbatch_heldout.py --kind replay --replay-domains 12 --models resnet --seed $s "${V[@]}" --json $D/ho8_${tag}_rep$s.json
done
nice -n 15 .venv/bin/python $pre scripts/smallbatch_heldout.py --kind continual --models resnet --images 200 --seed 1 "${V[@]}" --json $D/ho8_${tag}_c200.json
for s in 1 2 3 4 5; do
  nice -n 15 .venv/bin/python $pre scripts/smallbatch_heldout.py --kind continual --models resnet --images 400 --seed $s "${V[@]}" --json $D/ho8_${tag}_c400s$s.json
done
echo DONE
