"""CPU fallback of the detector (configs/cpu.pbtxt): runs model.onnx with ONNX Runtime.

The whole dynamic batch goes through one ONNX Runtime call. Config parameters: `onnx_file` (relative to
this version directory) and `intra_op_threads`. Under the local server's supervisor it also publishes every
model's restart count, pcb_model_restarts_total{model} (restart_counts.py, docs/operations.md).
"""
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import restart_counts
import triton_python_backend_utils as pb_utils


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
        self.restart_counts = restart_counts.RestartCounts.from_environment()  # the metric lives while it is held

    def execute(self, requests):
        if self.restart_counts is not None:
            self.restart_counts.refresh()
        batches = [pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy() for request in requests]
        images = batches[0] if len(batches) == 1 else np.concatenate(batches)  # a lone request: no copy
        predictions = self.session.run([self.output_name], {self.input_name: images})[0]
        ends = np.cumsum([len(batch) for batch in batches])
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, part)])
            for part in np.split(predictions, ends[:-1])
        ]
