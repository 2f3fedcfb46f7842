"""Speed figures for the detector and the served pipeline (prints them; nothing here asserts timings).

    python -m tools.benchmark onnx              # ONNX Runtime CPU latency of the detector, batch 1 and 8
    python -m tools.benchmark server --url localhost:8001 --concurrency 1 2 4 8
    python -m tools.benchmark all --start-server

``onnx`` times ``models/pcb_defect_detector/1/model.onnx`` on real DeepPCB boards with 2 intra-op threads
(p50/p90 over ``--runs`` timed runs after warm-up). ``server`` drives the live ``pcb_pipeline`` over gRPC
with ``perf_analyzer`` (from tritonclient[all]) fed real encoded boards, sweeping client concurrency, and
compares throughput, p50 and p99 with the design targets (set for a GPU server). When perf_analyzer cannot
run, or with ``--client python``, a plain Python gRPC client measures instead and the report says so.
Results land in ``--out`` as ``benchmark.json`` and ``benchmark.md``.
"""

from __future__ import annotations

import argparse
import base64
import csv
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(2**40))  # must precede the cv2 import to take effect
import cv2  # noqa: E402

from tools.deeppcb import DEFAULT_ROOT, read_split  # noqa: E402
from tools.evaluate import MODEL_REPOSITORY, serving  # noqa: E402

DEFAULT_ONNX = MODEL_REPOSITORY / "pcb_defect_detector" / "1" / "model.onnx"
PIPELINE = "pcb_pipeline"
TARGETS = {"throughput_per_s": 500.0, "p50_ms": 50.0, "p99_ms": 100.0}  # design targets, for a GPU server


def board_paths(data: Path, list_file: str, count: int) -> list[Path]:
    """The first ``count`` inspected boards of a DeepPCB list."""
    paths = [s.image_path for s in read_split(data, list_file)[:count]]
    if len(paths) < count:
        raise ValueError(f"{data / list_file} lists {len(paths)} boards, {count} needed")
    return paths


def percentiles_ms(seconds: list[float]) -> dict:
    p50, p90, p99 = np.percentile(np.asarray(seconds) * 1e3, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99)}


# ---------------------------------------------------------------------------------------------- ONNX Runtime


def detector_input(paths: list[Path], height: int, width: int) -> np.ndarray:
    """Boards as the detector sees them, [B,1,H,W] in [0,1]. DeepPCB boards are already 640x640, so the
    letterbox is the identity; other sizes are resized, which is fine for timing."""
    images = []
    for path in paths:
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise ValueError(f"{path}: not a readable image")
        if image.shape != (height, width):
            image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
        images.append(image)
    return np.stack(images)[:, None].astype(np.float32) / 255.0


def benchmark_onnx_runtime(
    model: Path, boards: list[Path], batch_sizes: list[int], threads: int, warmup: int, runs: int
) -> dict:
    """Latency of the detector on ONNX Runtime's CPU provider, per batch size."""
    import onnxruntime as ort
    from tqdm import tqdm

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    model_input = session.get_inputs()[0]
    height, width = model_input.shape[2:]
    results = []
    for batch in batch_sizes:
        feed = {model_input.name: detector_input([boards[i % len(boards)] for i in range(batch)], height, width)}
        for _ in range(warmup):
            session.run(None, feed)
        timings = []
        for _ in tqdm(range(runs), desc=f"onnxruntime batch {batch}", unit="run"):
            start = time.perf_counter()
            session.run(None, feed)
            timings.append(time.perf_counter() - start)
        per_batch = percentiles_ms(timings)
        results.append(
            {
                "batch": batch,
                "p50_ms_per_batch": per_batch["p50_ms"],
                "p90_ms_per_batch": per_batch["p90_ms"],
                "p50_ms_per_image": per_batch["p50_ms"] / batch,
                "p90_ms_per_image": per_batch["p90_ms"] / batch,
                "images_per_s_at_p50": 1e3 * batch / per_batch["p50_ms"],
            }
        )
    return {
        "model": str(model),
        "provider": "CPUExecutionProvider",
        "onnxruntime": ort.__version__,
        "intra_op_threads": threads,
        "warmup_runs": warmup,
        "timed_runs": runs,
        "boards": [str(p) for p in boards[: max(batch_sizes)]],
        "results": results,
    }


# ---------------------------------------------------------------------------------------------- perf_analyzer


