"""Triton glue for pcb_scan: one encoded scan -> tiles -> pcb_pipeline (BLS) -> detections in scan pixels.

Settings come from the config parameters (tile_size, tile_overlap, tiles_per_request, requests_in_flight,
merge_iou_threshold, max_scan_pixels, pipeline_model); K from the BOXES output dims. The request's own
parameters (score_threshold, iou_threshold) and its trace go with every tile request, so the pipeline
validates and applies them, and a trace of the scan includes its tiles. Helpers: tiling.py, scan.py.

Metrics (docs/operations.md), one image per scan: a scan answered counts in pcb_inspected_images_total, its
merged defects in pcb_defects_total{class} and pcb_defects_per_image; a scan refused in
pcb_rejected_images_total{reason} (scan.py's reasons, bad_parameter, too_many_defects). The tile requests carry
the `uncounted_parameter`, so the pipeline's steps do not count the tiles too. A tile request refused for overload
(UNAVAILABLE) is sent again twice; then the scan fails with UNAVAILABLE, for the client to retry.
"""
import asyncio
import json
import os
from pathlib import Path

import inspection_metrics
import numpy as np
import triton_python_backend_utils as pb_utils

BAD_PARAMETER = "bad_parameter"  # a tile request refused with INVALID_ARG: only the request's parameters can be
TOO_MANY_DEFECTS = "too_many_defects"
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
        (image_input,) = config["input"]
        self.image_input = image_input["name"]
        # The pipeline's outputs are this model's, less NUM_TILES: count, boxes, scores, classes.
        self.detection_outputs = [o["name"] for o in config["output"] if o["name"] != "NUM_TILES"]
        self.max_detections = int(pb_utils.get_output_config_by_name(config, "BOXES")["dims"][0])

        # OpenCV reads its decoder pixel limit once, at its first import: set it from the config before that.
        os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(self.max_scan_pixels)
        import scan
        import tiling

        tiling.check_layout(self.tile_size, self.tile_overlap)
        self.scan, self.tiling = scan, tiling
        # labels_file is relative to the model repository (this model's folder is in it).
        self.metrics = inspection_metrics.InspectionMetrics(
            Path(args["model_repository"]).parent / parameters["labels_file"],
            parameters["defects_per_image_buckets"], [*scan.REJECTION_REASONS, BAD_PARAMETER, TOO_MANY_DEFECTS])

    async def execute(self, requests):
        return [await self._respond(request) for request in requests]

    async def _respond(self, request):
        encoded_scans = pb_utils.get_input_tensor_by_name(request, self.image_input).as_numpy().reshape(-1)
        # BLS requests take bool, int or str parameters; a float goes as its exact decimal text, which
        # postprocess parses like a number.
        parameters = {key: str(value) if isinstance(value, float) else value
                      for key, value in json.loads(request.parameters()).items()}
        counted = not parameters.get(self.uncounted_parameter)  # a request of the canary's kind is not counted
        parameters[self.uncounted_parameter] = True
        results = []
        for index, encoded in enumerate(encoded_scans):
            where = f"{self.image_input}[{index}]"
            try:
                results.append(await self._inspect(encoded, parameters, request.trace()))
            except self.scan.ScanRejected as exc:
                return self._refuse(counted, exc.reason, f"{where}: {exc}", pb_utils.TritonError.INVALID_ARG)
            except TooManyDefects as exc:
                return self._refuse(counted, TOO_MANY_DEFECTS, f"{where}: {exc}", pb_utils.TritonError.INVALID_ARG)
            except ChildFailed as exc:
                reason = BAD_PARAMETER if exc.code == pb_utils.TritonError.INVALID_ARG else None
                return self._refuse(counted, reason, f"{where}: {exc}", exc.code)
        if counted:
            counts = np.array([len(scores) for _, scores, _, _ in results])
            self.metrics.count(counts, np.concatenate([classes for _, _, classes, _ in results]).astype(np.int64))
        return pb_utils.InferenceResponse(output_tensors=self._outputs(results))

    async def _inspect(self, encoded: bytes, parameters: dict, trace):
        image = self.scan.decode_scan(encoded, self.max_scan_pixels)
        height, width = image.shape[:2]
        windows = self.tiling.tile_windows(height, width, self.tile_size, self.tile_overlap)
        chunks = [windows[i : i + self.tiles_per_request] for i in range(0, len(windows), self.tiles_per_request)]
        slots = asyncio.Semaphore(self.requests_in_flight)

        async def detect(chunk):
            async with slots:  # encode only while a slot is free: the encoded tiles in memory stay bounded
                encoded_tiles = np.array([[self.scan.encode_tile(image, window)] for window in chunk], dtype=object)
                for attempt in range(TILE_ATTEMPTS):
                    child = pb_utils.InferenceRequest(
                        model_name=self.pipeline_model,
                        inputs=[pb_utils.Tensor(self.image_input, encoded_tiles)],
                        requested_output_names=self.detection_outputs,
                        parameters=parameters,
                        trace=trace,
                    )
                    response = await child.async_exec()
                    if not response.has_error():
                        break
                    failure = ChildFailed(response.error())
                    if failure.code != pb_utils.TritonError.UNAVAILABLE or attempt == TILE_ATTEMPTS - 1:
                        raise failure
                    await asyncio.sleep(TILE_RETRY_S * 2**attempt)
            return [pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in self.detection_outputs]

        tile_outputs = await asyncio.gather(*(detect(chunk) for chunk in chunks))
        boxes, scores, classes = [], [], []
        for num, chunk_boxes, chunk_scores, chunk_classes in tile_outputs:
            for row, count in enumerate(num.reshape(-1)):
                boxes.append(chunk_boxes[row, :count])
                scores.append(chunk_scores[row, :count])
                classes.append(chunk_classes[row, :count])
        merged = self.tiling.merge_tiles(boxes, scores, classes, windows, height, width, self.merge_iou)
        if len(merged[1]) > self.max_detections:
            raise TooManyDefects(f"{len(merged[1])} defects found, more than the {self.max_detections} this model "
                                 f"returns: raise score_threshold, or K (the BOXES dims) in the config")
        return (*merged, len(windows))

    def _outputs(self, results):
        k = self.max_detections
        count = np.zeros((len(results), 1), np.int32)
        boxes = np.zeros((len(results), k, 4), np.float32)
        scores = np.zeros((len(results), k), np.float32)
        classes = np.zeros((len(results), k), np.int32)
        tiles = np.zeros((len(results), 1), np.int32)
        for i, (scan_boxes, scan_scores, scan_classes, num_tiles) in enumerate(results):
            n = len(scan_scores)
            count[i, 0], tiles[i, 0] = n, num_tiles
            boxes[i, :n], scores[i, :n], classes[i, :n] = scan_boxes, scan_scores, scan_classes
        arrays = dict(zip(self.detection_outputs, (count, boxes, scores, classes)), NUM_TILES=tiles)
        return [pb_utils.Tensor(name, array) for name, array in arrays.items()]

    def _refuse(self, counted: bool, reason: str | None, message: str, code):
        """The error response; a refusal for the image's sake (``reason``) counts in pcb_rejected_images_total."""
        if counted and reason:
            self.metrics.reject(reason)
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
