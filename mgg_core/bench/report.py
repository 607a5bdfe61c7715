"""Bench report: online-accuracy curves, updates-to-reference, the summary, the markdown table, the plot and the
written results.json (whose fields and order are the published protocol: change them only on purpose)."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..classifier import library_versions
from ..io import atomic_write_text
from .data import PreparedDomain

if TYPE_CHECKING:                                 # types only: runner imports this module
    from ..data.streams import StreamSpec
    from .runner import BenchConfig, DomainResult, Setup

__all__ = ["BenchRun", "batches_to_reach", "markdown_table", "online_curve", "plot_curves", "protocol_record",
           "summarize", "write_report"]


def _log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, flush=True)


def online_curve(results: Sequence[DomainResult], reset: str) -> np.ndarray:
    """Cumulative online accuracy (%) after k batches. With resets: averaged over domains at the same batch index
    within the domain (domains of unequal length are cut to the shortest); continual: along the whole stream."""
    if reset == "domain":
        k = min(len(r.correct) for r in results)
        curves = [np.cumsum(r.correct[:k]) / np.cumsum(r.count[:k]) for r in results]
        return 100.0 * np.mean(curves, axis=0)
    c = np.concatenate([r.correct for r in results])
    n = np.concatenate([r.count for r in results])
    return 100.0 * np.cumsum(c) / np.cumsum(n)


def batches_to_reach(curve: np.ndarray, target: float) -> int | None:
    """Smallest k (1-based, number of batches = update opportunities) from which the curve reaches ``target`` and
    stays at or above it to the end (so an early lucky batch does not count), or None."""
    below = np.flatnonzero(curve < target - 1e-9)
    if below.size == 0:
        return 1
    k = int(below[-1]) + 2
    return k if k <= len(curve) else None


def summarize(all_results: dict[str, list[DomainResult]], reset: str, reference: str = "tent") -> dict:
    summary = {}
    curves = {m: online_curve(r, reset) for m, r in all_results.items()}
    for m, rs in all_results.items():
        summary[m] = {"mean_accuracy": float(np.mean([r.accuracy for r in rs])),
                      "per_domain": {r.domain: r.accuracy for r in rs},
                      "updates": int(sum(r.updates for r in rs)),
                      "batches": int(sum(len(r.correct) for r in rs)),
                      "seconds": float(sum(r.seconds for r in rs))}
    if reference in curves:
        target = float(curves[reference][-1])
        n_ref = len(curves[reference])
        for m, c in curves.items():
            k = batches_to_reach(c, target)
            summary[m]["batches_to_reference_final"] = k
            summary[m]["fraction_of_reference_batches"] = None if k is None else k / n_ref
        summary["_reference"] = {"method": reference, "final_online_accuracy": target, "batches": n_ref}
    return summary


# ============================================================================================== report
def markdown_table(summary: dict, domains: Sequence[str], methods: Sequence[str], title: str = "") -> str:
    short = [d.rsplit("-", 1)[0] if d.rpartition("-")[2].isdigit() else d for d in domains]
    lines = [f"### {title}", ""] if title else []
    lines.append("| method | mean | " + " | ".join(short) + " |")
    lines.append("| --- | ---: | " + " | ".join("---:" for _ in short) + " |")
    best = max(summary[m]["mean_accuracy"] for m in methods)
    for m in methods:
        s = summary[m]
        mean = f"{s['mean_accuracy']:.1f}"
        mean = f"**{mean}**" if abs(s["mean_accuracy"] - best) < 1e-9 else mean
        lines.append(f"| {m} | {mean} | " + " | ".join(f"{s['per_domain'][d]:.1f}" for d in domains) + " |")
    ref = summary.get("_reference")
    if ref:
        lines += ["", f"Batches (= update opportunities) after which the online accuracy curve reaches and keeps "
                  f"{ref['method'].upper()}'s final online accuracy ({ref['final_online_accuracy']:.1f}%, after "
                  f"{ref['batches']} batches):", "",
                  "| method | batches | fraction of " + ref["method"].upper() + "'s |", "| --- | ---: | ---: |"]
        for m in methods:
            k = summary[m].get("batches_to_reference_final")
            frac = summary[m].get("fraction_of_reference_batches")
            lines.append(f"| {m} | {'never' if k is None else k} | {'-' if frac is None else f'{frac:.2f}'} |")
    return "\n".join(lines) + "\n"


def plot_curves(all_results: dict[str, list[DomainResult]], reset: str, path: str | os.PathLike, title: str,
                batch_size: int, highlight: Sequence[str] = ()) -> None:
    """Online-accuracy curves; the ``highlight`` methods are drawn bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for m, rs in all_results.items():
        c = online_curve(rs, reset)
        ax.plot(np.arange(1, len(c) + 1), c, label=m, lw=2.2 if m in highlight else 1.3)
    ax.set_xlabel("test batches seen (= online update opportunities)" + (", per domain" if reset == "domain" else ""))
    ax.set_ylabel("online accuracy (%)" + (" (mean over domains)" if reset == "domain" else ""))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)




