#!/bin/bash
# usage: ab.sh TAG OLD_REPO NEW_REPO PAIRS [extra bench_service flags]
# alternating pairs of `bench_service.py --mode mixed --rounds 3 --configs on`, each from its own checkout;
# one summary line per run in /tmp/s10/ab_TAG.log (session 10)
tag=$1; old=$2; new=$3; pairs=$4; shift 4
log=/tmp/s10/ab_$tag.log; : > $log
for i in $(seq 1 $pairs); do
  for side in old new; do
    repo=$old; [ $side = new ] && repo=$new
    out=$(cd $repo && HF_HUB_OFFLINE=1 timeout 900 /work/main/.venv/bin/python scripts/bench_service.py --mode mixed --rounds 3 --configs on --lone-requests 4 --out /tmp/s10/mx_${tag}_${side}_$i "$@" 2>&1 | grep "      on: small")
    echo "$side $i $out" >> $log
  done
done
