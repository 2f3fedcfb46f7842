"""Canary health check for probes: one known board through the pipeline, the answer checked.

    python -m tools.healthcheck [--url localhost:8001] [--deadline-ms 5000] [--metrics-url URL]
        [--model-repository models]

Exit code 0: healthy (the board's defects came back right, or the server refused it for overload while every
step of the pipeline is still executing). 1: unhealthy (a wrong answer, an error such as a dead Python-backend
stub, no answer within the deadline while a step executes nothing, no server). 2: bad arguments. One line on
stdout says which and why. The check itself is tools/serve/healthcheck.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tools.contract import MODELS_ROOT, served_contract
from tools.serve.healthcheck import canary

DEFAULT_URL = "localhost:8001"
METRICS_PORT = 8002  # Triton's default, the deployment's


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=DEFAULT_URL, help="Triton gRPC address")
    parser.add_argument("--deadline-ms", type=int, default=5000, help="the whole check's time limit")
    parser.add_argument("--metrics-url",
                        help=f"Triton's metrics, to tell an overloaded server from a hung one (default: port "
                             f"{METRICS_PORT} of --url's host; 'none': without them an overload answer is unhealthy)")
    parser.add_argument("--model-repository", type=Path, default=MODELS_ROOT,
                        help="the served repository, whose configs name the pipeline and its tensors")
    args = parser.parse_args(argv)
    if args.deadline_ms <= 0:
        parser.error("--deadline-ms must be positive")
    metrics_url = args.metrics_url
    if metrics_url is None:
        metrics_url = f"http://{args.url.rsplit(':', 1)[0]}:{METRICS_PORT}/metrics"
    elif metrics_url == "none":
        metrics_url = None
    result = canary(args.url, args.deadline_ms / 1000, served_contract(models_root=args.model_repository),
                    metrics_url)
    print(result, flush=True)
    return 0 if result.healthy else 1


if __name__ == "__main__":
    sys.exit(main())
