"""Soak test: saturation load of good boards and bad inputs on a local server, watching memory for leaks.

    python -m tools.soak --minutes 10 [--overload 1.25 | --rate R] [--bad-fraction 0.1] [--scan-fraction 0.02]
        [--sample-s 10] [--out out/soak]

It starts a local server (CPU configs, free ports, with its supervisor), measures what the pipeline answers
per second with 4 clients, then sends requests at ``--overload`` times that rate, open loop (each on time,
whatever the answers), no client retries. The mix: synthetic good boards (tools.data.synth_boards, only those
whose answer is the same at thresholds 0.05 either side of the deployed one, so batching cannot flip it),
bad inputs (each of the rejection reasons of the pcb_rejected_images_total metric: empty, not an image, cut
short, over the pixel limit, a threshold out of range) and whole-board scans through pcb_scan.

Every answer is classed: a good board answered with its warm-up answer is ok, with another answer or any
error but overload is a *failed good request* (must be 0); UNAVAILABLE for overload (the bounded queues) is an
*overload rejection*; a bad input refused with INVALID_ARG is as it should be. Every ``--sample-s`` it reads
the resident memory (RSS, and the private part of it) of tritonserver and of each Python-backend stub, and the
server's /dev/shm regions. Memory is flat when the private memory grows less than 5 % or 20 MiB over the run's
second half (RSS also counts the /dev/shm pages, which grow to the largest batch seen).

Writes ``soak.json`` (every sample and the summary) and ``soak.png`` (memory, /dev/shm, answers per second over
time) to ``--out``; exit code 0 when no good request failed and the memory stayed flat, 1 otherwise.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm
from tritonclient.utils import InferenceServerException

from tools.client import PipelineClient
from tools.contract import CPU_CONFIG_NAME, ServedContract, served_contract
from tools.data.deeppcb import read_split
from tools.data.synth_boards.dataset import write_dataset
from tools.detections import Detections
from tools.eval.benchmark.latency import percentiles_ms
from tools.eval.benchmark.memory import resident_mib, stub_processes
from tools.serve.healthcheck import OVERLOAD_MESSAGES, exec_counts
from tools.serve.triton_server import TritonServer

GOOD_BOARDS = 32
SCAN_SIZE = (1600, 1280)  # width, height: 12 tiles
THRESHOLD_MARGIN = 0.05  # a good board's answer must not change within this of the deployed threshold
CALIBRATION_S = 15.0
CALIBRATION_CLIENTS = 4
MAX_IN_FLIGHT = 256  # requests a client keeps open at once; past that a due request is not sent (counted)
LEAK_TOLERANCE = (0.05, 20.0)  # RSS growth over the run's second half allowed: 5 % or 20 MiB, the larger
TOO_LARGE_SIDES = (60000, 50000)  # a header declaring 3 G pixels


@dataclass(frozen=True)
class Case:
    """One kind of request of the mix: ``expected`` is the answer (Detections) or the rejection reason."""

    name: str
    image: bytes
    expected: object
    scan: bool = False
    parameters: dict = field(default_factory=dict)


def declaring_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header (SOF0) rewritten to declare width x height: refused before decoding."""
    data = bytearray(jpeg)
    frame = data.index(b"\xff\xc0")
    data[frame + 5 : frame + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def same_answer(a: Detections, b: Detections) -> bool:
    return (len(a) == len(b) and np.array_equal(np.sort(a.classes), np.sort(b.classes))
            and np.allclose(np.sort(a.boxes, axis=0), np.sort(b.boxes, axis=0), atol=2.0))


def make_cases(client: PipelineClient, contract: ServedContract, work_dir: Path) -> tuple[list[Case], list[Case], Case]:
    """(good boards, bad inputs, a scan), each good board with its answer as the server gives it now."""
    list_path = write_dataset(work_dir / "boards", GOOD_BOARDS, progress=False)
    samples = read_split(list_path.parent, list_path.name)
    good = []
    low, high = contract.score_threshold - THRESHOLD_MARGIN, contract.score_threshold + THRESHOLD_MARGIN
    for sample in samples:
        image = Path(sample.image_path).read_bytes()
        [answer] = client.infer([image])
        [at_low], [at_high] = client.infer([image], score_threshold=low), client.infer([image], score_threshold=high)
        if same_answer(at_low, at_high) and same_answer(answer, at_high):
            good.append(Case(Path(sample.image_path).name, image, answer))
    if not good:
        raise RuntimeError("no synthetic board has an answer away from the threshold")
    jpeg = good[0].image
    bad = [
        Case("empty", b"", "empty"),
        Case("not_an_image", b"%PDF-1.7 this is a document, not a board", "not_an_image"),
        Case("truncated", jpeg[: len(jpeg) // 2], "truncated"),
        Case("too_large", declaring_size(jpeg, *TOO_LARGE_SIDES), "too_large"),
        Case("bad_parameter", jpeg, "bad_parameter", parameters={"score_threshold": 2.0}),
    ]
    scan_list = write_dataset(work_dir / "scan", 1, SCAN_SIZE[0], SCAN_SIZE[1], image_format="png", progress=False)
    scan_image = Path(read_split(scan_list.parent, scan_list.name)[0].image_path).read_bytes()
    [scan_answer] = client.infer([scan_image], scans=True)
    return good, bad, Case("scan", scan_image, scan_answer, scan=True)


class Tally:
    """Outcome counts and latencies, thread-safe; ``interval()`` hands over what came since the last call."""

    def __init__(self):
        self.lock = threading.Lock()
        self.totals: dict[str, int] = {}
        self.failures: dict[str, int] = {}  # failed good requests by their error
        self._latencies: list[float] = []
        self._interval: dict[str, int] = {}

    def add(self, outcome: str, seconds: float | None = None, failure: str | None = None) -> None:
        with self.lock:
            self.totals[outcome] = self.totals.get(outcome, 0) + 1
            self._interval[outcome] = self._interval.get(outcome, 0) + 1
            if seconds is not None:
                self._latencies.append(seconds)
            if failure:
                self.failures[failure] = self.failures.get(failure, 0) + 1

    def interval(self) -> tuple[dict[str, int], list[float]]:
        with self.lock:
            counts, latencies = self._interval, self._latencies
            self._interval, self._latencies = {}, []
        return counts, latencies


def is_overload(error: InferenceServerException) -> bool:
    return error.status() == "StatusCode.UNAVAILABLE" and any(words in (error.message() or "")
                                                               for words in OVERLOAD_MESSAGES)


def send(client: PipelineClient, case: Case, tally: Tally) -> None:
    """One request of the mix, its outcome tallied."""
    good = isinstance(case.expected, Detections)
    started = time.monotonic()
    try:
        [answer] = client.infer([case.image], scans=case.scan, **case.parameters)
    except InferenceServerException as error:
        if is_overload(error):
            tally.add("overload_rejections")
        elif not good and error.status() == "StatusCode.INVALID_ARGUMENT":
            tally.add(f"rejected_{case.expected}")
        else:
            tally.add("failed_good" if good else "bad_wrongly_answered",
                      failure=f"{case.name}: {error.status()} {(error.message() or '')[:160]}")
        return
    seconds = time.monotonic() - started
    if not good:
        tally.add("bad_wrongly_answered", failure=f"{case.name}: answered")
    elif same_answer(answer, case.expected):
        tally.add("scans_ok" if case.scan else "good_ok", seconds)
    else:
        tally.add("failed_good", failure=f"{case.name}: {len(answer)} defects instead of {len(case.expected)}")


def measure_capacity(client: PipelineClient, good: list[Case], seconds: float) -> float:
    """Good boards answered per second by CALIBRATION_CLIENTS clients in a closed loop."""
    done, stop = [0], time.monotonic() + seconds
    lock = threading.Lock()

    def loop(offset: int):
        for case in itertools.islice(itertools.cycle(good), offset, None):
            if time.monotonic() >= stop:
                return
            client.infer([case.image])
            with lock:
                done[0] += 1

    started = time.monotonic()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(CALIBRATION_CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done[0] / (time.monotonic() - started)


def request_mix(good: list[Case], bad: list[Case], scan: Case, bad_fraction: float, scan_fraction: float):
    """An endless, deterministic stream of cases with the given shares of bad inputs and scans."""
    rng = np.random.default_rng(0)
    good_cycle, bad_cycle = itertools.cycle(good), itertools.cycle(bad)
    while True:
        draw = rng.random()
        yield scan if draw < scan_fraction else next(bad_cycle) if draw < scan_fraction + bad_fraction else next(good_cycle)


def private_mib(pid: int) -> float:
    """RssAnon in MiB: the process's own memory, without the shared-memory pages RSS also counts (the stubs'
    /dev/shm regions, mapped by them and by tritonserver, which grow to the largest batch seen)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0


def server_memory(server: TritonServer) -> dict:
    """RSS and private memory (MiB) of tritonserver and of each stub (by instance), and the MiB its stubs'
    /dev/shm regions hold."""
    rss = {"tritonserver": resident_mib(server.pid)["rss_mib"]}
    private = {"tritonserver": private_mib(server.pid)}
    shm = 0
    for stub in stub_processes(server.pid):
        try:
            rss[stub["instance"]] = resident_mib(stub["pid"])["rss_mib"]
            private[stub["instance"]] = private_mib(stub["pid"])
            region = (Path(f"/proc/{stub['pid']}/cmdline").read_bytes().split(b"\0")[2]).decode()
            shm += os.stat(f"/dev/shm/{region}").st_blocks * 512
        except (OSError, IndexError):
            continue  # restarted meanwhile
    usage = os.statvfs("/dev/shm")
    return {"rss_mib": rss, "private_mib": private, "server_shm_mib": shm / 2**20,
            "dev_shm_used_mib": (usage.f_blocks - usage.f_bfree) * usage.f_frsize / 2**20}


def drive(client: PipelineClient, mix, rate: float, seconds: float, tally: Tally, server: TritonServer,
          sample_s: float) -> list[dict]:
    """Send the mix at ``rate`` per second for ``seconds``; a memory and outcome sample every ``sample_s``."""
    samples, in_flight = [], threading.Semaphore(MAX_IN_FLIGHT)
    started = time.monotonic()
    next_sample = started + sample_s

    def take_sample() -> None:
        counts, latencies = tally.interval()
        sample = {"t_s": round(time.monotonic() - started, 1), **server_memory(server), "counts": counts}
        if latencies:
            sample.update(percentiles_ms(latencies))
        samples.append(sample)

    def one(case: Case) -> None:
        try:
            send(client, case, tally)
        finally:
            in_flight.release()

    take_sample()
    with ThreadPoolExecutor(MAX_IN_FLIGHT, "soak") as pool, tqdm(total=round(seconds), unit="s", desc="soak") as bar:
        for index, case in enumerate(mix):
            due = started + index / rate
            if due - started >= seconds:
                break
            now = time.monotonic()
            if now >= next_sample:
                take_sample()
                bar.update(round(samples[-1]["t_s"]) - bar.n)
                bar.set_postfix(ok=tally.totals.get("good_ok", 0), overload=tally.totals.get("overload_rejections", 0),
                                failed=tally.totals.get("failed_good", 0), rss=round(sum(samples[-1]["rss_mib"].values())))
                next_sample += sample_s
            if due > now:
                time.sleep(due - now)
            if not in_flight.acquire(blocking=False):
                tally.add("not_sent_client_busy")
                continue
            pool.submit(one, case)
    take_sample()
    return samples


def memory_trend(samples: list[dict], key: str) -> dict:
    """Per process, of the memory ``key`` (rss_mib or private_mib): at the start, after warm-up (a quarter in)
    and at the end, the growth over the second half and its slope, and whether that stays within LEAK_TOLERANCE."""
    names = sorted({name for sample in samples for name in sample[key]})
    trend = {}
    half = len(samples) // 2
    for name in names:
        points = [(s["t_s"], s[key][name]) for s in samples if name in s[key]]
        t, rss = np.array(points).T
        second = slice(min(half, len(t) - 2), None)
        slope = float(np.polyfit(t[second], rss[second], 1)[0]) * 3600 if len(t[second]) >= 2 else 0.0
        growth = float(rss[-1] - rss[second][0])
        allowed = max(LEAK_TOLERANCE[0] * rss[second][0], LEAK_TOLERANCE[1])
        trend[name] = {"start_mib": round(float(rss[0]), 1), "quarter_mib": round(float(rss[len(rss) // 4]), 1),
                       "end_mib": round(float(rss[-1]), 1), "second_half_growth_mib": round(growth, 1),
                       "second_half_slope_mib_per_h": round(slope, 1), "flat": bool(growth <= allowed)}
    return trend


def plot(report: dict, path: Path) -> None:
    samples = report["samples"]
    t = [s["t_s"] / 60 for s in samples]
    figure = Figure(figsize=(9, 10), dpi=110)
    FigureCanvasAgg(figure)
    memory, shm, answers = figure.subplots(3, 1, sharex=True)
    for name in sorted({n for s in samples for n in s["rss_mib"]}):
        memory.plot([s["t_s"] / 60 for s in samples if name in s["rss_mib"]],
                    [s["rss_mib"][name] for s in samples if name in s["rss_mib"]], label=name)
    memory.set_ylabel("RSS (MiB)")
    memory.set_ylim(bottom=0)
    memory.legend(fontsize=7, ncol=2)
    memory.set_title(f"soak: {report['minutes']:g} min at {report['rate_per_s']:.0f} requests/s, "
                     f"{report['rate_per_s'] / report['capacity_per_s']:.2f} x the {report['capacity_per_s']:.0f} "
                     f"boards/s measured at the start")
    shm.plot(t, [s["server_shm_mib"] for s in samples], label="this server's stubs' regions")
    shm.plot(t, [s["dev_shm_used_mib"] for s in samples], label="/dev/shm used (whole machine)")
    shm.set_ylabel("/dev/shm (MiB)")
    shm.set_ylim(bottom=0)
    shm.legend(fontsize=7)
    intervals = np.diff([s["t_s"] for s in samples], prepend=0.0)
    for outcome in ("good_ok", "overload_rejections", "failed_good", "scans_ok"):
        answers.plot(t[1:], [s["counts"].get(outcome, 0) / max(dt, 1e-9) for s, dt in zip(samples[1:], intervals[1:])],
                     label=outcome)
    rejected = [sum(v for k, v in s["counts"].items() if k.startswith("rejected_")) / max(dt, 1e-9)
                for s, dt in zip(samples[1:], intervals[1:])]
    answers.plot(t[1:], rejected, label="bad inputs rejected")
    answers.set_ylabel("per second")
    answers.set_xlabel("minutes")
    answers.legend(fontsize=7)
    for axes in (memory, shm, answers):
        axes.grid(True, alpha=0.3)
    figure.savefig(path)


def pcb_metrics(metrics_url: str) -> dict[str, float]:
    """The pcb_* counters on the server's metrics endpoint."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        lines = response.read().decode().splitlines()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines
            if line.startswith(("pcb_inspected_images_total", "pcb_rejected_images_total", "pcb_model_restarts_total"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to drive the load")
    parser.add_argument("--overload", type=float, default=1.25, help="requests per second, times the measured capacity")
    parser.add_argument("--rate", type=float, help="requests per second instead (the capacity is still measured)")
    parser.add_argument("--bad-fraction", type=float, default=0.1, help="share of bad inputs")
    parser.add_argument("--scan-fraction", type=float, default=0.02, help="share of whole-board scans")
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between memory samples")
    parser.add_argument("--out", type=Path, default=Path("out/soak"), help="folder for soak.json and soak.png")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.overload <= 0 or not 0 <= args.bad_fraction + args.scan_fraction < 1:
        parser.error("need --minutes > 0, --overload > 0 and bad + scan fractions below 1")
    args.out.mkdir(parents=True, exist_ok=True)
    contract = served_contract(CPU_CONFIG_NAME)

    with tempfile.TemporaryDirectory(prefix="soak-") as work, \
            TritonServer.on_free_ports(model_config_name=CPU_CONFIG_NAME) as server, \
            PipelineClient(server.grpc_url, contract=contract, max_attempts=1, timeout_s=120) as client:
        print(f"server up (pid {server.pid}); preparing inputs and measuring capacity ...", flush=True)
        good, bad, scan = make_cases(client, contract, Path(work))
        capacity = measure_capacity(client, good, CALIBRATION_S)
        rate = args.rate or args.overload * capacity
        print(f"{len(good)} good boards, {len(bad)} kinds of bad input, one {SCAN_SIZE[0]}x{SCAN_SIZE[1]} scan; "
              f"capacity {capacity:.1f} boards/s, driving {rate:.1f} requests/s for {args.minutes:g} min", flush=True)
        before = pcb_metrics(server.metrics_url)
        tally = Tally()
        samples = drive(client, request_mix(good, bad, scan, args.bad_fraction, args.scan_fraction), rate,
                        args.minutes * 60, tally, server, args.sample_s)
        after = pcb_metrics(server.metrics_url)
        restarts = [vars(r) for r in (server.supervisor.restarts if server.supervisor else [])]
        steps = (contract.preprocess_model, contract.detector_model, contract.postprocess_model)
        executions = exec_counts(server.metrics_url, steps, 10.0)

    trend, private = memory_trend(samples, "rss_mib"), memory_trend(samples, "private_mib")
    totals = tally.totals
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
        "minutes": args.minutes, "overload": round(rate / capacity, 2), "capacity_per_s": round(capacity, 1),
        "rate_per_s": round(rate, 1), "bad_fraction": args.bad_fraction, "scan_fraction": args.scan_fraction,
        "totals": totals,
        "failed_good_requests": totals.get("failed_good", 0),
        "failures": tally.failures,
        "overload_rejections": totals.get("overload_rejections", 0),
        "bad_inputs_rejected": {k.removeprefix("rejected_"): v for k, v in totals.items() if k.startswith("rejected_")},
        "supervisor_restarts": restarts,
        "metrics_change": {key: after.get(key, 0) - before.get(key, 0) for key in sorted(set(after) | set(before))},
        "step_executions": executions,
        "rss": trend,
        "private_memory": private,
        "server_shm_mib": {"start": round(samples[0]["server_shm_mib"], 1),
                           "max": round(max(s["server_shm_mib"] for s in samples), 1),
                           "end": round(samples[-1]["server_shm_mib"], 1)},
        "samples": samples,
    }
    (args.out / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.out / "soak.png")
    flat = all(row["flat"] for row in private.values())  # leaks are private memory; /dev/shm is reported apart
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1))
    print(f"failed good requests: {report['failed_good_requests']}; overload rejections: "
          f"{report['overload_rejections']}; memory {'flat' if flat else 'GROWING'}; "
          f"written {args.out / 'soak.json'}, {args.out / 'soak.png'}")
    return 0 if report["failed_good_requests"] == 0 and not totals.get("bad_wrongly_answered") and flat else 1


if __name__ == "__main__":
    sys.exit(main())
