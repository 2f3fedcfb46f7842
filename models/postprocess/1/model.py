"""Triton glue for postprocess: detector `output0` + `LETTERBOX` [+ `REGISTRATION`] -> NUM_DETECTIONS, BOXES,
SCORES, CLASSES.

Defaults come from the config parameters `score_threshold` (images without a template),
`template_score_threshold` (images whose template registered, by the optional REGISTRATION input),
`iou_threshold`, `pre_nms_top_k`; K (the padded detection count) from the BOXES output dims. Requests may
override the two thresholds with request parameters `score_threshold` and `iou_threshold`. All requests of a
dynamic batch go through one batched call, each image with its own thresholds: box_ops.postprocess_batch_opencv on CPU instances, box_ops.postprocess_batch
(CuPy) on GPU instances. The array code is box_ops.py beside this file.

Metrics (docs/operations.md): every image answered counts in pcb_inspected_images_total, its defects in
pcb_defects_total{class} (class names from the `labels_file` parameter) and pcb_defects_per_image (buckets from
`defects_per_image_buckets`); a request refused for its thresholds in pcb_rejected_images_total{reason}, one per
image (inspection_metrics.py). Not for requests with the `uncounted_parameter` (pcb_scan's tiles: it counts
each scan itself; the health canary).
"""
import json
from pathlib import Path

import box_ops
import inspection_metrics
import numpy as np
import thresholds
import triton_python_backend_utils as pb_utils

OUTPUT_NAMES = ("NUM_DETECTIONS", "BOXES", "SCORES", "CLASSES")
BAD_PARAMETER = "bad_parameter"  # pcb_rejected_images_total's reason for a threshold out of range


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
        self.default_thresholds = {
            name: thresholds.parse_threshold(name, parameters[name]) for name in thresholds.THRESHOLD_NAMES
        }
        self.template_score_threshold = thresholds.parse_threshold(
            "template_score_threshold", parameters["template_score_threshold"])
        self.pre_nms_top_k = int(parameters["pre_nms_top_k"])
        self.uncounted_parameter = parameters["uncounted_parameter"]
        self.max_detections = int(pb_utils.get_output_config_by_name(config, "BOXES")["dims"][0])
        # labels_file is relative to the model repository (this model's folder is in it).
        self.metrics = inspection_metrics.InspectionMetrics(
            Path(args["model_repository"]).parent / parameters["labels_file"],
            parameters["defects_per_image_buckets"], [BAD_PARAMETER])

        self.xp = np
        if args["model_instance_kind"] == "GPU":  # GPU only (CuPy); not run on the CPU-only dev machines
            import cupy

            cupy.cuda.Device(int(args["model_instance_device_id"])).use()
            self.xp = cupy

    def execute(self, requests):
        responses = [None] * len(requests)
        accepted = []  # (request index, its thresholds, whether it set its own score threshold)
        counted = []  # per request: whether its images count in the metrics (not a pcb_scan tile)
        for index, request in enumerate(requests):
            request_parameters = json.loads(request.parameters())
            counted.append(not request_parameters.get(self.uncounted_parameter))
            try:
                chosen = thresholds.resolve_thresholds(request_parameters, self.default_thresholds)
                accepted.append((index, chosen, "score_threshold" in request_parameters))
            except ValueError as exc:
                if counted[index]:
                    self.metrics.reject(BAD_PARAMETER, int(self._input(request, "LETTERBOX").shape[0]))
                responses[index] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                )
        if not accepted:
            return responses
        predictions = [self._input(requests[index], "output0") for index, _, _ in accepted]
        geometries = [self._input(requests[index], "LETTERBOX") for index, _, _ in accepted]
        sizes = [int(prediction.shape[0]) for prediction in predictions]
        outputs = self._postprocess(
            self._concatenate(predictions), self._concatenate(geometries),
            np.concatenate([self._score_thresholds(requests[index], chosen["score_threshold"], size, own)
                            for (index, chosen, own), size in zip(accepted, sizes)]),
            np.repeat([chosen["iou_threshold"] for _, chosen, _ in accepted], sizes),
        )
        for (index, _, _), end, size in zip(accepted, np.cumsum(sizes), sizes):
            responses[index] = pb_utils.InferenceResponse(
                output_tensors=[self._output(name, array[end - size : end]) for name, array in zip(OUTPUT_NAMES, outputs)]
            )
        self._count(outputs, np.repeat([counted[index] for index, _, _ in accepted], sizes))
        return responses

    def _score_thresholds(self, request, score_threshold, size, request_set_it):
        """One score threshold per image of the request: the request's own, or the deployed one of each image's
        kind (with or without a registered template)."""
        if request_set_it or pb_utils.get_input_tensor_by_name(request, "REGISTRATION") is None:
            return np.full(size, score_threshold)
        scores = self._host(self._input(request, "REGISTRATION"))[:, 3]
        return thresholds.image_score_thresholds(scores, score_threshold, self.template_score_threshold)

    def _count(self, outputs, rows):
        """The metrics of the images answered in the batch rows where ``rows`` is true."""
        if not rows.any():
            return
        counts = self._host(outputs[0]).reshape(-1)[rows]
        classes = self._host(outputs[3])[rows]
        self.metrics.count(counts, classes[np.arange(classes.shape[1]) < counts[:, None]])

    def _host(self, array):
        return array if self.xp is np else self.xp.asnumpy(array)

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
