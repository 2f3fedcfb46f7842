"""pcb_model_restarts_total{model}: the local server's supervisor counts its model restarts in a JSON file
({model: restarts}) named by RESTARTS_FILE_VARIABLE (tools/serve/supervisor.py); this model publishes them.

Only this model does, for every model, so the other model folders carry no copy of it. On CPU (the only
place the supervisor runs) the detector is a Python model and every request passes through it: ``refresh()``
on each execution re-reads the file when it changed. While the detector itself is reloaded the series are
gone for those seconds, and come back with the file's counts.
"""
import json
import os

import triton_python_backend_utils as pb_utils

RESTARTS_FILE_VARIABLE = "PCB_MODEL_RESTARTS_FILE"


class RestartCounts:
    def __init__(self, path: str):
        self.path, self.seen = path, None
        self.family = pb_utils.MetricFamily(name="pcb_model_restarts_total", kind=pb_utils.MetricFamily.COUNTER,
                                            description="Restarts of a model by the local server's supervisor")
        self.metrics = {}
        self.refresh()

    @classmethod
    def from_environment(cls):
        """The counts of the supervisor serving this server, or None when no supervisor does."""
        path = os.environ.get(RESTARTS_FILE_VARIABLE)
        return cls(path) if path else None

    def refresh(self) -> None:
        try:
            status = os.stat(self.path)
            if (status.st_ino, status.st_mtime_ns) == self.seen:
                return
            with open(self.path) as file:
                counts = {str(model): int(count) for model, count in json.load(file).items()}
            self.seen = (status.st_ino, status.st_mtime_ns)
        except (OSError, ValueError, AttributeError):
            return  # the supervisor replaces the file atomically: try again at the next execution
        for model, count in counts.items():
            if model not in self.metrics:
                self.metrics[model] = self.family.Metric(labels={"model": model})
            metric = self.metrics[model]
            if count > metric.value():
                metric.increment(count - metric.value())
