"""Latency percentiles, shared by the bare-detector timing and the Python-client fallback."""
from __future__ import annotations

import numpy as np


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    """p50, p90 and p99 of durations in seconds, in milliseconds."""
    p50, p90, p99 = np.percentile(np.asarray(seconds) * 1e3, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99)}
