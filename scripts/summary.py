"""docs/results/summary.json: one row per (model, protocol, method) from the committed ``mgg bench`` results.

    python scripts/summary.py docs/results/r2_vit_reset docs/results/r2_vit_continual ... \
        --out docs/results/summary.json

Row fields: model; weights_sha256 (the classifier; mgg_sha256 too where the optimizer is MGG); protocol (the
setting's folder name) and its stream (profile, severity, batch size, reset); method; lr and where it came from;
mean_online_accuracy (mean over the domains of the online top-1 of the predictions made before each update, %);
updates_to_reach_tent_final (the number of updates after which the method's online-accuracy curve reaches TENT's
final online accuracy and stays at or above it; the predictions of batch k come from a model updated k - 1 times,
so this is ``batches_to_reference_final - 1``; null: never); tent_updates (TENT's updates over the same curve: per
domain when reset per domain, the whole stream when continual); fraction_of_tent_updates.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mgg_core.io import atomic_write_text

__all__ = ["rows_of", "main"]


def rows_of(folder: Path) -> list[dict]:
    res = json.loads((folder / "results.json").read_text())
    proto, summary = res["protocol"], res["summary"]
    ref = summary.get("_reference") or {}
    ref_updates = (ref.get("batches") or 0) - 1 if ref else None
    stream = proto.get("stream") or {}
    out = []
    for method, s in summary.items():
        if method.startswith("_"):
            continue
        k = s.get("batches_to_reference_final")
        upd = None if k is None else k - 1
        m = (proto.get("methods") or {}).get(method, {})
        opt = ((m.get("engine") or {}).get("optimizer") or {}).get("name")
        out.append({
            "model": proto.get("model"), "weights_sha256": proto.get("weights_sha256"),
            "protocol": folder.name, "profile": stream.get("profile", "imagenet-c"),
            "severity": proto.get("severity"), "batch_size": proto.get("batch_size"), "reset": proto.get("reset"),
            "method": method, "lr": m.get("lr"), "lr_source": m.get("lr_source"),
            "mean_online_accuracy": round(float(s["mean_accuracy"]), 2),
            "updates_to_reach_tent_final": upd, "tent_updates": ref_updates,
            "fraction_of_tent_updates": (None if upd is None or not ref_updates else round(upd / ref_updates, 3)),
            "tent_final_online_accuracy": None if not ref else round(float(ref["final_online_accuracy"]), 2),
            "mgg_sha256": proto.get("mgg_checkpoint_sha256") if opt == "mgg" else None,
        })
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", help="mgg bench output folders (each with results.json)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    rows = [r for f in args.folders for r in rows_of(Path(f))]
    atomic_write_text(args.out, json.dumps({"rows": rows}, indent=1) + "\n")
    print(f"{len(rows)} rows -> {args.out}")


if __name__ == "__main__":
    main()
