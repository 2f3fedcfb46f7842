"""The latency-versus-throughput picture of a benchmark report (matplotlib's Agg canvas: no display needed)."""
from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_latency_throughput(report: dict, path: Path) -> None:
    """The pipeline's p50 and p99 per concurrency level, and the bare detector's p50 per batch, against
    throughput; each point labelled with its concurrency or batch size."""
    figure = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if "pipeline" in report:
        pipeline = report["pipeline"]
        rows = pipeline["results"]
        throughput = [r["throughput_per_s"] for r in rows]
        axes.plot(throughput, [r["p50_ms"] for r in rows], "o-", label=f"pipeline p50 ({pipeline['tool']})")
        axes.plot(throughput, [r["p99_ms"] for r in rows], "s--", label="pipeline p99")
        for r in rows:
            axes.annotate(f"c={r['concurrency']}", (r["throughput_per_s"], r["p50_ms"]),
                          textcoords="offset points", xytext=(4, -12), fontsize=8)
    if "bare_detector" in report:
        rows = report["bare_detector"]["results"]
        axes.plot([r["images_per_s_at_p50"] for r in rows], [r["p50_ms_per_batch"] for r in rows], "^:",
                  label="bare detector p50 per batch (ONNX Runtime)")
        for r in rows:
            axes.annotate(f"b={r['batch']}", (r["images_per_s_at_p50"], r["p50_ms_per_batch"]),
                          textcoords="offset points", xytext=(4, 4), fontsize=8)
    for row in report.get("scans", []):
        axes.plot([row["tiles_per_s"]], [row["p50_ms"]], "D", label=f"scan p50, {row['scan_pixels'][0]} px, "
                  f"{row['tiles_per_scan']} tiles, concurrency {row['concurrency']}")
    axes.set_xlabel("throughput (images/s; tiles/s for scans)")
    axes.set_ylabel("latency (ms)")
    axes.set_ylim(bottom=0)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper left")
    machine = report["machine"]
    axes.set_title(f"Latency against throughput, {machine['cpus']} CPU cores, GPU: {'yes' if machine['gpu'] else 'none'}")
    figure.tight_layout()
    figure.savefig(path)
