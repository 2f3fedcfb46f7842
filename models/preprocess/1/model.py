"""Triton glue for preprocess: encoded IMAGE (and optional TEMPLATE) bytes -> letterboxed `images`,
`LETTERBOX` geometry and the template's `REGISTRATION`.

The input size and channel layout come from the `images` output dims, the pixel type from its data type
(TYPE_UINT8 grey levels, which the detector's graph scales; TYPE_FP32 in [0, 1] for an Ultralytics detector);
`pad_value`, `max_image_pixels` and the registration settings (`registration_*`, `template_size_tolerance`)
from the config parameters. CPU instances letterbox with OpenCV (image_ops.preprocess_image_opencv), GPU
instances with the array code on CuPy (image_ops.preprocess_image); both are in image_ops.py beside this file.

A request with the `registered_template_parameter` set true sends templates registered onto their images
already (pcb_scan's tiles): they are scored where they lie, not searched (registration.py).

Metrics (docs/operations.md): each rejected image or template counts in pcb_rejected_images_total{reason}, the
reason from image_ops and registration.py, and each registered template's score in pcb_template_match_score
(not for requests with the `uncounted_parameter`: pcb_scan's tiles, the health canary).
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
        self.registered_template_parameter = parameters["registered_template_parameter"]
        images_config = pb_utils.get_output_config_by_name(config, "images")
        channels, height, width = images_config["dims"]
        self.channels, self.input_height, self.input_width = int(channels), int(height), int(width)
        self.pixel_type = pb_utils.triton_string_to_numpy(images_config["data_type"])

        # OpenCV reads its decoder pixel limit once, at its first import: set it from the config before that.
        os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(self.max_image_pixels)
        import image_ops
        import registration

        self.registration = registration.RegistrationSettings.from_parameters(parameters, self.pad_value)
        self.prealigned = self.registration.for_prealigned()
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
        reasons = (*image_ops.REJECTION_REASONS, *registration.REJECTION_REASONS)
        self.rejections = {reason: rejected.Metric(labels={"reason": reason}) for reason in reasons}
        match = pb_utils.MetricFamily(name="pcb_template_match_score", kind=pb_utils.MetricFamily.HISTOGRAM,
                                      description="Registration score of the templates registered")
        buckets = [float(edge) for edge in parameters["template_match_score_buckets"].split(",")]
        self.match_scores = match.Metric(labels={}, buckets=buckets)
        self.metric_families = (rejected, match)  # a metric lives while its family is held

    def execute(self, requests):
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        request_parameters = json.loads(request.parameters())
        counted = not request_parameters.get(self.uncounted_parameter)
        settings = self.prealigned if request_parameters.get(self.registered_template_parameter) else self.registration
        encoded_images = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
        template_tensor = pb_utils.get_input_tensor_by_name(request, "TEMPLATE")  # None: optional, not sent
        encoded_templates = [None] * len(encoded_images)
        if template_tensor is not None:
            encoded_templates = template_tensor.as_numpy().reshape(-1)
            if len(encoded_templates) != len(encoded_images):
                return self._error(f"TEMPLATE has {len(encoded_templates)} entries and IMAGE {len(encoded_images)}: "
                                   "send one template per image")
        tensors, geometries, registrations = [], [], []
        for index, (encoded, template) in enumerate(zip(encoded_images, encoded_templates)):
            try:
                tensor, geometry, registration = self.preprocess_image(
                    encoded, self.input_height, self.input_width, self.channels, self.pad_value,
                    self.max_image_pixels, template, settings, dtype=self.pixel_type,
                )
            except self.image_ops.ImageRejected as exc:
                return self._refuse(counted, exc.reason, f"IMAGE[{index}]: {exc}")
            except self.image_ops.TemplateRejected as exc:
                return self._refuse(counted, exc.reason, f"TEMPLATE[{index}]: {exc}")
            tensors.append(tensor)
            geometries.append(geometry)
            registrations.append(registration)
        if template_tensor is not None and counted:
            for registration in registrations:
                self.match_scores.observe(float(registration[3]))
        # A lone image (the usual request) needs no stacking copy.
        images = tensors[0][None] if len(tensors) == 1 else self.xp.stack(tensors)
        return pb_utils.InferenceResponse(output_tensors=[
            self._output("images", images),
            self._output("LETTERBOX", self.xp.stack(geometries)),
            pb_utils.Tensor("REGISTRATION", np.stack(registrations)),  # computed on the CPU on either device
        ])

    def _refuse(self, counted: bool, reason: str, message: str):
        """The error response of a refused image or template, counted in pcb_rejected_images_total{reason}."""
        if counted:
            self.rejections[reason].increment(1)
        return self._error(message)

    @staticmethod
    def _error(message):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))

    def _output(self, name, array):
        if self.xp is np:
            # Not from_dlpack: the backend renames the consumed capsule "used_dlpack", which NumPy's capsule
            # destructor rejects, and the stub stops answering (seen with Triton 2.51).
            return pb_utils.Tensor(name, array)
        return pb_utils.Tensor.from_dlpack(name, array)  # GPU only: hands the CuPy array over without a copy
