"""Summary of an alternating ``bench_service.py --mode mixed`` log (``== old N`` / ``== new N`` headers, then the
script's per-round lines): per side, the medians and quartiles over all rounds.

    python docs/results/fused/session9/summarize_log.py docs/results/fused/session9/mixed_alternating.log
"""
from __future__ import annotations

import re
import statistics
import sys

ROUND = re.compile(r"small\s+([\d.]+) img/s \(p50 (\d+) ms, p99 (\d+) ms.*big\s+([\d.]+) img/s.*ratio ([\d.]+)")


def main(path: str) -> None:
    side, rounds = None, {}
    with open(path) as f:
        for line in f:
            head = re.search(r"== (old|new)", line)
            if head:
                side = head.group(1)
                continue
            m = ROUND.search(line)
            if m:
                small, p50, p99, big, ratio = map(float, m.groups())
                rounds.setdefault(side, []).append((small, big, ratio, p50, p99))
    for name, rows in rounds.items():
        cols = list(zip(*rows, strict=True))
        med = [statistics.median(c) for c in cols]
        q_small, q_ratio = statistics.quantiles(cols[0], n=4), statistics.quantiles(cols[2], n=4)
        print(f"{name}: {len(rows)} rounds; 16x4 img/s median {med[0]:.0f} (IQR {q_small[0]:.0f}-{q_small[2]:.0f}); "
              f"2x64 median {med[1]:.0f}; ratio median {med[2]:.3f} (IQR {q_ratio[0]:.2f}-{q_ratio[2]:.2f}); "
              f"p50 {med[3]:.0f} ms, p99 {med[4]:.0f} ms")


if __name__ == "__main__":
    main(sys.argv[1])
