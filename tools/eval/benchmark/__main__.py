"""Speed figures for the detector alone and the served pipeline (prints them; nothing here asserts timings).

    python -m tools.eval.benchmark onnx              # the detector alone on ONNX Runtime
    python -m tools.eval.benchmark server --url localhost:8001 --concurrency 1 2 4 8
    python -m tools.eval.benchmark all --start-server
    python -m tools.eval.benchmark scan --start-server --scan-side 4096   # whole-board scans through pcb_scan

``onnx`` times the ONNX file the CPU detector config serves, with that config's intra-op threads, on real
boards preprocessed as served: batch 1 and the detector's preferred batch sizes. ``scan`` sends a large scan of
real boards through the scan model (scans/s, tiles/s, per-stage times). ``server`` drives the live
pipeline over gRPC with perf_analyzer (the Python client when perf_analyzer cannot run, labelled so),
sweeping client concurrency; for each level it takes the per-model queue and compute times from Triton's
statistics, and after the sweep the resident memory of tritonserver and its Python backend stubs. ``all``
does both and compares them. Results land in ``--out``: benchmark.json, benchmark.md and
latency_throughput.png.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tools.arguments import add_data_arguments, add_server_arguments, validation_split
from tools.contract import CPU_CONFIG_NAME, served_contract
from tools.data.deeppcb import template_path_for
from tools.data.splits import select_samples
from tools.eval.benchmark.bare_detector import ServedDetector, bare_batch_sizes, time_bare_detector
from tools.eval.benchmark.memory import server_memory
from tools.eval.benchmark.perf_analyzer import Measurement
from tools.eval.benchmark.report import machine_description, markdown_report, pipeline_against_bare, write_report
from tools.eval.benchmark.scan import boards_for_scan, stitched_scan, time_scans
from tools.eval.benchmark.sweep import CLIENTS, pipeline_sweep
from tools.serve.triton_server import serving


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.eval.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["onnx", "server", "all", "scan"])
    parser.add_argument("--out", type=Path, default=Path("reports/benchmark"))
    parser.add_argument("--boards", type=int, help="distinct boards, sent round-robin (default: the largest batch)")
    add_data_arguments(parser, "trainval.txt", "val")
    bare = parser.add_argument_group("detector alone")
    bare.add_argument("--warmup", type=int, default=5, help="untimed runs per batch size")
    bare.add_argument("--runs", type=int, default=30, help="timed runs per batch size")
    bare.add_argument("--compare-onnx", type=Path, metavar="FILE",
                      help="also time this ONNX detector in the same run (same threads, boards and batches), e.g. "
                           "the previous model, and report the served one's latency as a ratio of it")
    add_server_arguments(parser)
    sweep = parser.add_argument_group("pipeline sweep")
    sweep.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    sweep.add_argument("--client", choices=CLIENTS, default="perf_analyzer",
                       help="load generator; perf_analyzer falls back to the Python client when it cannot run")
    sweep.add_argument("--measurement-ms", type=int, default=3000, help="perf_analyzer window")
    sweep.add_argument("--max-trials", type=int, default=5, help="perf_analyzer windows to reach stability")
    sweep.add_argument("--stability-percentage", type=float, default=10.0,
                       help="perf_analyzer's tolerance between its last 3 windows; raise it on a busy machine")
    sweep.add_argument("--score-threshold", type=float,
                       help="request parameter for every request (default: the deployed threshold); a low one "
                            "measures postprocess with many candidate boxes")
    sweep.add_argument("--with-templates", action="store_true",
                       help="send each board's DeepPCB template with it (golden-template inspection); with scan, "
                            "the scan's template stitched from the boards' templates")
    scans = parser.add_argument_group("whole-board scans (scan)")
    scans.add_argument("--scan-side", type=int, default=4096, help="the scan is this many pixels square")
    scans.add_argument("--scans", type=int, default=6, help="timed scans per concurrency level")
    scans.add_argument("--scan-concurrency", type=int, nargs="+", default=[1, 2], help="scans in flight")
    args = parser.parse_args(argv)
    if args.score_threshold is not None and not 0 <= args.score_threshold <= 1:
        parser.error("--score-threshold must be between 0 and 1")
    return args


def benchmark_boards(args: argparse.Namespace, count: int) -> list[Path]:
    """The first ``count`` inspected boards of the chosen part of the list."""
    paths = [s.image_path for s in select_samples(args.data, args.list, args.split, validation_split(args))[:count]]
    if len(paths) < count:
        raise SystemExit(f"{args.data / args.list} ({args.split}) has {len(paths)} boards, {count} needed")
    return paths


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    contract = served_contract(CPU_CONFIG_NAME, args.model_repository)
    batch_sizes = bare_batch_sizes(contract)
    report: dict = {"machine": machine_description()}
    if args.what == "scan":
        board_side = contract.input_size  # DeepPCB boards are as large as the detector input
        boards = benchmark_boards(args, boards_for_scan(args.scan_side, board_side))
        scan = stitched_scan(boards, args.scan_side)
        template = stitched_scan([template_path_for(b) for b in boards], args.scan_side) if args.with_templates else None
        with serving(args.url, args.start_server, args.model_repository) as url:
            report["scans"] = [time_scans(url, contract, scan, args.scan_side, args.scans, level, template)
                               for level in args.scan_concurrency]
            report["memory"] = server_memory(url)
        paths = write_report(report, args.out)
        print(markdown_report(report))
        print("wrote " + ", ".join(str(path) for path in paths))
        return report
    boards = benchmark_boards(args, args.boards or max(batch_sizes))
    if args.what in ("onnx", "all"):
        # Before any server is started for the run, so the bare detector has the CPU to itself.
        served = ServedDetector.from_cpu_config(contract)
        report["bare_detector"] = time_bare_detector(served, boards, batch_sizes, args.warmup, args.runs)
        if args.compare_onnx:
            other = ServedDetector(args.compare_onnx, served.intra_op_threads)
            report["compared_detector"] = time_bare_detector(other, boards, batch_sizes, args.warmup, args.runs)
    if args.what in ("server", "all"):
        measurement = Measurement(args.measurement_ms, args.max_trials, args.stability_percentage)
        with serving(args.url, args.start_server, args.model_repository) as url:
            report["pipeline"] = pipeline_sweep(url, contract, boards, args.concurrency, args.client, measurement,
                                                args.score_threshold, args.with_templates)
            report["memory"] = server_memory(url)
    if args.what == "all":
        report["comparison"] = pipeline_against_bare(report["bare_detector"], report["pipeline"])
    paths = write_report(report, args.out)
    print(markdown_report(report))
    print("wrote " + ", ".join(str(path) for path in paths))
    return report


if __name__ == "__main__":
    main()
