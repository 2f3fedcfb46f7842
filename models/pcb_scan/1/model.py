"""Triton glue for pcb_scan: one encoded scan -> tiles -> pcb_pipeline (BLS) -> detections in scan pixels.

Settings come from the config parameters (tile_size, tile_overlap, tiles_per_request, requests_in_flight,
merge_iou_threshold, max_scan_pixels, template_size_tolerance, registration_*, pad_value, pipeline_model); K
from the BOXES output dims. The request's own parameters (score_threshold, iou_threshold) and its trace go with
every tile request, so the pipeline validates and applies them, and a trace of the scan includes its tiles. With
the optional TEMPLATE (the whole scan's template), the template is registered onto the whole scan first
(scan_registration.py), each tile request carries the same window of the registered template (and the
`registered_template_parameter`: the pipeline scores it in place), and REGISTRATION returns one row per tile.
Helpers: tiling.py, scan.py, scan_registration.py, registration.py (the same file as preprocess's),
inspection_metrics.py.

Metrics (docs/operations.md), one image per scan: a scan answered counts in pcb_inspected_images_total, its
merged defects in pcb_defects_total{class} and pcb_defects_per_image; a scan refused in
pcb_rejected_images_total{reason} (scan.py's reasons, bad_template, template_mismatch, bad_parameter,
too_many_defects). The tile requests carry the `uncounted_parameter`, so the pipeline's steps do not count the
tiles too. A tile request refused for overload (UNAVAILABLE) is sent again twice; then the scan fails with
UNAVAILABLE, for the client to retry.
"""
import asyncio
import json
import os
import re
from pathlib import Path

import inspection_metrics
import numpy as np
import triton_python_backend_utils as pb_utils

BAD_PARAMETER = "bad_parameter"  # a tile request refused with INVALID_ARG: only the request's parameters can be
TOO_MANY_DEFECTS = "too_many_defects"
BAD_TEMPLATE, TEMPLATE_MISMATCH = "bad_template", "template_mismatch"  # preprocess's words too
# A tile request the pipeline refuses for overload (its queue timeout) is sent again after 0.2 s, then 0.4 s: a
# scan already taken should not fail on a moment's queue; under lasting overload the scan fails UNAVAILABLE.
TILE_ATTEMPTS, TILE_RETRY_S = 3, 0.2
# Triton's words for a request its queue refused (max_queue_size) or dropped (queue timeout): overload.
OVERLOAD_MESSAGES = ("Exceeds maximum queue size", "Request timeout expired")


class ChildFailed(Exception):
    """A tile request failed in the pipeline; its message says why, ``code`` is its Triton error code."""

    def __init__(self, error):
        message, code = error.message(), error.code()
        if code == pb_utils.TritonError.INTERNAL:  # Triton 2.51 gives BLS errors as INTERNAL: tell by the message
            if any(words in message for words in OVERLOAD_MESSAGES):
                code = pb_utils.TritonError.UNAVAILABLE
            elif "parameter '" in message:  # postprocess refusing a threshold (thresholds.py)
                code = pb_utils.TritonError.INVALID_ARG
        super().__init__(message)
        self.code = code


class TooManyDefects(ValueError):
    """More defects in the scan than the K rows this model returns."""


class TemplateFailed(Exception):
    """The scan's template cannot be used (undecodable, wrong size, or a tile's template refused); ``reason``
    BAD_TEMPLATE or TEMPLATE_MISMATCH."""

    def __init__(self, message: str, reason: str = BAD_TEMPLATE):
        super().__init__(message)
        self.reason = reason


