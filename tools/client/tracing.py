"""W3C trace context for requests to Triton: a caller's OpenTelemetry trace continues into the server.

Triton (24.01 and later, the bundled 2.51 included) in OpenTelemetry trace mode takes ``traceparent`` and
``tracestate`` from a request's gRPC metadata or HTTP headers and makes its spans (the request, the ensemble,
each step) children of the caller's span. ``trace_headers()`` gives those headers for the caller's active span
(nothing without one, or without the opentelemetry-api package); ``PipelineClient`` sends them with every
request. A command-line run continues the trace named by the TRACEPARENT (and TRACESTATE) environment
variables, the OpenTelemetry convention for passing a context to a process (``environment_context``).
"""
from __future__ import annotations

import contextlib
import os

ENVIRONMENT_CARRIER = ("TRACEPARENT", "TRACESTATE")


def trace_headers() -> dict[str, str] | None:
    """``traceparent`` (and ``tracestate``) of the active OpenTelemetry span, or None when there is none."""
    try:
        from opentelemetry import propagate
    except ImportError:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    headers = {key: value for key, value in carrier.items() if key in ("traceparent", "tracestate")}
    return headers or None


@contextlib.contextmanager
def environment_context(environment=os.environ):
    """Within it, the span named by TRACEPARENT/TRACESTATE in ``environment`` is the active one (if any)."""
    carrier = {name.lower(): environment[name] for name in ENVIRONMENT_CARRIER if environment.get(name)}
    if not carrier:
        yield
        return
    try:
        from opentelemetry import context, propagate
    except ImportError:
        yield
        return
    token = context.attach(propagate.extract(carrier))
    try:
        yield
    finally:
        context.detach(token)
