"""Triton glue for postprocess: detector `output0` + `LETTERBOX` -> NUM_DETECTIONS, BOXES, SCORES, CLASSES.

Defaults come from the config parameters `score_threshold`, `iou_threshold`, `pre_nms_top_k`; K (the
padded detection count) from the BOXES output dims. Requests may override the two thresholds with request
parameters of the same names. All requests of a dynamic batch go through one batched call, each image with
its own request's thresholds: box_ops.postprocess_batch_opencv on CPU instances, box_ops.postprocess_batch
(CuPy) on GPU instances. The array code is box_ops.py beside this file.
"""
import json

import box_ops
import numpy as np
import thresholds
import triton_python_backend_utils as pb_utils

OUTPUT_NAMES = ("NUM_DETECTIONS", "BOXES", "SCORES", "CLASSES")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
        self.default_thresholds = {
            name: thresholds.parse_threshold(name, parameters[name]) for name in thresholds.THRESHOLD_NAMES
        }
        self.pre_nms_top_k = int(parameters["pre_nms_top_k"])
        self.max_detections = int(pb_utils.get_output_config_by_name(config, "BOXES")["dims"][0])

        self.xp = np
        if args["model_instance_kind"] == "GPU":  # GPU only (CuPy); not run on the CPU-only dev machines
            import cupy

            cupy.cuda.Device(int(args["model_instance_device_id"])).use()
            self.xp = cupy

    def execute(self, requests):
        responses = [None] * len(requests)
        accepted = []  # (request index, its thresholds)
        for index, request in enumerate(requests):
            try:
                accepted.append((index, thresholds.resolve_thresholds(json.loads(request.parameters()),
                                                                      self.default_thresholds)))
            except ValueError as exc:
                responses[index] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                )
        if not accepted:
            return responses
        predictions = [self._input(requests[index], "output0") for index, _ in accepted]
        geometries = [self._input(requests[index], "LETTERBOX") for index, _ in accepted]
        sizes = [int(prediction.shape[0]) for prediction in predictions]
        outputs = self._postprocess(
            self._concatenate(predictions), self._concatenate(geometries),
            np.repeat([chosen["score_threshold"] for _, chosen in accepted], sizes),
            np.repeat([chosen["iou_threshold"] for _, chosen in accepted], sizes),
        )
        for (index, _), end, size in zip(accepted, np.cumsum(sizes), sizes):
            responses[index] = pb_utils.InferenceResponse(
                output_tensors=[self._output(name, array[end - size : end]) for name, array in zip(OUTPUT_NAMES, outputs)]
            )
        return responses

    def _concatenate(self, arrays):
        """One batch of the requests' tensors; the dynamic batcher only batches requests of equal shapes."""
        return arrays[0] if len(arrays) == 1 else self.xp.concatenate(arrays)  # a lone request: no copy

    def _postprocess(self, pred, geometry, score_thresholds, iou_thresholds):
        if self.xp is np:
            return box_ops.postprocess_batch_opencv(
                pred, geometry, score_thresholds, iou_thresholds, self.max_detections, self.pre_nms_top_k
            )
        return box_ops.postprocess_batch(
            pred, geometry, score_thresholds, iou_thresholds, self.max_detections, self.pre_nms_top_k, self.xp
        )

    def _output(self, name, array):
        if self.xp is np:
            # Not from_dlpack: the backend renames the consumed capsule "used_dlpack", which NumPy's capsule
            # destructor rejects, and the stub stops answering (seen with Triton 2.51).
            return pb_utils.Tensor(name, array)
        return pb_utils.Tensor.from_dlpack(name, array)  # GPU only: hands the CuPy array over without a copy

    def _input(self, request, name):
        """The input as an ``xp`` array; with FORCE_CPU_ONLY_INPUT_TENSORS "no" it may arrive on either device."""
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor.is_cpu():
            return self.xp.asarray(tensor.as_numpy())
        return self.xp.from_dlpack(tensor.to_dlpack())  # GPU memory: only on GPU instances, where xp is CuPy