def perf_analyzer_binary() -> Path:
    """perf_analyzer as installed by the tritonclient[all] wheel (into the environment's bin folder)."""
    beside_python = Path(sys.executable).parent / "perf_analyzer"
    found = beside_python if beside_python.exists() else shutil.which("perf_analyzer")
    if not found:
        raise FileNotFoundError("perf_analyzer not found: pip install 'tritonclient[all]==2.51.0'")
    return Path(found)


def perf_analyzer_environment() -> dict:
    """perf_analyzer links libcudart.so.12 even for CPU-only runs; the nvidia-cuda-runtime-cu12 wheel has it."""
    spec = importlib.util.find_spec("nvidia.cuda_runtime")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("libcudart.so.12 missing: pip install nvidia-cuda-runtime-cu12")
    library_dir = Path(list(spec.submodule_search_locations)[0]) / "lib"
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(library_dir), env.get("LD_LIBRARY_PATH")]))
    return env


def write_perf_analyzer_input(boards: list[Path], path: Path) -> None:
    """perf_analyzer real-input JSON: one encoded board per request, round-robin. A BYTES element is a
    4-byte little-endian length followed by the bytes, and that whole string is what gets base64-encoded."""
    entries = []
    for board in boards:
        encoded = board.read_bytes()
        serialized = struct.pack("<I", len(encoded)) + encoded
        entries.append({"IMAGE": {"content": {"b64": base64.b64encode(serialized).decode("ascii")}, "shape": [1]}})
    path.write_text(json.dumps({"data": entries}))


@dataclass(frozen=True)
class Measurement:
    """How long to measure each concurrency level."""

    window_ms: int  # perf_analyzer measurement window; the Python client measures 3 windows
    max_trials: int  # windows perf_analyzer may take to reach a stable figure
    stability_percent: float  # how far the last 3 windows may differ and still count as stable

    def perf_analyzer_flags(self) -> list[str]:
        # Not --request-count: perf_analyzer 2.51 then divides the count by a fixed window, not by the time taken.
        return [
            "--measurement-interval", str(self.window_ms),
            "--max-trials", str(self.max_trials),
            "--stability-percentage", f"{self.stability_percent:g}",
        ]  # fmt: skip


def run_perf_analyzer(url: str, boards: list[Path], concurrency: list[int], measurement: Measurement) -> list[dict]:
    """Sweep client concurrency with perf_analyzer over gRPC, one image per request; latencies in ms."""
    binary = perf_analyzer_binary()
    env = perf_analyzer_environment()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        input_json = Path(tmp) / "boards.json"
        write_perf_analyzer_input(boards, input_json)
        for level in concurrency:
            csv_path = Path(tmp) / f"concurrency_{level}.csv"
            command = [
                str(binary), "-m", PIPELINE, "-u", url, "-i", "grpc", "-b", "1",
                "--input-data", str(input_json),
                "--concurrency-range", f"{level}:{level}",
                "-f", str(csv_path),
                *measurement.perf_analyzer_flags(),
            ]  # fmt: skip
            print(f"perf_analyzer concurrency {level} ...", flush=True)
            completed = subprocess.run(command, env=env, capture_output=True, text=True)
            if completed.returncode != 0 or not csv_path.exists():
                output = [line for line in (completed.stdout + completed.stderr).splitlines() if line.strip()]
                reason = output[-1] if output else "no output"
                raise RuntimeError(f"perf_analyzer failed (exit {completed.returncode}): {reason}")
            with csv_path.open() as handle:
                row = next(csv.DictReader(handle))
            results.append(
                {
                    "concurrency": int(row["Concurrency"]),
                    "throughput_per_s": float(row["Inferences/Second"]),
                    "p50_ms": float(row["p50 latency"]) / 1e3,  # perf_analyzer reports microseconds
                    "p90_ms": float(row["p90 latency"]) / 1e3,
                    "p99_ms": float(row["p99 latency"]) / 1e3,
                }
            )
    return results


# ---------------------------------------------------------------------------------------------- Python client


def _send_back_to_back(
    url: str, encoded: list[bytes], first: int, step: int, deadline: float, latencies: list[float], lock: threading.Lock
) -> None:
    """One client thread: boards ``first``, ``first + step``, ... one per request until ``deadline``."""
    from tools.client import PipelineClient

    with PipelineClient(url=url) as client:
        client.infer([encoded[first % len(encoded)]])  # warm-up, not timed
        sent = first
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            client.infer([encoded[sent % len(encoded)]])
            with lock:
                latencies.append(time.perf_counter() - start)
            sent += step


