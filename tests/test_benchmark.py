"""tools.benchmark without timing anything: the perf_analyzer input encoding and the report rendering."""
import base64
import json
import struct

from tools.benchmark import Measurement, markdown_report, write_perf_analyzer_input


def test_perf_analyzer_input_is_length_prefixed_encoded_boards(tmp_path):
    # perf_analyzer's BYTES element = 4-byte little-endian length, then the bytes; base64 of that whole string.
    boards = [tmp_path / "a.jpg", tmp_path / "b.png"]
    boards[0].write_bytes(b"\xff\xd8jpeg\x00")
    boards[1].write_bytes(b"\x89PNG")
    write_perf_analyzer_input(boards, tmp_path / "input.json")
    entries = json.loads((tmp_path / "input.json").read_text())["data"]
    assert [e["IMAGE"]["shape"] for e in entries] == [[1], [1]]
    decoded = [base64.b64decode(e["IMAGE"]["content"]["b64"]) for e in entries]
    assert decoded == [struct.pack("<I", 7) + b"\xff\xd8jpeg\x00", struct.pack("<I", 4) + b"\x89PNG"]


def test_measurement_flags():
    assert Measurement(2000, 4, 50.0).perf_analyzer_flags() == [
        "--measurement-interval", "2000", "--max-trials", "4", "--stability-percentage", "50"
    ]


def test_report_compares_with_the_targets():
    row = {"concurrency": 2, "throughput_per_s": 600.0, "p50_ms": 20.0, "p90_ms": 40.0, "p99_ms": 120.0,
           "meets_throughput_target": True, "meets_p50_target": True, "meets_p99_target": False}
    report = {
        "machine": {"cpus": 2, "gpu": False},
        "server": {"tool": "perf_analyzer", "note": "", "url": "x", "model": "pcb_pipeline", "boards": 4,
                   "measurement": {"window_ms": 2000, "max_trials": 4, "stability_percent": 10.0},
                   "targets": {"throughput_per_s": 500.0, "p50_ms": 50.0, "p99_ms": 100.0}, "results": [row]},
    }
    text = markdown_report(report)
    assert "| 2 | 600.0 | 20.0 | 40.0 | 120.0 | throughput, p50 |" in text
    assert "The GPU design targets are not met here." in text