# How pcb_pipeline names a refused template: "TEMPLATE[i]: why", i the batch element of the tile request.
CHILD_TEMPLATE_ERROR = re.compile(r"TEMPLATE\[(\d+)\]: (.*)", re.S)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
        self.pipeline_model = parameters["pipeline_model"]
        self.tile_size = int(parameters["tile_size"])
        self.tile_overlap = int(parameters["tile_overlap"])
        self.tiles_per_request = int(parameters["tiles_per_request"])
        self.requests_in_flight = int(parameters["requests_in_flight"])
        self.merge_iou = float(parameters["merge_iou_threshold"])
        self.max_scan_pixels = int(parameters["max_scan_pixels"])
        self.uncounted_parameter = parameters["uncounted_parameter"]
        self.registered_template_parameter = parameters["registered_template_parameter"]
        (self.image_input,) = [i["name"] for i in config["input"] if not i.get("optional", False)]
        (self.template_input,) = [i["name"] for i in config["input"] if i.get("optional", False)]
        self.registration_output = "REGISTRATION"
        # The pipeline's outputs are this model's, less NUM_TILES: count, boxes, scores, classes, registration.
        self.detection_outputs = [o["name"] for o in config["output"]
                                  if o["name"] not in ("NUM_TILES", self.registration_output)]
        self.max_detections = int(pb_utils.get_output_config_by_name(config, "BOXES")["dims"][0])

        # OpenCV reads its decoder pixel limit once, at its first import: set it from the config before that.
        os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(self.max_scan_pixels)
        import registration
        import scan
        import scan_registration
        import tiling

        tiling.check_layout(self.tile_size, self.tile_overlap)
        self.scan, self.tiling, self.scan_registration = scan, tiling, scan_registration
        self.template_rejected = registration.TemplateRejected
        self.registration = registration.RegistrationSettings.from_parameters(parameters, float(parameters["pad_value"]))
        # labels_file is relative to the model repository (this model's folder is in it).
        self.metrics = inspection_metrics.InspectionMetrics(
            Path(args["model_repository"]).parent / parameters["labels_file"], parameters["defects_per_image_buckets"],
            [*scan.REJECTION_REASONS, BAD_TEMPLATE, TEMPLATE_MISMATCH, BAD_PARAMETER, TOO_MANY_DEFECTS])

    async def execute(self, requests):
        return [await self._respond(request) for request in requests]

    async def _respond(self, request):
        encoded_scans = pb_utils.get_input_tensor_by_name(request, self.image_input).as_numpy().reshape(-1)
        template_tensor = pb_utils.get_input_tensor_by_name(request, self.template_input)  # None: not sent
        encoded_templates = [None] * len(encoded_scans)
        if template_tensor is not None:
            encoded_templates = template_tensor.as_numpy().reshape(-1)
            if len(encoded_templates) != len(encoded_scans):
                return self._error(f"{self.template_input} has {len(encoded_templates)} entries and "
                                   f"{self.image_input} {len(encoded_scans)}: send one template per scan",
                                   pb_utils.TritonError.INVALID_ARG)
        # BLS requests take bool, int or str parameters; a float goes as its exact decimal text, which
        # postprocess parses like a number.
        parameters = {key: str(value) if isinstance(value, float) else value
                      for key, value in json.loads(request.parameters()).items()}
        counted = not parameters.get(self.uncounted_parameter)  # a request of the canary's kind is not counted
        parameters[self.uncounted_parameter] = True
        invalid = pb_utils.TritonError.INVALID_ARG
        results = []
        for index, (encoded, encoded_template) in enumerate(zip(encoded_scans, encoded_templates)):
            where = f"{self.image_input}[{index}]"
            try:
                results.append(await self._inspect(encoded, encoded_template, parameters, request.trace()))
            except self.scan.ScanRejected as exc:
                return self._refuse(counted, exc.reason, f"{where}: {exc}", invalid)
            except TemplateFailed as exc:
                return self._refuse(counted, exc.reason, f"{self.template_input}[{index}]: {exc}", invalid)
            except TooManyDefects as exc:
                return self._refuse(counted, TOO_MANY_DEFECTS, f"{where}: {exc}", invalid)
            except ChildFailed as exc:
                reason = BAD_PARAMETER if exc.code == invalid else None
                return self._refuse(counted, reason, f"{where}: {exc}", exc.code)
        if counted:
            counts = np.array([len(scores) for _, scores, _, _ in results])
            self.metrics.count(counts, np.concatenate([classes for _, _, classes, _ in results]).astype(np.int64))
        return pb_utils.InferenceResponse(output_tensors=self._outputs(results))

    def _registered_template(self, encoded_template: bytes, image):
        """(the scan's template registered onto the scan, its map template -> scan pixels); TemplateFailed says
        what is wrong: undecodable, its size beyond the tolerance, or not this scan's (registration.py)."""
        try:
            template = self.scan.decode_scan(encoded_template, self.max_scan_pixels)
        except self.scan.ScanRejected as exc:
            raise TemplateFailed(str(exc)) from None
        try:
            return self.scan_registration.register_scan_template(image, template, self.registration)
        except self.template_rejected as exc:
            raise TemplateFailed(str(exc), exc.reason) from None

    async def _inspect(self, encoded: bytes, encoded_template, parameters: dict, trace):
        image = self.scan.decode_scan(encoded, self.max_scan_pixels)
        height, width = image.shape[:2]
        template = scan_map = None
        if encoded_template is not None:  # the whole template brought over the whole scan, then cut like the scan
            template, scan_map = self._registered_template(encoded_template, image)
            parameters = {**parameters, self.registered_template_parameter: True}  # tiles: scored, not searched
        windows = self.tiling.tile_windows(height, width, self.tile_size, self.tile_overlap)
        starts = range(0, len(windows), self.tiles_per_request)
        slots = asyncio.Semaphore(self.requests_in_flight)
        outputs = self.detection_outputs + ([self.registration_output] if template is not None else [])

        async def detect(start):
            chunk = windows[start : start + self.tiles_per_request]
            async with slots:  # encode only while a slot is free: the encoded tiles in memory stay bounded
                inputs = [self._tiles_tensor(self.image_input, image, chunk)]
                if template is not None:  # the same windows of the template (clipped where it is smaller)
                    inputs.append(self._tiles_tensor(self.template_input, template, chunk))
                for attempt in range(TILE_ATTEMPTS):
                    child = pb_utils.InferenceRequest(
                        model_name=self.pipeline_model,
                        inputs=inputs,
                        requested_output_names=outputs,
                        parameters=parameters,
                        trace=trace,
                    )
                    response = await child.async_exec()
                    if not response.has_error():
                        break
                    refused = CHILD_TEMPLATE_ERROR.search(response.error().message()) if template is not None else None
                    if refused:
                        tile, why = start + int(refused.group(1)), refused.group(2)
                        w = windows[tile]
                        raise TemplateFailed(f"tile {tile} (x {w.x0}-{w.x1}, y {w.y0}-{w.y1}): {why}",
                                             TEMPLATE_MISMATCH if "does not match" in why else BAD_TEMPLATE)
                    failure = ChildFailed(response.error())
                    if failure.code != pb_utils.TritonError.UNAVAILABLE or attempt == TILE_ATTEMPTS - 1:
                        raise failure
                    await asyncio.sleep(TILE_RETRY_S * 2**attempt)
            return [pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs]

        tile_outputs = await asyncio.gather(*(detect(start) for start in starts))
        boxes, scores, classes = [], [], []
        registrations = np.zeros((len(windows), 4), np.float32)
        for start, (num, chunk_boxes, chunk_scores, chunk_classes, *registration) in zip(starts, tile_outputs):
            for row, count in enumerate(num.reshape(-1)):
                boxes.append(chunk_boxes[row, :count])
                scores.append(chunk_scores[row, :count])
                classes.append(chunk_classes[row, :count])
            for tile, residual in enumerate(registration[0].reshape(-1, 4) if registration else [], start):
                registrations[tile] = self.scan_registration.tile_registration(scan_map, residual, windows[tile])
        merged = self.tiling.merge_tiles(boxes, scores, classes, windows, height, width, self.merge_iou)
        if len(merged[1]) > self.max_detections:
            raise TooManyDefects(f"{len(merged[1])} defects found, more than the {self.max_detections} this model "
                                 f"returns: raise score_threshold, or K (the BOXES dims) in the config")
        return (*merged, registrations)

    def _tiles_tensor(self, name, pixels, chunk):
        return pb_utils.Tensor(name, np.array([[self.scan.encode_tile(pixels, w)] for w in chunk], dtype=object))

    def _outputs(self, results):
        k = self.max_detections
        count = np.zeros((len(results), 1), np.int32)
        boxes = np.zeros((len(results), k, 4), np.float32)
        scores = np.zeros((len(results), k), np.float32)
        classes = np.zeros((len(results), k), np.int32)
        tiles = np.zeros((len(results), 1), np.int32)
        registration = np.zeros((len(results), max(len(r[3]) for r in results), 4), np.float32)
        for i, (scan_boxes, scan_scores, scan_classes, tile_registrations) in enumerate(results):
            n = len(scan_scores)
            count[i, 0], tiles[i, 0] = n, len(tile_registrations)
            boxes[i, :n], scores[i, :n], classes[i, :n] = scan_boxes, scan_scores, scan_classes
            registration[i, : len(tile_registrations)] = tile_registrations
        arrays = dict(zip(self.detection_outputs, (count, boxes, scores, classes)))
        arrays |= {self.registration_output: registration, "NUM_TILES": tiles}
        return [pb_utils.Tensor(name, array) for name, array in arrays.items()]

    def _refuse(self, counted: bool, reason: str | None, message: str, code):
        """The error response; a refusal for the image's sake (``reason``) counts in pcb_rejected_images_total."""
        if counted and reason:
            self.metrics.reject(reason)
        return self._error(message, code)

    @staticmethod
    def _error(message, code):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
