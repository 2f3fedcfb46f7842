"""Triton glue for preprocess: encoded IMAGE bytes -> letterboxed `images` and `LETTERBOX` geometry.

The input size and channel count come from the `images` output dims; `pad_value` and `max_image_pixels`
from the config parameters. CPU instances letterbox with OpenCV (image_ops.preprocess_image_opencv), GPU
instances with the array code on CuPy (image_ops.preprocess_image); both are in image_ops.py beside this file.

Metrics (docs/operations.md): each rejected image counts in pcb_rejected_images_total{reason}, the reason from
image_ops (not for requests with the `uncounted_parameter`: pcb_scan's tiles, the health canary).
"""
import functools
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
        self.pad_value = float(parameters["pad_value"])
        if not (self.pad_value.is_integer() and 0 <= self.pad_value <= 255):
            raise ValueError(f"pad_value must be a whole grey level from 0 to 255, got {parameters['pad_value']!r}")
        self.max_image_pixels = int(parameters["max_image_pixels"])
        self.uncounted_parameter = parameters["uncounted_parameter"]
        channels, height, width = pb_utils.get_output_config_by_name(config, "images")["dims"]
        self.channels, self.input_height, self.input_width = int(channels), int(height), int(width)

        # OpenCV reads its decoder pixel limit once, at its first import: set it from the config before that.
        os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(self.max_image_pixels)
        import image_ops

        self.image_ops = image_ops
        self.xp = np
        self.preprocess_image = image_ops.preprocess_image_opencv
        if args["model_instance_kind"] == "GPU":  # GPU only (CuPy); not run on the CPU-only dev machines
            import cupy

            cupy.cuda.Device(int(args["model_instance_device_id"])).use()
            self.xp = cupy
            self.preprocess_image = functools.partial(image_ops.preprocess_image, xp=cupy)

        rejected = pb_utils.MetricFamily(name="pcb_rejected_images_total", kind=pb_utils.MetricFamily.COUNTER,
                                         description="Images refused with an error, by reason")
        self.rejections = {reason: rejected.Metric(labels={"reason": reason}) for reason in image_ops.REJECTION_REASONS}
        self.rejected_family = rejected  # a metric lives while its family is held

    def execute(self, requests):
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        encoded_images = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
        tensors, geometries = [], []
        for index, encoded in enumerate(encoded_images):
            try:
                tensor, geometry = self.preprocess_image(
                    encoded, self.input_height, self.input_width, self.channels, self.pad_value,
                    self.max_image_pixels,
                )
            except self.image_ops.ImageRejected as exc:
                if not json.loads(request.parameters()).get(self.uncounted_parameter):
                    self.rejections[exc.reason].increment(1)
                return pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"IMAGE[{index}]: {exc}", pb_utils.TritonError.INVALID_ARG)
                )
            tensors.append(tensor)
            geometries.append(geometry)
        # A lone image (the usual request) needs no stacking copy.
        images = tensors[0][None] if len(tensors) == 1 else self.xp.stack(tensors)
        return pb_utils.InferenceResponse(
            output_tensors=[self._output("images", images), self._output("LETTERBOX", self.xp.stack(geometries))]
        )

    def _output(self, name, array):
        if self.xp is np:
            # Not from_dlpack: the backend renames the consumed capsule "used_dlpack", which NumPy's capsule
            # destructor rejects, and the stub stops answering (seen with Triton 2.51).
            return pb_utils.Tensor(name, array)
        return pb_utils.Tensor.from_dlpack(name, array)  # GPU only: hands the CuPy array over without a copy
