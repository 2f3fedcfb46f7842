"""CPU fallback of the detector (configs/cpu.pbtxt): runs model.onnx with ONNX Runtime.

The whole dynamic batch goes through one ONNX Runtime call. Config parameters: `onnx_file` (relative to
this version directory) and `intra_op_threads`. pcb_model_restarts_total{model} when the local server's
supervisor restarted this model (docs/operations.md).
"""
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

# The local server's supervisor names its restart counts in this file (tools/serve/triton_server.py).
RESTARTS_FILE_VARIABLE = "PCB_MODEL_RESTARTS_FILE"


def restart_counter(model_name: str):
    """pcb_model_restarts_total{model}, set to the local supervisor's count for this model; None when no
    supervisor serves it. Keep what it returns: a metric lives while a model holds it."""
    path = os.environ.get(RESTARTS_FILE_VARIABLE)
    if not path:
        return None
    try:
        with open(path) as file:
            restarts = int(json.load(file).get(model_name, 0))
    except (OSError, ValueError):
        restarts = 0
    family = pb_utils.MetricFamily(name="pcb_model_restarts_total", kind=pb_utils.MetricFamily.COUNTER,
                                   description="Restarts of a model by the local server's supervisor")
    metric = family.Metric(labels={"model": model_name})
    if restarts > metric.value():  # every instance sets the same total
        metric.increment(restarts - metric.value())
    return family, metric


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(parameters["intra_op_threads"])
        options.inter_op_num_threads = 1
        # Idle intra-op threads would otherwise spin between batches and take CPU from the Python steps.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        onnx_path = Path(args["model_repository"]) / args["model_version"] / parameters["onnx_file"]
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.restarts = restart_counter(args["model_name"])  # alive as long as the model

    def execute(self, requests):
        batches = [pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy() for request in requests]
        predictions = self.session.run([self.output_name], {self.input_name: np.concatenate(batches)})[0]
        ends = np.cumsum([len(batch) for batch in batches])
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, part)])
            for part in np.split(predictions, ends[:-1])
        ]
