"""Serve the model repository in the foreground with the bundled tritonserver until Ctrl-C or SIGTERM.

    HTTP_PORT=8000 GRPC_PORT=8001 METRICS_PORT=8002 python -m tools.serve [--default-configs]
        [--log-verbose N] [--trace-file PATH] [--trace-config SETTING ...]
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from tools.contract import CPU_CONFIG_NAME, MODELS_ROOT
from tools.serve.triton_server import TritonServer, trace_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", type=Path, default=MODELS_ROOT)
    parser.add_argument("--default-configs", action="store_true",
                        help="use each model's default (GPU production) config.pbtxt instead of configs/cpu.pbtxt")
    parser.add_argument("--log-verbose", type=int, default=0, help="tritonserver verbose log level (0 = off)")
    parser.add_argument("--trace-file", type=Path,
                        help="turn tracing on: every request's timestamps, written to this JSON file when the server "
                             "stops (add --trace-config triton,log-frequency=N to write FILE.0, FILE.1, ... as it runs)")
    parser.add_argument("--trace-config", action="append", default=[], metavar="SETTING",
                        help="extra tritonserver --trace-config setting, e.g. rate=100 or triton,log-frequency=50 "
                             "(repeatable; passed after the settings --trace-file implies)")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for readiness")
    args = parser.parse_args(argv)

    server = TritonServer(
        model_repository=args.model_repository,
        http_port=int(os.environ.get("HTTP_PORT", 8000)),
        grpc_port=int(os.environ.get("GRPC_PORT", 8001)),
        metrics_port=int(os.environ.get("METRICS_PORT", 8002)),
        model_config_name=None if args.default_configs else CPU_CONFIG_NAME,
        log_verbose=args.log_verbose,
        trace_config=trace_settings(args.trace_file, args.trace_config),
        ready_timeout_s=args.ready_timeout,
        log_to_console=True,
    )

    def request_stop(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, request_stop)
    try:
        server.start()
        print(f"Serving {server.model_repository}: HTTP {server.http_url}, gRPC {server.grpc_url}, "
              f"metrics {server.metrics_url}. Ctrl-C to stop.", flush=True)
        return server.wait()
    except KeyboardInterrupt:
        print("Stopping tritonserver...", flush=True)
        return 0
    finally:
        # A second Ctrl-C/SIGTERM must not interrupt the shutdown and leave processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
