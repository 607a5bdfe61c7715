"""Replay reports: summary statistics, the JSON/markdown/PNG files, and the baseline-vs-adapted table.

The JSON report (schema ``REPORT_SCHEMA``) records the full protocol and every request; files are written
atomically (``mgg_core.io``).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mgg_core.io import atomic_path, atomic_write_text

from .client import RequestRecord, server_method

REPORT_SCHEMA = "mgg-replay/1"


# ------------------------------------------------------------------------------------------------ statistics


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default); None for no values."""
    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def latency_summary(seconds: Sequence[float]) -> dict[str, Any]:
    ms = [1000.0 * s for s in seconds]
    return {
        "count": len(ms),
        "mean_ms": float(np.mean(ms)) if ms else None,
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "max_ms": float(np.max(ms)) if ms else None,
    }



# ------------------------------------------------------------------------------------------------ summary


def _acc(correct: int, total: int) -> float | None:
    return correct / total if total else None


def summarize(records: Sequence[RequestRecord], wall_s: float, images_planned: int | None = None) -> dict[str, Any]:
    final = [r for r in records if r.final]
    ok = [r for r in final if r.status == 200 and r.correct is not None]
    by_status: dict[str, int] = {}
    for r in records:
        if r.status != 200:
            by_status[str(r.status)] = by_status.get(str(r.status), 0) + 1
    failed_final = [r for r in final if r.status != 200]

    def acc_table(key: Callable[[RequestRecord], str], split_mixed: bool = False) -> dict[str, dict[str, Any]]:
        table: dict[str, dict[str, Any]] = {}
        for r in ok:
            mixed = bool(split_mixed and r.per_domain)
            parts: Any = r.per_domain.items() if split_mixed and r.per_domain else [(key(r), (r.correct or 0, r.n))]
            for k, (c, n) in parts:
                e = table.setdefault(k, {"correct": 0, "total": 0, "batches": 0, "entropy_sum": 0.0, "entropy_n": 0})
                e["correct"] += c
                e["total"] += n
                e["batches"] += 1
                # a batch's entropy belongs to one domain only when the batch does not mix domains
                if not mixed and r.batch_entropy is not None and math.isfinite(r.batch_entropy):
                    e["entropy_sum"] += r.batch_entropy
                    e["entropy_n"] += 1
        for e in table.values():
            e["accuracy"] = _acc(e["correct"], e["total"])
            e["mean_batch_entropy"] = e["entropy_sum"] / e["entropy_n"] if e["entropy_n"] else None
            del e["entropy_sum"], e["entropy_n"]
        return table

    images_answered = sum(r.n for r in ok)
    correct = sum(r.correct or 0 for r in ok)
    entropies = [r.batch_entropy for r in ok if r.batch_entropy is not None and math.isfinite(r.batch_entropy)]
    skipped: dict[str, int] = {}
    for r in ok:
        if r.adapted is False:
            reason = r.skipped_reason or "unspecified"
            skipped[reason] = skipped.get(reason, 0) + 1
    return {
        "requests": len(final),
        "requests_ok": len(ok),
        "requests_failed": len(failed_final),
        "images_planned": images_planned,
        "images_sent": sum(r.n for r in final),
        "images_answered": images_answered,
        "correct": correct,
        "accuracy": _acc(correct, images_answered),
        "accuracy_by_domain": acc_table(lambda r: r.domain, split_mixed=True),
        "accuracy_by_stream": acc_table(lambda r: r.stream_id),
        "wall_s": wall_s,
        "throughput_img_s": images_answered / wall_s if wall_s > 0 else None,
        "throughput_req_s": len(ok) / wall_s if wall_s > 0 else None,
        "latency": latency_summary([r.latency_s for r in ok if r.latency_s is not None]),
        "errors": {"total": sum(by_status.values()), "by_status": dict(sorted(by_status.items())),
                   "retried": sum(1 for r in records if not r.final), "failed_requests": len(failed_final)},
        "adapted_batches": sum(1 for r in ok if r.adapted),
        "skipped_batches": dict(sorted(skipped.items())),
        "rollbacks": sum(1 for r in ok if r.rolled_back),
        "mean_batch_entropy": float(np.mean(entropies)) if entropies else None,
    }


def fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100.0 * x:.2f}%"


def fmt_num(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown_summary(report: dict[str, Any]) -> str:
    s = report["summary"]
    p = report["protocol"]
    bi = (report.get("server") or {}).get("build_info") or {}
    lines = [
        f"# Replay report ({report['mode']})",
        "",
        f"- created: {report['created']}",
        f"- command: `{' '.join(report['command'])}`",
        f"- url: {p['url']}  (server method: {bi.get('method', 'n/a')}, model: {bi.get('model', 'n/a')}, "
        f"optimizer: {bi.get('optimizer', 'n/a')}, device: {bi.get('device', 'n/a')})",
        f"- data: {p['data']}; streams: {p['streams']}; batch size: {p['batch_size']}; body: {p['format']}; "
        f"reset at start: {p['reset_at_start']}; reset policy: {p['stream_spec']['base_spec']['reset']}; "
        f"order: {p['stream_spec']['base_spec']['order']}",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| online accuracy | {fmt_pct(s['accuracy'])} ({s['correct']}/{s['images_answered']}) |",
        f"| throughput | {fmt_num(s['throughput_img_s'])} img/s, {fmt_num(s['throughput_req_s'], 2)} req/s |",
        f"| latency p50 / p95 / p99 | {fmt_num(s['latency']['p50_ms'])} / {fmt_num(s['latency']['p95_ms'])} / "
        f"{fmt_num(s['latency']['p99_ms'])} ms |",
        f"| requests ok / failed | {s['requests_ok']} / {s['requests_failed']} |",
        f"| errors by status | {json.dumps(s['errors']['by_status']) if s['errors']['by_status'] else 'none'} |",
        f"| adapted batches | {s['adapted_batches']} (skipped: {json.dumps(s['skipped_batches']) or 'none'}) |",
        f"| rollbacks | {s['rollbacks']} |",
        f"| mean batch entropy / ln C | {fmt_num(s['mean_batch_entropy'], 3)} |",
        f"| wall time | {fmt_num(s['wall_s'], 1)} s |",
        "",
        "## Accuracy by domain",
        "",
        "| domain | accuracy | images | mean entropy |",
        "| --- | --- | --- | --- |",
    ]
    for dom, e in s["accuracy_by_domain"].items():
        lines.append(f"| {dom} | {fmt_pct(e['accuracy'])} | {e['total']} | {fmt_num(e['mean_batch_entropy'], 3)} |")
    lines += ["", "## Accuracy by stream", "", "| stream | accuracy | images |", "| --- | --- | --- |"]
    for sid, e in s["accuracy_by_stream"].items():
        lines.append(f"| {sid} | {fmt_pct(e['accuracy'])} | {e['total']} |")
    if report.get("comparison"):
        lines += ["", "## Comparison with the baseline", "", "```", report["comparison"]["table"], "```"]
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], path: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in report["requests"] if r["final"] and r["status"] == 200 and r["correct"] is not None]
    streams: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(recs, key=lambda r: (r["stream_id"], r["seq"])):
        streams.setdefault(r["stream_id"], []).append(r)
    fig, (ax_acc, ax_ent) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (sid, rs) in enumerate(streams.items()):
        color = colors[i % len(colors)]
        x = np.cumsum([r["n"] for r in rs])
        acc = np.array([100.0 * r["correct"] / r["n"] for r in rs])
        ax_acc.plot(x, acc, color=color, marker="o", ms=2.5, lw=1.0, label=sid)
        ent = [r["batch_entropy"] if r["batch_entropy"] is not None else np.nan for r in rs]
        ax_ent.plot(x, ent, color=color, marker="o", ms=2.5, lw=1.0, label=sid)
        prev = None
        for xi, r in zip(np.concatenate([[0], x[:-1]]), rs, strict=False):
            if r["domain"] != prev and r["domain"] != "mixed":
                for ax in (ax_acc, ax_ent):
                    ax.axvline(xi, color=color, alpha=0.35, lw=0.8, ls=":")
                ax_acc.annotate(r["domain"], (xi, 2 + 7 * (i % 4)), color=color, fontsize=6, ha="left", va="bottom")
            prev = r["domain"]
    ax_acc.set_ylabel("online accuracy per batch (%)")
    ax_acc.set_ylim(0, 100)
    ax_ent.set_ylabel("batch entropy / ln C")
    ax_ent.set_ylim(0, 1)
    ax_ent.set_xlabel("images seen by the stream")
    ax_ent.legend(loc="upper right", fontsize=7)
    s = report["summary"]
    fig.suptitle(f"mgg replay ({report['mode']}): accuracy {fmt_pct(s['accuracy'])}, "
                 f"{fmt_num(s['throughput_img_s'])} img/s, p99 {fmt_num(s['latency']['p99_ms'])} ms", y=0.995)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)


