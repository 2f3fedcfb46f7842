"""Speed figures of the detector alone and of the served pipeline: ``python -m tools.eval.benchmark --help``.

One module per seam, each usable on its own:

* ``bare_detector``: the detector's ONNX file on ONNX Runtime, as the CPU detector config runs it
* ``perf_analyzer``: the pipeline driven by perf_analyzer over gRPC, one concurrency level at a time
* ``python_client``: the same measurement with the project's gRPC client, when perf_analyzer cannot run
* ``server_stats``: per-model time per request from Triton's statistics API, as deltas over a level
* ``memory``: resident memory of the tritonserver process and its Python backend stubs, from /proc
* ``sweep``: the concurrency sweep, tying a load generator to the statistics deltas
* ``report``, ``plot``: benchmark.json, benchmark.md and the latency-versus-throughput picture
* ``latency``: the percentiles both Python-side timers report
"""
