"""Serve the model repository in the foreground with the bundled tritonserver until Ctrl-C or SIGTERM.

    HTTP_PORT=8000 GRPC_PORT=8001 METRICS_PORT=8002 python -m tools.serve [--default-configs]
        [--http-address ADDRESS] [--no-supervisor] [--log-verbose N] [--trace-file PATH] [--trace-config SETTING ...]

With OTEL_EXPORTER_OTLP_TRACES_ENDPOINT set (e.g. http://localhost:4318/v1/traces), every request is traced
with OpenTelemetry and exported there over OTLP/HTTP. A supervisor restarts a model whose Python-backend stub
died or hung (docs/operations.md). SIGTERM stops accepting requests and finishes those accepted.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from tools.contract import CPU_CONFIG_NAME, MODELS_ROOT
from tools.serve.triton_server import TRACE_LOG_FREQUENCY, TritonServer, otel_trace_settings, trace_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", type=Path, default=MODELS_ROOT)
    parser.add_argument("--default-configs", action="store_true",
                        help="use each model's default (GPU production) config.pbtxt instead of configs/cpu.pbtxt")
    parser.add_argument("--http-address", default="127.0.0.1",
                        help="address HTTP listens on (default localhost only; gRPC and metrics listen on all)")
    parser.add_argument("--no-supervisor", action="store_true",
                        help="do not restart models whose Python-backend stub died (and keep model control off)")
    parser.add_argument("--log-verbose", type=int, default=0, help="tritonserver verbose log level (0 = off)")
    parser.add_argument("--trace-file", type=Path,
                        help="trace every request to JSON files instead of OpenTelemetry: FILE.0, FILE.1, ... each "
                             f"with {TRACE_LOG_FREQUENCY} traces as they complete (the last at exit)")
    parser.add_argument("--trace-config", action="append", default=[], metavar="SETTING",
                        help="extra tritonserver --trace-config setting, e.g. rate=100 "
                             "(repeatable; after those of --trace-file or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for readiness")
    args = parser.parse_args(argv)

    server = TritonServer(
        model_repository=args.model_repository,
        http_port=int(os.environ.get("HTTP_PORT", 8000)),
        grpc_port=int(os.environ.get("GRPC_PORT", 8001)),
        metrics_port=int(os.environ.get("METRICS_PORT", 8002)),
        model_config_name=None if args.default_configs else CPU_CONFIG_NAME,
        log_verbose=args.log_verbose,
        # Traces to files, else OpenTelemetry when OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set; the extras after.
        trace_config=(trace_settings(args.trace_file, []) if args.trace_file else otel_trace_settings(os.environ))
        + args.trace_config,
        supervise=not args.no_supervisor,
        http_address=args.http_address,
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