def compare_table(baseline: dict[str, Any], adapted: dict[str, Any]) -> str:
    """Side-by-side table of two reports: per-domain accuracy, overall accuracy, latency and throughput."""
    b, a = baseline["summary"], adapted["summary"]
    doms = list(b["accuracy_by_domain"])
    doms += [d for d in a["accuracy_by_domain"] if d not in doms]
    def name(r: dict[str, Any]) -> str:
        return f"{r['mode']} ({server_method(r.get('server') or {}) or 'n/a'})"

    name_b, name_a = name(baseline), name(adapted)
    rows: list[tuple[str, str, str, str]] = []

    def pct(e: dict | None) -> str:
        return fmt_pct(e.get("accuracy")) if e else "-"

    def delta(x: float | None, y: float | None, scale: float = 100.0, unit: str = " pp") -> str:
        if x is None or y is None:
            return "-"
        return f"{scale * (y - x):+.2f}{unit}"

    for d in doms:
        eb, ea = b["accuracy_by_domain"].get(d), a["accuracy_by_domain"].get(d)
        rows.append((d, pct(eb), pct(ea), delta(eb and eb.get("accuracy"), ea and ea.get("accuracy"))))
    rows.append(("ALL (online accuracy)", fmt_pct(b["accuracy"]), fmt_pct(a["accuracy"]),
                 delta(b["accuracy"], a["accuracy"])))
    for q in ("p50", "p95", "p99"):
        kb, ka = b["latency"][f"{q}_ms"], a["latency"][f"{q}_ms"]
        rows.append((f"latency {q} (ms)", fmt_num(kb), fmt_num(ka), delta(kb, ka, 1.0, " ms")))
    rows.append(("throughput (img/s)", fmt_num(b["throughput_img_s"]), fmt_num(a["throughput_img_s"]),
                 delta(b["throughput_img_s"], a["throughput_img_s"], 1.0, "")))
    rows.append(("errors", str(b["errors"]["total"]), str(a["errors"]["total"]), ""))
    header = ("", name_b, name_a, "delta")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]

    def fmt(r: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    out = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    return "\n".join(out)



def write_report(report: dict[str, Any], out_dir: Path, stem: str) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    report["files"] = {k: str(v) for k, v in paths.items()}
    atomic_write_text(paths["json"], json.dumps(report, indent=2, default=_json_default) + "\n")
    atomic_write_text(paths["md"], markdown_summary(report))
    plot_report(report, paths["png"])
    return {k: str(v) for k, v in paths.items()}


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    report = json.loads(Path(path).read_text(encoding="utf-8"))
    if report.get("schema") != REPORT_SCHEMA:
        raise ValueError(f"{path}: not a replay report (schema {report.get('schema')!r}, expected {REPORT_SCHEMA!r})")
    return report
