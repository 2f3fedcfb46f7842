"""tools.eval.benchmark without asserting any timing: the perf_analyzer input encoding, the statistics deltas,
the report rendering, and a smoke run of every part against the live server with very short windows."""
import base64
import importlib.util
import json
import struct

import pytest

from tools.contract import CPU_CONFIG_NAME, load_repository, served_contract
from tools.eval.benchmark import server_stats
from tools.eval.benchmark.__main__ import main
from tools.eval.benchmark.bare_detector import ServedDetector, bare_batch_sizes
from tools.eval.benchmark.perf_analyzer import (
    Measurement,
    PerfAnalyzerUnavailable,
    cuda_runtime_library_dir,
    write_perf_analyzer_input,
)
from tools.eval.benchmark.report import PLOT_FILE, markdown_report
from tools.eval.benchmark.server_stats import (
    PHASES,
    ModelCounters,
    settled_snapshot,
    stage_breakdown,
    stage_models,
)
from tools.pipeline_math import scan_windows

CONTRACT = served_contract(CPU_CONFIG_NAME)


def test_perf_analyzer_input_is_length_prefixed_encoded_boards(tmp_path):
    # perf_analyzer's BYTES element = 4-byte little-endian length, then the bytes; base64 of that whole string.
    boards = [tmp_path / "a.jpg", tmp_path / "b.png"]
    boards[0].write_bytes(b"\xff\xd8jpeg\x00")
    boards[1].write_bytes(b"\x89PNG")
    write_perf_analyzer_input(boards, tmp_path / "input.json", CONTRACT)
    entries = json.loads((tmp_path / "input.json").read_text())["data"]
    assert [e[CONTRACT.image_input]["shape"] for e in entries] == [[1], [1]]
    decoded = [base64.b64decode(e[CONTRACT.image_input]["content"]["b64"]) for e in entries]
    assert decoded == [struct.pack("<I", 7) + b"\xff\xd8jpeg\x00", struct.pack("<I", 4) + b"\x89PNG"]


def test_perf_analyzer_input_carries_the_templates(tmp_path):
    board, template = tmp_path / "X_test.png", tmp_path / "X_temp.png"
    board.write_bytes(b"board")
    template.write_bytes(b"template")
    write_perf_analyzer_input([board], tmp_path / "input.json", CONTRACT, with_templates=True)
    (entry,) = json.loads((tmp_path / "input.json").read_text())["data"]
    assert base64.b64decode(entry[CONTRACT.template_input]["content"]["b64"]) == struct.pack("<I", 8) + b"template"
    with pytest.raises(SystemExit, match="has no template"):
        write_perf_analyzer_input([template], tmp_path / "input.json", CONTRACT, with_templates=True)


def test_measurement_flags():
    assert Measurement(2000, 4, 50.0).perf_analyzer_flags() == [
        "--measurement-interval", "2000", "--max-trials", "4", "--stability-percentage", "50"
    ]


def test_missing_nvidia_namespace_says_what_to_install(monkeypatch):
    # Without any nvidia.* package, find_spec("nvidia.cuda_runtime") raises instead of returning None.
    def no_nvidia(name, *args):
        raise ModuleNotFoundError("No module named 'nvidia'")

    monkeypatch.setattr(importlib.util, "find_spec", no_nvidia)
    with pytest.raises(PerfAnalyzerUnavailable, match="nvidia-cuda-runtime-cu12"):
        cuda_runtime_library_dir()


def test_stage_breakdown_is_per_request_over_the_level():
    before = ModelCounters(10, 10_000_000, 10, 10, {phase: 1_000_000 for phase in PHASES})
    after = ModelCounters(14, 50_000_000, 12, 14, {phase: 9_000_000 for phase in PHASES})
    stages = stage_breakdown({"detector": before}, {"detector": after})["detector"]
    assert stages["requests"] == 4
    assert stages["mean_batch"] == 2.0
    assert stages["request_ms"] == 10.0
    assert stages["compute_infer_ms"] == 2.0


def lagging_server(monkeypatch, counts: list[int]):
    """A server whose scan model's request counter reads ``counts`` on successive snapshots, then stays."""
    readings = iter(counts)
    last = [counts[0]]

    def snapshot(url, models):
        last[0] = next(readings, last[0])
        return {"scan": ModelCounters(last[0], 0, last[0], last[0], {phase: 0 for phase in PHASES})}

    monkeypatch.setattr(server_stats, "snapshot", snapshot)


def test_settled_snapshot_waits_for_statistics_reported_after_the_response(monkeypatch):
    # The Python backend counts a request just after sending its response: the first reads still miss it.
    lagging_server(monkeypatch, [3, 3, 4])
    assert settled_snapshot("url", ["scan"], {"scan": 4}, poll_s=0.001)["scan"].requests == 4
    lagging_server(monkeypatch, [3, 4, 5, 5])  # no expectation: until two reads agree
    assert settled_snapshot("url", ["scan"], poll_s=0.001)["scan"].requests == 5


def test_settled_snapshot_says_when_requests_go_uncounted(monkeypatch):
    lagging_server(monkeypatch, [3])
    with pytest.raises(RuntimeError, match=r"did not count the requests sent.*'scan': \(3, 5\)"):
        settled_snapshot("url", ["scan"], {"scan": 5}, timeout_s=0.05, poll_s=0.001)


