"""Whole-board scans through the scan model: scans/s and tiles/s for one large scan of real boards.

The scan is real DeepPCB boards stitched edge to edge and cut to ``side`` x ``side`` pixels, so every tile
holds real copper; with templates, their templates stitched the same way go with it. Each request carries one
scan; ``concurrency`` client threads send them back to back.
"""
from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
from tqdm import tqdm

from tools.client.pipeline_client import PipelineClient
from tools.contract import ServedContract
from tools.data.deeppcb import read_grey
from tools.data.mosaic import stitch
from tools.eval.benchmark.latency import percentiles_ms
from tools.eval.benchmark.server_stats import settled_snapshot, snapshot, stage_breakdown, stage_models
from tools.pipeline_math import scan_windows


def boards_for_scan(side: int, board_side: int) -> int:
    """Boards of ``board_side`` pixels needed to cover a ``side`` x ``side`` scan."""
    return math.ceil(side / board_side) ** 2


def stitched_scan(boards: list[Path], side: int) -> bytes:
    """PNG of ``boards`` stitched row-major and cut to ``side`` x ``side``."""
    images = [read_grey(path) for path in boards]
    mosaic, _ = stitch(images, columns=math.ceil(side / images[0].shape[1]))
    if min(mosaic.shape[:2]) < side:
        raise ValueError(f"{len(boards)} boards of {images[0].shape} do not cover {side} x {side}")
    ok, encoded = cv2.imencode(".png", mosaic[:side, :side])
    if not ok:
        raise ValueError("OpenCV could not encode the scan")
    return encoded.tobytes()


def tiles_per_scan(contract: ServedContract, height: int, width: int) -> int:
    return len(scan_windows(height, width, contract))


def time_scans(url: str, contract: ServedContract, scan: bytes, side: int, count: int, concurrency: int,
               template: bytes | None = None) -> dict:
    """Send ``count`` copies of ``scan`` (with ``template``) through the scan model, ``concurrency`` at a time,
    after one warm-up."""
    tiles = tiles_per_scan(contract, side, side)
    models = [contract.scan_model, *stage_models(contract)]
    templates = None if template is None else [template]
    with PipelineClient(url, contract=contract, timeout_s=600) as client:
        started = snapshot(url, models)[contract.scan_model].requests
        client.infer([scan], scans=True, templates=templates)  # warm-up, not timed
        before = settled_snapshot(url, models, {contract.scan_model: started + 1})
        latencies: list[float] = []

        def one_scan(_):
            start = time.perf_counter()
            client.infer([scan], scans=True, templates=templates)
            latencies.append(time.perf_counter() - start)

        began = time.perf_counter()
        with ThreadPoolExecutor(concurrency, "benchmark-scans") as pool:
            list(tqdm(pool.map(one_scan, range(count)), total=count, desc=f"scans, concurrency {concurrency}",
                      unit="scan"))
        elapsed = time.perf_counter() - began
        after = settled_snapshot(url, models, {contract.scan_model: before[contract.scan_model].requests + count})
    return {
        "scan_pixels": [side, side],
        "tiles_per_scan": tiles,
        "scans": count,
        "with_template": template is not None,
        "concurrency": concurrency,
        "scans_per_s": count / elapsed,
        "tiles_per_s": count * tiles / elapsed,
        **percentiles_ms(latencies),
        "stages": stage_breakdown(before, after),
    }
