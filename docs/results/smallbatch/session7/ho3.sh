#!/bin/bash
D=docs/results/smallbatch/session7; export HF_HUB_OFFLINE=1
for s in "$@"; do for im in 200 400; do
nice -n 15 .venv/bin/python scripts/smallbatch_heldout.py --kind continual --models resnet --images $im --seed $s --variant 'base={}' --variant 'ch20={"guard": {"confident_hold_entropy": 0.2}}' --json $D/ho7_r3_c${im}s$s.json
done; done; echo DONE