def run_python_client(url: str, boards: list[Path], concurrency: list[int], seconds: float) -> list[dict]:
    """Fallback measurement: ``level`` threads, each with its own gRPC client, send one board per request
    back to back for ``seconds``; throughput counts completed requests."""
    encoded = [b.read_bytes() for b in boards]
    results = []
    for level in concurrency:
        print(f"python client concurrency {level} ...", flush=True)
        latencies: list[float] = []
        lock = threading.Lock()
        began = time.perf_counter()
        threads = [
            threading.Thread(target=_send_back_to_back, args=(url, encoded, i, level, began + seconds, latencies, lock))
            for i in range(level)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - began
        results.append(
            {"concurrency": level, "throughput_per_s": len(latencies) / elapsed, **percentiles_ms(latencies)}
        )
    return results


def benchmark_server(
    url: str, boards: list[Path], concurrency: list[int], client: str, measurement: Measurement
) -> dict:
    """End-to-end figures of the live pipeline, from perf_analyzer or, failing that, the Python client."""
    tool, note = "perf_analyzer", ""
    python_seconds = 3 * measurement.window_ms / 1e3
    if client == "perf_analyzer":
        try:
            results = run_perf_analyzer(url, boards, concurrency, measurement)
        except (FileNotFoundError, RuntimeError) as error:
            print(f"{error}\nFalling back to the Python client.", file=sys.stderr)
            tool, note = "python-client fallback", f"perf_analyzer did not give figures: {error}"
            results = run_python_client(url, boards, concurrency, python_seconds)
    else:
        tool = "python-client fallback"
        results = run_python_client(url, boards, concurrency, python_seconds)
    for row in results:
        row["meets_throughput_target"] = row["throughput_per_s"] > TARGETS["throughput_per_s"]
        row["meets_p50_target"] = row["p50_ms"] < TARGETS["p50_ms"]
        row["meets_p99_target"] = row["p99_ms"] < TARGETS["p99_ms"]
    return {
        "tool": tool,
        "note": note,
        "url": url,
        "model": PIPELINE,
        "boards": len(boards),
        "measurement": asdict(measurement),
        "targets": TARGETS,
        "results": results,
    }


# ---------------------------------------------------------------------------------------------- report


def machine_description() -> dict:
    return {"cpus": os.cpu_count(), "gpu": shutil.which("nvidia-smi") is not None}


def markdown_report(report: dict) -> str:
    machine = report["machine"]
    lines = [
        "# Benchmark",
        "",
        f"Machine: {machine['cpus']} CPU cores, GPU: {'yes' if machine['gpu'] else 'none'}.",
        "",
    ]
    if "onnx_runtime" in report:
        ort_report = report["onnx_runtime"]
        lines += [
            "## Detector on ONNX Runtime (CPU)",
            "",
            f"`{Path(ort_report['model']).name}`, onnxruntime {ort_report['onnxruntime']}, "
            f"{ort_report['intra_op_threads']} intra-op threads, {ort_report['timed_runs']} timed runs after "
            f"{ort_report['warmup_runs']} warm-up runs, real DeepPCB boards.",
            "",
            "| batch | p50 ms/batch | p90 ms/batch | p50 ms/image | p90 ms/image | images/s at p50 |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in ort_report["results"]:
            lines.append(
                f"| {r['batch']} | {r['p50_ms_per_batch']:.1f} | {r['p90_ms_per_batch']:.1f} | {r['p50_ms_per_image']:.1f} "
                f"| {r['p90_ms_per_image']:.1f} | {r['images_per_s_at_p50']:.1f} |"
            )
        lines.append("")
    if "server" in report:
        server = report["server"]
        targets = server["targets"]
        lines += [
            f"## End to end: `{server['model']}` over gRPC ({server['tool']})",
            "",
            f"One encoded board per request, {server['boards']} real boards sent round-robin. Design targets (GPU "
            f"server): > {targets['throughput_per_s']:.0f} inferences/s, p50 < {targets['p50_ms']:.0f} ms, "
            f"p99 < {targets['p99_ms']:.0f} ms. {measurement_sentence(server)}",
            "",
        ]
        if server["note"]:
            lines += [f"Note: {server['note']}", ""]
        lines += [
            "| concurrency | inferences/s | p50 ms | p90 ms | p99 ms | targets met |",
            "|---:|---:|---:|---:|---:|---|",
        ]
        for r in server["results"]:
            met = [
                name
                for name, key in (
                    ("throughput", "meets_throughput_target"),
                    ("p50", "meets_p50_target"),
                    ("p99", "meets_p99_target"),
                )
                if r[key]
            ]
            figures = " | ".join(f"{r[k]:.1f}" for k in ("throughput_per_s", "p50_ms", "p90_ms", "p99_ms"))
            lines.append(f"| {r['concurrency']} | {figures} | {', '.join(met) or 'none'} |")
        lines += ["", server_verdict(report), ""]
    return "\n".join(lines)


def measurement_sentence(server: dict) -> str:
    measurement = server["measurement"]
    if server["tool"] != "perf_analyzer":
        return f"Each level ran for {3 * measurement['window_ms'] / 1e3:g} s."
    return (
        f"perf_analyzer measured {measurement['window_ms']} ms windows until the last 3 agreed within "
        f"{measurement['stability_percent']:g} % (at most {measurement['max_trials']} windows)."
    )


def server_verdict(report: dict) -> str:
    """One honest sentence on what this machine reaches against the GPU targets."""
    results = report["server"]["results"]
    best = max(results, key=lambda r: r["throughput_per_s"])
    fastest = min(results, key=lambda r: r["p50_ms"])
    hardware = (
        "this GPU machine"
        if report["machine"]["gpu"]
        else f"this {report['machine']['cpus']}-core CPU machine (no GPU)"
    )
    all_met = all(best[k] for k in ("meets_throughput_target", "meets_p50_target", "meets_p99_target"))
    return (
        f"On {hardware} the pipeline peaks at {best['throughput_per_s']:.1f} inferences/s (concurrency "
        f"{best['concurrency']}, p50 {best['p50_ms']:.1f} ms, p99 {best['p99_ms']:.1f} ms); the lowest p50 is "
        f"{fastest['p50_ms']:.1f} ms at concurrency {fastest['concurrency']}. "
        + ("All design targets are met at peak throughput." if all_met else "The GPU design targets are not met here.")
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["onnx", "server", "all"])
    parser.add_argument("--data", type=Path, default=DEFAULT_ROOT, help="DeepPCB folder the boards come from")
    parser.add_argument("--list", default="trainval.txt", help="list file inside --data")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmark"))
    onnx_group = parser.add_argument_group("ONNX Runtime")
    onnx_group.add_argument("--model", type=Path, default=DEFAULT_ONNX)
    onnx_group.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    onnx_group.add_argument("--threads", type=int, default=2)
    onnx_group.add_argument("--warmup", type=int, default=5)
    onnx_group.add_argument("--runs", type=int, default=30)
    server_group = parser.add_argument_group("live server")
    server_group.add_argument("--url", default="localhost:8001", help="Triton gRPC address")
    server_group.add_argument("--start-server", action="store_true", help="start a local Triton for the run")
    server_group.add_argument(
        "--model-repository", type=Path, default=MODEL_REPOSITORY, help="what --start-server serves"
    )
    server_group.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    server_group.add_argument("--boards", type=int, default=16, help="distinct boards sent round-robin")
    server_group.add_argument("--client", choices=["perf_analyzer", "python"], default="perf_analyzer")
    server_group.add_argument("--measurement-ms", type=int, default=3000, help="perf_analyzer window")
    server_group.add_argument("--max-trials", type=int, default=5, help="perf_analyzer windows to reach stability")
    server_group.add_argument(
        "--stability-percentage",
        type=float,
        default=10.0,
        help="perf_analyzer's tolerance between its last 3 windows; raise it on a busy machine",
    )
    args = parser.parse_args(argv)

    report: dict = {"machine": machine_description()}
    if args.what in ("onnx", "all"):
        boards = board_paths(args.data, args.list, max(args.batch))
        report["onnx_runtime"] = benchmark_onnx_runtime(
            args.model, boards, args.batch, args.threads, args.warmup, args.runs
        )
    if args.what in ("server", "all"):
        boards = board_paths(args.data, args.list, args.boards)
        with serving(args.url, args.start_server, args.model_repository) as url:
            measurement = Measurement(args.measurement_ms, args.max_trials, args.stability_percentage)
            report["server"] = benchmark_server(url, boards, args.concurrency, args.client, measurement)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmark.json").write_text(json.dumps(report, indent=2))
    (args.out / "benchmark.md").write_text(markdown_report(report))
    print(markdown_report(report))
    print(f"wrote {args.out / 'benchmark.json'} and {args.out / 'benchmark.md'}")
    return report


if __name__ == "__main__":
    main()