# ============================================================================================== the written result
@dataclass
class BenchRun:
    """Everything a finished bench run reports (built by ``runner.run_bench``)."""

    cfg: BenchConfig
    spec: StreamSpec
    reset: str                                    # "domain" | "never"
    setup: Setup
    domains: list[PreparedDomain]
    description: dict | None                      # the first domain's data description
    base_protocol: dict
    methods: dict[str, dict]                      # method -> {"engine", "lr", "lr_source"}
    skipped: list[str]
    origins: dict[str, str | None]                # "source_stats" / "fisher" -> where they came from
    sweep_record: dict | None
    results: dict[str, list[DomainResult]]
    highlight: list[str] = field(default_factory=list)   # drawn bold in the plot

    @property
    def severity(self) -> int | list[int]:
        severities = sorted({d[1] for d in self.spec.domains if isinstance(d, tuple)})
        return severities[0] if len(severities) == 1 else severities

    def title(self) -> str:
        setting = "reset per corruption" if self.reset == "domain" else "continual (no reset)"
        sev = f", severity {self.severity}" if self.severity != [] else ""
        kind = "corruptions" if all(isinstance(d, tuple) for d in self.spec.domains) else "domains"
        return self.cfg.title or (f"{self.base_protocol['model']} | {len(self.domains)} {kind}{sev} "
                                  f"| batch {self.spec.batch_size} | {setting}")


def protocol_record(run: BenchRun) -> dict:
    """The ``protocol`` block of results.json (model, preprocessing, data, stream, reset, methods, versions)."""
    spec, reset, bp = run.spec, run.reset, run.base_protocol
    names = [d.domain.name for d in run.domains]
    mgg_checkpoint = run.setup.mgg_checkpoint
    return {
        "model": bp["model"], "weights_file": Path(run.setup.classifier.checkpoint_path).name,
        "weights_sha256": bp["weights_sha256"], "preprocessing": bp["data_config"],
        "dataset": {"data": spec.data, "split": spec.split, "description": run.description},
        "corruptions": [d if isinstance(d, str) else d[0] for d in spec.domains], "severity": run.severity,
        "batch_size": spec.batch_size, "images_per_domain": [len(d) for d in run.domains],
        "stream": spec.to_dict(),
        "stream_order": {"domains": names, "within_domain": (
            f"seeded permutation (seed {spec.seed})" if spec.label_shift is None
            else f"Dirichlet label shift alpha={spec.label_shift} (seed {spec.seed})")},
        "reset": {"domain": "reset to source at every corruption boundary", "never": "continual, never reset"}[reset],
        "reset_policy": reset, "one_pass": True, "predictions": "before each update",
        "seed": spec.seed, "device": run.cfg.device, "versions": library_versions(),
        "methods": run.methods,
        "skipped_methods": {m: "the model has no BatchNorm layer" for m in run.skipped},
        "source_stats": run.origins["source_stats"], "fisher": run.origins["fisher"],
        "mgg_checkpoint": Path(mgg_checkpoint).name if mgg_checkpoint else None,
        "mgg_checkpoint_sha256": bp["mgg_checkpoint_sha256"],
        "lr_sweep": run.sweep_record,
        "metric": "online accuracy: top-1 of the predictions made before each update",
        "curve": "cumulative online accuracy after k batches" + (", mean over domains" if reset == "domain" else ""),
    }


def write_report(run: BenchRun, out: Path, t_start: float) -> dict:
    """Write OUT/results.json, results.md and online_accuracy.png; return the JSON."""
    summary = summarize(run.results, run.reset)
    title = run.title()
    table = markdown_table(summary, [d.domain.name for d in run.domains], list(run.methods), title=title)
    plot_curves(run.results, run.reset, out / "online_accuracy.png", title, run.spec.batch_size,
                run.highlight)
    result = {
        "title": title,
        "protocol": protocol_record(run),
        "summary": summary,
        "results": {m: [r.to_dict() for r in rs] for m, rs in run.results.items()},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    atomic_write_text(out / "results.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(out / "results.md", table)
    _log(table, run.cfg.quiet)
    _log(f"wrote {out}/results.json, results.md, online_accuracy.png in {result['seconds']:.0f} s", run.cfg.quiet)
    return result
