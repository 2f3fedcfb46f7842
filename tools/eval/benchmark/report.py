"""The benchmark report: the comparison of pipeline and bare detector, benchmark.md, and the files in --out.

A report is a dict with any of ``bare_detector`` (bare_detector.time_bare_detector), ``pipeline``
(sweep.pipeline_sweep), ``memory`` (memory.server_memory) and, with both of the first two, ``comparison``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tools.eval.benchmark.cpu_time import LOAD_GENERATOR, ceiling_per_s, stub_group
from tools.eval.benchmark.plot import plot_latency_throughput

PLOT_FILE = "latency_throughput.png"


def machine_description() -> dict:
    return {"cpus": os.cpu_count(), "gpu": shutil.which("nvidia-smi") is not None}


def pipeline_against_bare(bare: dict, pipeline: dict) -> dict:
    """Throughput at saturation as a ratio pipeline/bare, and what serving adds to one image's latency: the
    pipeline's p50 at concurrency 1 minus the bare detector's batch-1 p50 (None without concurrency 1)."""
    bare_peak = max(bare["results"], key=lambda r: r["images_per_s_at_p50"])
    bare_single = next(r for r in bare["results"] if r["batch"] == 1)
    pipeline_peak = max(pipeline["results"], key=lambda r: r["throughput_per_s"])
    alone = next((r for r in pipeline["results"] if r["concurrency"] == 1), None)
    return {
        "pipeline_peak_per_s": pipeline_peak["throughput_per_s"],
        "pipeline_peak_concurrency": pipeline_peak["concurrency"],
        "bare_peak_per_s": bare_peak["images_per_s_at_p50"],
        "bare_peak_batch": bare_peak["batch"],
        "throughput_ratio": pipeline_peak["throughput_per_s"] / bare_peak["images_per_s_at_p50"],
        "pipeline_p50_ms_at_concurrency_1": alone["p50_ms"] if alone else None,
        "bare_p50_ms_at_batch_1": bare_single["p50_ms_per_batch"],
        "latency_overhead_ms": alone["p50_ms"] - bare_single["p50_ms_per_batch"] if alone else None,
    }


def bare_section(bare: dict) -> list[str]:
    lines = [
        "## Detector alone on ONNX Runtime (CPU)",
        "",
        f"`{bare['model']}`, onnxruntime {bare['onnxruntime']}, {bare['intra_op_threads']} intra-op threads "
        f"(the CPU detector config's), {bare['timed_runs']} timed runs after {bare['warmup_runs']} warm-up runs, "
        f"{bare['boards']} real boards preprocessed as served.",
        "",
        "| batch | p50 ms/batch | p90 ms/batch | p50 ms/image | p90 ms/image | images/s at p50 |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in bare["results"]:
        figures = " | ".join(f"{r[k]:.1f}" for k in ("p50_ms_per_batch", "p90_ms_per_batch", "p50_ms_per_image",
                                                     "p90_ms_per_image", "images_per_s_at_p50"))
        lines.append(f"| {r['batch']} | {figures} |")
    return lines + [""]


def detector_ratio_lines(served: dict, compared: dict) -> list[str]:
    """The served detector's latency per image as a ratio of the compared one's, batch by batch."""
    ratios = [f"batch {a['batch']}: {a['p50_ms_per_image'] / b['p50_ms_per_image']:.2f}x"
              for a, b in zip(served["results"], compared["results"])]
    return [f"Served detector's p50 latency per image against `{compared['model']}` (same run): "
            + ", ".join(ratios) + ".", ""]


def measurement_sentence(pipeline: dict) -> str:
    measurement = pipeline["measurement"]
    if pipeline["tool"] != "perf_analyzer":
        return f"Each level ran for {3 * measurement['window_ms'] / 1e3:g} s."
    return (
        f"perf_analyzer measured {measurement['window_ms']} ms windows until the last 3 agreed within "
        f"{measurement['stability_percent']:g} % (at most {measurement['max_trials']} windows)."
    )


def threshold_sentence(pipeline: dict) -> str:
    if pipeline["score_threshold"] is None:
        return f"Score threshold: the deployed {pipeline['default_score_threshold']:g}."
    return (f"Score threshold: {pipeline['score_threshold']:g} for every request (deployed: "
            f"{pipeline['default_score_threshold']:g}), so postprocess handles more candidate boxes.")


def pipeline_section(pipeline: dict, machine: dict) -> list[str]:
    targets = pipeline["targets"]
    lines = [
        f"## End to end: `{pipeline['model']}` over gRPC ({pipeline['tool']})",
        "",
        f"One encoded board per request, {pipeline['boards']} real boards sent round-robin. Design targets (GPU "
        f"server): > {targets['throughput_per_s']:.0f} inferences/s, p50 < {targets['p50_ms']:.0f} ms, "
        f"p99 < {targets['p99_ms']:.0f} ms. {measurement_sentence(pipeline)} {threshold_sentence(pipeline)}",
        "",
    ]
    if pipeline["note"]:
        lines += [f"Note: {pipeline['note']}", ""]
    lines += [
        "| concurrency | inferences/s | p50 ms | p90 ms | p99 ms | targets met |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for r in pipeline["results"]:
        met = [name for name, key in (("throughput", "meets_throughput_target"), ("p50", "meets_p50_target"),
                                      ("p99", "meets_p99_target")) if r[key]]
        figures = " | ".join(f"{r[k]:.1f}" for k in ("throughput_per_s", "p50_ms", "p90_ms", "p99_ms"))
        lines.append(f"| {r['concurrency']} | {figures} | {', '.join(met) or 'none'} |")
    return lines + ["", pipeline_verdict(pipeline, machine), ""]


def pipeline_verdict(pipeline: dict, machine: dict) -> str:
    """One honest sentence on what this machine reaches against the GPU targets."""
    results = pipeline["results"]
    best = max(results, key=lambda r: r["throughput_per_s"])
    fastest = min(results, key=lambda r: r["p50_ms"])
    hardware = "this GPU machine" if machine["gpu"] else f"this {machine['cpus']}-core CPU machine (no GPU)"
    all_met = all(best[k] for k in ("meets_throughput_target", "meets_p50_target", "meets_p99_target"))
    return (
        f"On {hardware} the pipeline peaks at {best['throughput_per_s']:.1f} inferences/s (concurrency "
        f"{best['concurrency']}, p50 {best['p50_ms']:.1f} ms, p99 {best['p99_ms']:.1f} ms); the lowest p50 is "
        f"{fastest['p50_ms']:.1f} ms at concurrency {fastest['concurrency']}. "
        + ("All design targets are met at peak throughput." if all_met else "The GPU design targets are not met here.")
    )


def comparison_section(comparison: dict) -> list[str]:
    lines = [
        "## Pipeline against the bare detector",
        "",
        f"* Throughput at saturation: the pipeline's {comparison['pipeline_peak_per_s']:.1f} inferences/s "
        f"(concurrency {comparison['pipeline_peak_concurrency']}) against the bare detector's "
        f"{comparison['bare_peak_per_s']:.1f} images/s (batch {comparison['bare_peak_batch']}): "
        f"ratio pipeline/bare {comparison['throughput_ratio']:.2f}.",
    ]
    if comparison["latency_overhead_ms"] is None:
        lines.append("* Latency added by serving: not measured (the sweep has no concurrency 1).")
    else:
        lines.append(
            f"* Latency added by serving: p50 {comparison['pipeline_p50_ms_at_concurrency_1']:.1f} ms at "
            f"concurrency 1 minus the bare batch-1 p50 {comparison['bare_p50_ms_at_batch_1']:.1f} ms = "
            f"{comparison['latency_overhead_ms']:.1f} ms (decoding, letterbox, postprocess, batching delay, gRPC).")
    return lines + [""]


def stages_section(pipeline: dict) -> list[str]:
    lines = [
        "## Where the time goes (Triton statistics)",
        "",
        "Per model, milliseconds per request over each concurrency level (deltas of `/v2/models/<model>/stats`); "
        "a request in a dynamic batch counts the whole batch's compute time. The ensemble's compute figures are "
        "Triton's sums over its steps.",
        "",
        "| concurrency | model | requests | mean batch | queue | compute input | compute infer | compute output "
        "| total in model |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in pipeline["results"]:
        for model in pipeline["stage_models"]:
            s = r["stages"][model]
            figures = " | ".join(f"{s[k]:.2f}" for k in ("queue_ms", "compute_input_ms", "compute_infer_ms",
                                                         "compute_output_ms", "request_ms"))
            lines.append(f"| {r['concurrency']} | {model} | {s['requests']} | {s['mean_batch']:.2f} | {figures} |")
    return lines + [""]


def cpu_section(pipeline: dict, machine: dict, bare: dict | None) -> list[str]:
    """CPU time per inference by process at each level, and the ceiling it puts on a CPU-bound machine."""
    rows = [r for r in pipeline["results"] if r.get("cpu", {}).get("available")]
    lines = ["## Where the CPU goes", ""]
    if not rows:
        reasons = {r["cpu"]["reason"] for r in pipeline["results"] if "cpu" in r} or {"no level recorded it"}
        return lines + [f"Not measured: {'; '.join(sorted(reasons))}.", ""]
    cores = machine["cpus"]
    groups = list(rows[0]["cpu"]["core_ms_per_inference"])
    lines += [
        f"CPU time (user + system, from /proc) of each process over each concurrency level, in core-milliseconds "
        f"per inference answered. Every process here shares the {cores} cores, so a cost of T core-ms per "
        f"inference caps the throughput at {cores} x 1000 / T per second (the ceilings below); the load generator "
        "(perf_analyzer or the Python client) takes its share of the same cores, which clients on other machines "
        "would not.",
        "",
        "| concurrency | inferences/s | " + " | ".join(groups) + " | serving total | ceiling, serving alone "
        "| ceiling, with the load generator |",
        "|---:|---:|" + "---:|" * (len(groups) + 3),
    ]
    for r in rows:
        cost = r["cpu"]["core_ms_per_inference"]
        serving = r["cpu"]["serving_core_ms_per_inference"]
        lines.append(f"| {r['concurrency']} | {r['throughput_per_s']:.1f} | "
                     + " | ".join(f"{cost[g]:.2f}" for g in groups)
                     + f" | {serving:.2f} | {ceiling_per_s(serving, cores):.0f}/s "
                     f"| {ceiling_per_s(serving + cost[LOAD_GENERATOR], cores):.0f}/s |")
    if bare is not None:
        best = max(bare["results"], key=lambda r: r["images_per_s_at_p50"])
        peak = max(rows, key=lambda r: r["throughput_per_s"])
        detector = peak["cpu"]["core_ms_per_inference"].get(stub_group(pipeline["detector_model"]), 0.0)
        other = peak["cpu"]["serving_core_ms_per_inference"] - detector
        lines += ["", f"The bare detector spends {best['core_ms_per_image']:.2f} core-ms per image at batch "
                  f"{best['batch']} (its best throughput). At the pipeline's peak (concurrency {peak['concurrency']}) "
                  f"the detector's stub spends {detector:.2f} and the rest of the serving {other:.2f} core-ms per "
                  f"inference: even with the detector at its bare cost, that rest alone caps the pipeline at "
                  f"{ceiling_per_s(best['core_ms_per_image'] + other, cores) / best['images_per_s_at_p50']:.2f} of the "
                  f"bare throughput on {cores} cores, before the load generator's share."]
    return lines + [""]


def memory_section(memory: dict) -> list[str]:
    lines = ["## Resident memory of the serving processes", ""]
    if not memory["available"]:
        return lines + [f"Not measured: {memory['reason']}.", ""]
    server = memory["server"]
    lines += [
        "RSS from /proc after the sweep; peak is the high-water mark since the process started.",
        "",
        "| process | model instance | pid | RSS MiB | peak RSS MiB |",
        "|---|---|---:|---:|---:|",
        f"| {server['process']} | | {server['pid']} | {server['rss_mib']:.0f} | {server['peak_rss_mib']:.0f} |",
    ]
    for stub in memory["stubs"]:
        lines.append(f"| Python backend stub | {stub['instance']} | {stub['pid']} | {stub['rss_mib']:.0f} "
                     f"| {stub['peak_rss_mib']:.0f} |")
    return lines + [f"| total | | | {memory['total_rss_mib']:.0f} | |", ""]


def scans_section(scans: list[dict]) -> list[str]:
    first = scans[0]
    lines = ["## Whole-board scans (pcb_scan)", "",
             f"One {first['scan_pixels'][0]} x {first['scan_pixels'][1]} scan of real boards per request"
             + (", with its template" if first.get("with_template") else "") + f", {first['tiles_per_scan']} tiles each.",
             "",
             "| concurrency | scans/s | tiles/s | p50 per scan | p99 per scan | scan model | preprocess | detector | "
             "postprocess (ms per request) |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in scans:
        stages = row["stages"]
        per_stage = [f"{stage['request_ms']:.1f}" for stage in stages.values()]
        lines.append(f"| {row['concurrency']} | {row['scans_per_s']:.2f} | {row['tiles_per_s']:.1f} | "
                     f"{row['p50_ms']:.0f} ms | {row['p99_ms']:.0f} ms | " + " | ".join(per_stage[:4]) + " |")
    best = max(row["tiles_per_s"] for row in scans)
    lines += ["", f"GPU, on paper (not measured): at the design's 500 pipeline inferences/s a {first['tiles_per_scan']}"
              f"-tile scan would take {first['tiles_per_scan'] / 500 * 1e3:.0f} ms of pipeline time, "
              f"{500 / first['tiles_per_scan']:.1f} scans/s per GPU; measured here on CPU: {best:.1f} tiles/s.", ""]
    return lines


def markdown_report(report: dict) -> str:
    machine = report["machine"]
    lines = ["# Benchmark", "", f"Machine: {machine['cpus']} CPU cores, GPU: {'yes' if machine['gpu'] else 'none'}.",
             ""]
    if "bare_detector" in report:
        lines += bare_section(report["bare_detector"])
    if "compared_detector" in report:
        lines += bare_section(report["compared_detector"])[2:]  # the same table, under the served one's heading
        lines += detector_ratio_lines(report["bare_detector"], report["compared_detector"])
    if "pipeline" in report:
        lines += pipeline_section(report["pipeline"], machine)
    if "comparison" in report:
        lines += comparison_section(report["comparison"])
    if "pipeline" in report:
        lines += stages_section(report["pipeline"])
        lines += cpu_section(report["pipeline"], machine, report.get("bare_detector"))
    if "scans" in report:
        lines += scans_section(report["scans"])
    if "memory" in report:
        lines += memory_section(report["memory"])
    if "plot" in report:
        lines += [f"![latency against throughput]({report['plot']})", ""]
    return "\n".join(lines)


def write_report(report: dict, out: Path) -> list[Path]:
    """benchmark.json, benchmark.md and the latency-versus-throughput PNG in ``out`` (its file name goes into
    the report, for the Markdown to show it); the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    report["plot"] = PLOT_FILE
    plot_latency_throughput(report, out / PLOT_FILE)
    paths = [out / "benchmark.json", out / "benchmark.md", out / PLOT_FILE]
    paths[0].write_text(json.dumps(report, indent=2))
    paths[1].write_text(markdown_report(report))
    return paths
