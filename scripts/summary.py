"""docs/results/summary.json: one row per (model, protocol, method) from the committed round-2 ``mgg bench`` folders.

    python scripts/summary.py docs/results --out docs/results/summary.json [--plots]

A setting (model x reset policy) may be split over several bench folders ``r2_<kind>_<reset|continual>_<part>``
(methods run as separate jobs: same stream, same held-out sweep protocol); the folders of one setting are joined
here, and TENT's curve (in one of them) is the reference of every method's "updates to reach TENT's final".
Stream variants (scripts/round2.sh VARIANTS) are folders ``r2_<kind>_<reset|continual>-<variant>_<part>``, e.g.
``r2_resnet_continual-dirichlet0.1_all``: a setting of their own (protocol ``<kind>_<policy>-<variant>``, rows with
``variant`` and ``label_shift`` fields); a batch-size sweep folder (``--batch-sizes``: ``batch_<B>/results.json``)
gives one setting per size, ``<kind>_<policy>-<variant>-b<B>``. The i.i.d. rows keep their fields.

Row fields: model; weights_sha256 (the classifier; mgg_sha256 too where the optimizer is MGG); protocol
(``<kind>_<reset>``) and its stream (profile, severity, batch size, reset); method; lr and where it came from;
mean_online_accuracy (mean over the domains of the online top-1 of the predictions made before each update, %);
updates_to_reach_tent_final (the number of updates after which the method's online-accuracy curve reaches TENT's
final online accuracy and stays at or above it; the predictions of batch k come from a model updated k - 1 times,
so this is the batch count minus one; null: never); tent_updates (TENT's updates over the same curve: per domain
when reset per domain, the whole stream when continual); fraction_of_tent_updates.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mgg_core.bench.report import batches_to_reach, online_curve, plot_curves
from mgg_core.bench.runner import DomainResult
from mgg_core.io import atomic_write_text

__all__ = ["load_settings", "main", "reset_of", "rows_of"]

POLICIES = {"reset": "domain", "continual": "never"}


def reset_of(policy: str) -> str:
    """The curve's reset policy of a setting's policy, variants included ("continual-dirichlet0.1" -> "never")."""
    return POLICIES[policy.split("-", 1)[0]]


def _from_cache(folder: Path, policy: str, n_domains: int = 15) -> dict:
    """Results of a bench job stopped before it wrote results.json: the methods whose every domain is in its
    per-(method, domain) cache, with the lr its held-out sweep cache picks (the same argmax as ``sweep_lrs``)."""
    reset = reset_of(policy)
    results: dict[str, list] = {}
    methods: dict[str, dict] = {}
    sweep: dict[str, dict[str, float]] = {}
    for mdir in sorted((folder / "cache" / f"reset-{reset}").glob("*")):
        files = sorted(mdir.glob("[0-9][0-9][0-9]_*.json"))
        if len(files) < n_domains:
            continue
        results[mdir.name] = [json.loads(f.read_text()) for f in files]
    for sdir in sorted((folder / "cache" / f"sweep-{reset}").glob("*@*"), key=lambda p: float(p.name.split("@")[1])):
        m, lr = sdir.name.split("@")
        accs = [json.loads(f.read_text())["accuracy"] for f in sorted(sdir.glob("[0-9][0-9][0-9]_*.json"))]
        if accs:
            sweep.setdefault(m, {})[lr] = float(np.mean(accs))
    for m in results:
        if m in sweep:
            lr = max(sweep[m], key=lambda k: sweep[m][k])
            methods[m] = {"lr": float(lr), "lr_source": "held-out sweep (from the job's cache: stopped before "
                                                        "results.json)"}
        else:
            methods[m] = {"lr": None, "lr_source": None}
    return {"results": results, "protocol": {"methods": methods,
                                             "lr_sweep": {"held_out_mean_accuracy": sweep}}}


def load_settings(root: Path) -> dict[tuple[str, str], dict]:
    """(kind, "reset" | "continual") -> joined setting: results, protocol, lrs, sweeps, folders."""
    out: dict[tuple[str, str], dict] = {}
    partial: list[tuple[str, str, Path]] = []
    for folder in sorted(root.glob("r2_*_*_*")):
        if not folder.is_dir():
            continue
        _, kind, policy, _part = folder.name.split("_", 3)
        for sub in sorted(folder.glob("batch_*/results.json"), key=lambda f: int(f.parent.name.split("_")[1])):
            _add(out, kind, f"{policy}-b{sub.parent.name.split('_')[1]}", folder, json.loads(sub.read_text()))
        if (folder / "batch_size_sweep.json").is_file():
            continue
        if not (folder / "results.json").is_file():
            partial.append((kind, policy, folder))
            continue
        _add(out, kind, policy, folder, json.loads((folder / "results.json").read_text()))
    for kind, policy, folder in partial:
        if (kind, policy) in out:                 # the stream's protocol comes from a finished job of the setting
            res = _from_cache(folder, policy)
            if res["results"]:
                res["protocol"] = dict(out[(kind, policy)]["protocol"], **res["protocol"])
                _add(out, kind, policy, folder, res, partial=True)
    return out


def _add(out: dict, kind: str, policy: str, folder: Path, res: dict, partial: bool = False) -> None:
    st = out.setdefault((kind, policy), {"results": {}, "methods": {}, "sweep": {}, "folders": [],
                                         "protocol": res["protocol"], "mgg_sha256": None})
    st["folders"].append(folder.name + (" (stopped; finished methods read from its cache)" if partial else ""))
    for m, rs in res["results"].items():
        st["results"].setdefault(m, [DomainResult.from_dict(r) for r in rs])
    for m, d in res["protocol"]["methods"].items():
        st["methods"].setdefault(m, d)
    sweep = (res["protocol"].get("lr_sweep") or {}).get("held_out_mean_accuracy") or {}
    for m, accs in sweep.items():
        st["sweep"].setdefault(m, accs)
    if res["protocol"].get("mgg_checkpoint_sha256") and not partial:
        st["mgg_sha256"] = res["protocol"]["mgg_checkpoint_sha256"]


def rows_of(kind: str, policy: str, st: dict) -> list[dict]:
    reset = reset_of(policy)
    variant = {"variant": policy.split("-", 1)[1],
               "label_shift": (st["protocol"].get("stream") or {}).get("label_shift")} if "-" in policy else {}
    curves = {m: online_curve(rs, reset) for m, rs in st["results"].items()}
    proto, stream = st["protocol"], st["protocol"].get("stream") or {}
    target = float(curves["tent"][-1]) if "tent" in curves else None
    n_ref = len(curves["tent"]) - 1 if "tent" in curves else None
    rows = []
    for m, rs in st["results"].items():
        k = batches_to_reach(curves[m], target) if target is not None else None
        upd = None if k is None else k - 1
        info = st["methods"].get(m, {})
        opt = ((info.get("engine") or {}).get("optimizer") or {}).get("name")
        rows.append({
            "model": proto.get("model"), "weights_sha256": proto.get("weights_sha256"),
            "protocol": f"{kind}_{policy}", "profile": stream.get("profile", "imagenet-c"),
            "severity": proto.get("severity"), "batch_size": proto.get("batch_size"), "reset": proto.get("reset"),
            "method": m, "lr": info.get("lr"), "lr_source": info.get("lr_source"),
            "mean_online_accuracy": round(float(np.mean([r.accuracy for r in rs])), 2),
            "updates_to_reach_tent_final": upd, "tent_updates": n_ref,
            "fraction_of_tent_updates": None if upd is None or not n_ref else round(upd / n_ref, 3),
            "tent_final_online_accuracy": None if target is None else round(target, 2),
            "mgg_sha256": st["mgg_sha256"] if opt == "mgg" else None, **variant,
        })
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", help="folder holding the r2_* bench folders")
    ap.add_argument("--out", required=True)
    ap.add_argument("--plots", action="store_true", help="also write ROOT/r2_<kind>_<policy>.png (joined curves)")
    args = ap.parse_args(argv)
    root = Path(args.root)
    loaded = load_settings(root)   # the i.i.d. settings first (their rows as before), then the stream variants
    settings = dict(sorted(loaded.items(), key=lambda kv: "-" in kv[0][1]))
    rows = [r for (kind, policy), st in settings.items() for r in rows_of(kind, policy, st)]
    folders = {f"{k}_{p}": st["folders"] for (k, p), st in settings.items()}
    atomic_write_text(args.out, json.dumps({"folders": folders, "rows": rows}, indent=1) + "\n")
    if args.plots:
        for (kind, policy), st in settings.items():
            bs = int(st["protocol"].get("batch_size") or 16)
            plot_curves(st["results"], reset_of(policy), root / f"r2_{kind}_{policy}.png",
                        f"{kind}, {policy}: online accuracy (cifar-c, severity 5, batch {bs})",
                        batch_size=bs, highlight=("mgg",))
    print(f"{len(rows)} rows -> {args.out}")


if __name__ == "__main__":
    main()