def test_report_compares_with_the_targets():
    stages = {"requests": 4, "mean_batch": 1.0, "request_ms": 9.0,
              **{f"{phase}_ms": 1.0 for phase in PHASES}}
    row = {"concurrency": 2, "throughput_per_s": 600.0, "p50_ms": 20.0, "p90_ms": 40.0, "p99_ms": 120.0,
           "meets_throughput_target": True, "meets_p50_target": True, "meets_p99_target": False,
           "stages": {CONTRACT.detector_model: stages},
           "cpu": {"available": True, "inferences": 4, "serving_core_ms_per_inference": 16.0,
                   "core_ms_per_inference": {"load generator": 4.0, "tritonserver": 6.0,
                                             f"{CONTRACT.detector_model} stub": 10.0}}}
    report = {
        "machine": {"cpus": 2, "gpu": False},
        "pipeline": {"tool": "perf_analyzer", "note": "", "url": "x", "model": CONTRACT.pipeline_model,
                     "stage_models": [CONTRACT.detector_model], "detector_model": CONTRACT.detector_model,
                     "boards": 4, "score_threshold": None,
                     "default_score_threshold": CONTRACT.score_threshold,
                     "measurement": {"window_ms": 2000, "max_trials": 4, "stability_percent": 10.0},
                     "targets": {"throughput_per_s": 500.0, "p50_ms": 50.0, "p99_ms": 100.0}, "results": [row]},
    }
    text = markdown_report(report)
    assert "| 2 | 600.0 | 20.0 | 40.0 | 120.0 | throughput, p50 |" in text
    assert "The GPU design targets are not met here." in text
    assert f"| 2 | {CONTRACT.detector_model} | 4 | 1.00 | 1.00 | 1.00 | 1.00 | 1.00 | 9.00 |" in text
    # 2 cores: 2000 core-ms/s over 16 core-ms per inference serving alone, over 20 with the load generator
    assert "| 2 | 600.0 | 4.00 | 6.00 | 10.00 | 16.00 | 125/s | 100/s |" in text

    bare = {"model": "m.onnx", "onnxruntime": "x", "intra_op_threads": 2, "timed_runs": 1, "warmup_runs": 0,
            "boards": 4, "results": [{"batch": 4, "p50_ms_per_batch": 20.0, "p90_ms_per_batch": 20.0,
                                      "p50_ms_per_image": 5.0, "p90_ms_per_image": 5.0,
                                      "images_per_s_at_p50": 200.0, "core_ms_per_image": 8.0}]}
    text = markdown_report({**report, "bare_detector": bare})
    # the rest of the serving (16 - 10 = 6 core-ms) on top of the bare 8: 2000 / 14 = 143/s, 0.71 of 200/s
    assert "the rest of the serving 6.00 core-ms per inference" in text and "at 0.71 of the bare" in text


def test_benchmark_all_parts_against_the_live_server(triton_server, deeppcb_root, tmp_path):
    report = main([
        "all", "--url", triton_server.grpc_url, "--data", str(deeppcb_root), "--out", str(tmp_path),
        "--boards", "4", "--warmup", "0", "--runs", "1", "--concurrency", "1", "2",
        "--measurement-ms", "1000", "--max-trials", "3", "--stability-percentage", "1000",
        "--score-threshold", str(CONTRACT.score_threshold),  # exercises the request parameter, same work
    ])  # fmt: skip

    detector = ServedDetector.from_cpu_config(CONTRACT)
    bare = report["bare_detector"]
    assert (bare["model"], bare["intra_op_threads"]) == (str(detector.model_path), detector.intra_op_threads)
    assert [r["batch"] for r in bare["results"]] == bare_batch_sizes(CONTRACT)

    pipeline = report["pipeline"]
    assert pipeline["tool"] == "perf_analyzer", pipeline["note"]
    assert [r["concurrency"] for r in pipeline["results"]] == [1, 2]
    models = stage_models(CONTRACT)
    for row in pipeline["results"]:
        assert set(row["stages"]) == set(models)
        assert all(row["stages"][model]["requests"] > 0 for model in models)
        cpu = row["cpu"]
        assert cpu["available"], cpu.get("reason")
        assert cpu["inferences"] == row["stages"][CONTRACT.pipeline_model]["requests"]
        assert {"tritonserver", "load generator", *(f"{model} stub" for model in models[:3])} <= set(
            cpu["core_ms_per_inference"])
        assert cpu["core_ms_per_inference"][f"{CONTRACT.detector_model} stub"] > 0
    assert all(r["core_ms_per_image"] > 0 for r in bare["results"])

    assert None not in report["comparison"].values()

    memory = report["memory"]
    assert memory["available"], memory.get("reason")
    assert memory["server"]["rss_mib"] > 0
    python_models = {name for name, config in load_repository("cpu").items() if config.backend == "python"}
    assert {stub["model"] for stub in memory["stubs"]} == python_models  # all Python backend on CPU
    assert all(stub["rss_mib"] > 0 for stub in memory["stubs"])

    assert json.loads((tmp_path / "benchmark.json").read_text())["pipeline"]["tool"] == "perf_analyzer"
    assert (tmp_path / PLOT_FILE).stat().st_size > 0
    text = (tmp_path / "benchmark.md").read_text()
    for heading in ("## Detector alone", "## End to end", "## Pipeline against the bare detector",
                    "## Where the time goes", "## Where the CPU goes", "## Resident memory"):
        assert heading in text


def test_benchmark_scan_with_templates_against_the_live_server(triton_server, deeppcb_root, tmp_path):
    report = main(["scan", "--url", triton_server.grpc_url, "--data", str(deeppcb_root), "--out", str(tmp_path),
                   "--scan-side", "1280", "--scans", "1", "--scan-concurrency", "1", "--with-templates"])
    (row,) = report["scans"]
    assert row["with_template"] and row["scans"] == 1 and row["tiles_per_scan"] == len(scan_windows(1280, 1280))
    assert row["stages"][CONTRACT.scan_model]["requests"] == 1
    assert "scan of real boards per request, with its template" in (tmp_path / "benchmark.md").read_text()
