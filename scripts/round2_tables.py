"""Markdown tables of round 2 (docs/results.md) from the committed bench folders; prints to stdout.

    python scripts/round2_tables.py docs/results          # reads r2_{vit,resnet}_{reset,continual}_<part>

Stream variants (folders r2_<kind>_<policy>-<variant>_<part>) get their own tables after the four i.i.d. settings.

A setting's bench folders (methods run as separate jobs) are joined by ``scripts/summary.py``'s ``load_settings``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mgg_core.bench.report import summarize

__all__ = ["load_setting", "main", "variant_title"]

SETTINGS = [("vit", "reset", "ViT, reset per domain"), ("vit", "continual", "ViT, continual"),
            ("resnet", "reset", "ResNet, reset per domain"), ("resnet", "continual", "ResNet, continual")]
ORDER = ["noadapt", "bn", "tent", "eata", "sar", "deyo", "foa", "come", "roid", "mgg"]
RIVALS = ["tent", "eata", "sar", "deyo", "foa", "come", "roid"]
CHANCE = 12.0     # 10 classes: a domain "at chance" when its online accuracy is below 12%


def load_setting(root: Path, kind: str, reset: str) -> dict | None:
    """{"summary", "lrs", "sweep", "ref"} of one setting (its bench folders joined), or None when not run."""
    from summary import load_settings, reset_of

    st = load_settings(root).get((kind, reset))
    if st is None:
        return None
    return {"summary": summarize(st["results"], reset_of(reset)), "sweep": st["sweep"],
            "lrs": {m: d.get("lr") for m, d in st["methods"].items()},
            "ref": summarize(st["results"], reset_of(reset)).get("_reference", {})}


def variant_title(kind: str, policy: str) -> str:
    """'resnet', 'continual-dirichlet0.1' -> 'ResNet, continual, Dirichlet(0.1)' ('-batch64-4-b64' -> batch 64)."""
    base, *rest = policy.split("-")
    words = [{"vit": "ViT", "resnet": "ResNet"}.get(kind, kind), "reset per domain" if base == "reset" else base]
    for r in rest:
        if r.startswith("dirichlet"):
            words.append(f"Dirichlet({r[len('dirichlet'):]}) label shift")
        elif r.startswith("b") and r[1:].isdigit():
            words.append(f"batch {r[1:]}")
    return ", ".join(words)


def _means_table(settings: dict) -> list[str]:
    head = "| setting | " + " | ".join(ORDER) + " | MGG - best rival |"
    lines = [head, "| --- |" + " ---: |" * (len(ORDER) + 1)]
    for (_kind, _reset, title), st in settings.items():
        s = st["summary"]
        vals = {m: s[m]["mean_accuracy"] for m in ORDER if m in s}
        best = max((vals[m] for m in RIVALS if m in vals), default=np.nan)
        top = max(vals.values())
        cells = [("**%.1f**" if v == top else "%.1f") % v if (v := vals.get(m)) is not None else "-" for m in ORDER]
        diff = vals["mgg"] - best if "mgg" in vals else np.nan
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {diff:+.1f} |")
    return lines


def _reach_table(settings: dict) -> list[str]:
    lines = ["| setting | TENT's final (updates) | " + " | ".join(m for m in ORDER if m != "noadapt") + " |",
             "| --- | ---: |" + " ---: |" * (len(ORDER) - 1)]
    for (_kind, _reset, title), st in settings.items():
        s, ref = st["summary"], st["ref"]
        cells = []
        for m in ORDER[1:]:
            k = s.get(m, {}).get("batches_to_reference_final", "n/a") if m in s else "-"
            cells.append("never" if k is None else (str(k - 1) if isinstance(k, int) else k))
        final, n = ref.get("final_online_accuracy", float("nan")), ref.get("batches", 1) - 1
        lines.append(f"| {title} | {final:.1f}% ({n}) | " + " | ".join(cells) + " |")
    return lines


def _domain_table(settings: dict) -> list[str]:
    """Per test domain: unadapted accuracy and the best method's, over all settings."""
    lines = []
    for (_kind, _reset, title), st in settings.items():
        s = st["summary"]
        methods = [m for m in s if not m.startswith("_")]
        if not methods:
            continue
        doms = list(s[methods[0]]["per_domain"])
        best = {d: max((s[m]["per_domain"][d], m) for m in methods) for d in doms}
        at_chance = [d for d in doms if best[d][0] < CHANCE]
        if "noadapt" in s:   # a setting whose noadapt run has not finished yet still gets its best-method line
            na = s["noadapt"]["per_domain"]
            lines.append(f"* {title}: no adaptation "
                         + ", ".join(f"{d.rsplit('-', 1)[0]} {na[d]:.1f}" for d in doms))
        else:
            lines.append(f"* {title}: no adaptation not run yet")
        lines.append("  best method per domain: " + ", ".join(f"{d.rsplit('-', 1)[0]} {a:.1f} ({m})"
                                                            for d, (a, m) in best.items()))
        lines.append(f"  domains where every method stays below {CHANCE:.0f}%: "
                     + (", ".join(at_chance) if at_chance else "none"))
    return lines


def _sweep_tables(settings: dict) -> list[str]:
    out = []
    for (_kind, _reset, title), st in settings.items():
        grid = sorted({float(k) for accs in st["sweep"].values() for k in accs})
        out += [f"{title} (held-out mean accuracy per step size):", "",
                "| method | " + " | ".join(f"{g:g}" for g in grid) + " | chosen |",
                "| --- |" + " ---: |" * (len(grid) + 1)]
        for m in ORDER:
            accs = st["sweep"].get(m)
            if not accs:
                continue
            vals = {float(k): v for k, v in accs.items()}
            top = max(vals.values())
            cells = [("**%.1f**" if vals.get(g) == top else "%.1f") % vals[g] if g in vals else "-" for g in grid]
            lr = st["lrs"].get(m)
            out.append(f"| {m} | " + " | ".join(cells) + f" | {'-' if lr is None else f'{lr:g}'} |")
        out.append("")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", default="docs/results")
    args = ap.parse_args(argv)
    root = Path(args.root)
    settings = {key: st for key in SETTINGS if (st := load_setting(root, key[0], key[1])) is not None}
    blocks = [_means_table(settings), ["", "Updates to reach TENT's final online accuracy (and stay there):", ""],
              _reach_table(settings), [""], _domain_table(settings), [""], _sweep_tables(settings)]
    from summary import load_settings
    variants = {(k, p, variant_title(k, p)): st for (k, p) in sorted(load_settings(root)) if "-" in p
                and (st := load_setting(root, k, p)) is not None}
    if variants:   # stream variants (label shift, batch size): step sizes of the i.i.d. held-out sweeps, no sweep
        blocks += [["Stream variants (step sizes of the i.i.d. held-out sweeps):", ""], _means_table(variants),
                   ["", "Updates to reach TENT's final online accuracy (and stay there), stream variants:", ""],
                   _reach_table(variants), [""], _domain_table(variants)]
    print("\n".join(line for b in blocks for line in b))


if __name__ == "__main__":
    main()
