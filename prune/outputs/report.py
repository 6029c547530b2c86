"""report.json and report.md of a pruning run."""

from __future__ import annotations

from pathlib import Path

from prune.outputs.files import write_json, write_text


def _fmt(value: float, unit: str = "") -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}{unit}"
    return f"{value:.0f}{unit}"


def markdown(report: dict) -> str:
    """The report as Markdown: summary table before/after, then one row per layer."""
    b, a = report["before"], report["after"]
    rows = [
        ("params", _fmt(b["params"]), _fmt(a["params"]), a["params"] / b["params"]),
        ("MACs", _fmt(b["macs"]), _fmt(a["macs"]), a["macs"] / b["macs"]),
        ("FLOPs", _fmt(b["flops"]), _fmt(a["flops"]), a["flops"] / b["flops"]),
        ("top-1", f"{b['top1']:.4f}", f"{a['top1']:.4f}", None),
        ("top-5", f"{b['top5']:.4f}", f"{a['top5']:.4f}", None),
        ("balanced accuracy", f"{b['balanced_accuracy']:.4f}", f"{a['balanced_accuracy']:.4f}", None),
        ("img/s", f"{b['img_per_s']:.1f}", f"{a['img_per_s']:.1f}", a["img_per_s"] / b["img_per_s"]),
    ]
    s = report["settings"]
    lines = [
        f"# Pruning report: {s['model']} · scorer `{s['scorer']}` · ratio {s['ratio']}",
        "",
        "| metric | before | after | after/before |",
        "|---|---|---|---|",
        *[f"| {n} | {x} | {y} | {'' if r is None else f'{r:.3f}'} |" for n, x, y, r in rows],
        "",
        f"Throughput on {a['device']}, batch {a['throughput']['batch_size']}, {a['throughput']['dtype']}, "
        f"{a['throughput']['threads']} threads, {a['throughput']['warmup']} warm-up batches.",
        "",
        "| layer | channels before | channels after | removed |",
        "|---|---|---|---|",
        *[
            f"| {l['name']} | {l['channels_before']} | {l['channels_after']} | {len(l['removed'])} |"
            for l in report["layers"]
        ],
        "",
        "Stage timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["timings"].items()),
        "",
    ]
    return "\n".join(lines)


def write_report(out: Path, report: dict) -> None:
    """Write `out/report.json` and `out/report.md` (atomically)."""
    write_json(out / "report.json", report)
    write_text(out / "report.md", markdown(report))
