"""gRPC client library for the ``pcb_pipeline`` ensemble: send encoded board images, get defect detections back.

    from tools.client import PipelineClient
    with PipelineClient("localhost:8001") as client:
        [detections] = client.infer([open("board.jpg", "rb").read()])
        results = client.infer_files(["a.jpg", "scan.png"], concurrency=4, tiles=TileSpec())

Model and tensor names, K and the batch sizes come from ``tools.contract``.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import tritonclient.grpc as grpcclient
from tqdm import tqdm
from tritonclient.utils import InferenceServerException

from tools.client.tiling import TileSpec, Window, merge_tiles, read_tiles
from tools.contract import ServedContract, served_contract
from tools.detections import Detections

Layout = tuple[list[Window], int, int]  # a tiled file's windows, height and width


class InferenceFailed(RuntimeError):
    """Some files could not be processed; ``failures`` maps each to its error, ``results`` holds the rest."""

    def __init__(self, failures: dict[str, str], results: list[Detections | None]):
        self.failures = failures
        self.results = results
        lines = [f"{name}: {message}" for name, message in failures.items()]
        super().__init__(f"{len(failures)} of {len(results)} images failed:\n" + "\n".join(lines))


class FileFailed(Exception):
    """One file of ``infer_files`` failed; the message says why."""


def encoded_images_input(encoded_images: Sequence[bytes], input_class=grpcclient.InferInput,
                         contract: ServedContract | None = None):
    """The pipeline's image input (BYTES, [batch, 1]) for the given client module's InferInput class."""
    contract = contract or served_contract()
    # dtype=object keeps every byte; a bytes_ array would strip trailing NULs from the encoded files.
    data = np.empty((len(encoded_images), 1), dtype=object)
    data[:, 0] = list(encoded_images)
    image_input = input_class(contract.image_input, list(data.shape), "BYTES")
    image_input.set_data_from_numpy(data)
    return image_input


def request_parameters(score_threshold: float | None, iou_threshold: float | None) -> dict[str, float] | None:
    parameters = {name: float(value) for name, value in
                  (("score_threshold", score_threshold), ("iou_threshold", iou_threshold)) if value is not None}
    return parameters or None


def split_detections(result, contract: ServedContract | None = None) -> list[Detections]:
    """One ``Detections`` per batch element of an inference result (tritonclient gRPC or HTTP)."""
    contract = contract or served_contract()
    return Detections.from_padded(*(result.as_numpy(name) for name in contract.output_names))


def read_requests(path: Path, tiles: TileSpec | None) -> tuple[list[bytes], Layout | None]:
    """What to send for one file: its bytes, or with ``tiles`` its tiles and their layout."""
    if tiles is None:
        return [path.read_bytes()], None
    return read_tiles(path, tiles)


def whole_image(tile_detections: list[Detections], layout: Layout | None, tiles: TileSpec | None) -> Detections:
    """One file's detections from its requests' results (one result unless the file was tiled)."""
    if layout is None:
        return tile_detections[0]
    return Detections(*merge_tiles(tile_detections, *layout, tiles.merge_iou))


class PipelineClient:
    """Talks to the served pipeline over gRPC; use as a context manager or call ``close()``.

    ``contract`` (default: this checkout's ``models/``) names the model and tensors and sets how many
    tiles go in one request.
    """

    def __init__(self, url: str = "localhost:8001", model_name: str | None = None, timeout_s: float = 60.0,
                 contract: ServedContract | None = None):
        self.contract = contract or served_contract()
        self.url = url
        self.model_name = model_name or self.contract.pipeline_model
        self.timeout_s = timeout_s
        self._client = grpcclient.InferenceServerClient(url=url)  # thread-safe for infer

    def __enter__(self) -> "PipelineClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def infer(self, encoded_images: Sequence[bytes], score_threshold: float | None = None,
              iou_threshold: float | None = None) -> list[Detections]:
        """Run all images as one batched request (at most the contract's max_batch_size)."""
        result = self._client.infer(
            model_name=self.model_name,
            inputs=[encoded_images_input(encoded_images, contract=self.contract)],
            outputs=[grpcclient.InferRequestedOutput(name) for name in self.contract.output_names],
            client_timeout=self.timeout_s,
            parameters=request_parameters(score_threshold, iou_threshold),
        )
        return split_detections(result, self.contract)

    def infer_files(self, paths: Iterable[str | Path], score_threshold: float | None = None,
                    iou_threshold: float | None = None, concurrency: int = 4,
                    progress: bool = True, tiles: TileSpec | None = None) -> list[Detections]:
        """Send each file as its own request, at most ``concurrency`` requests in flight; results in input order.

        With ``tiles``, a file larger than one tile is cut into overlapping tiles at its native resolution,
        sent ``contract.typical_batch_size`` to a request, and its detections are merged back into file
        coordinates (tools.client.tiling). Every file is attempted; if any fails, ``InferenceFailed`` names
        each failed file with its error and carries the results of the others.
        """
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        paths = [Path(p) for p in paths]
        per_request = self.contract.typical_batch_size
        # Files are read and tiled by one pool and their requests sent by another, so the files in progress
        # stay bounded (memory) while one large scan still fills every request slot.
        with ThreadPoolExecutor(concurrency, "pcb-files") as files, ThreadPoolExecutor(concurrency, "pcb-requests") as requests:

            def inspect_file(path: Path) -> Detections:
                try:
                    encoded_images, layout = read_requests(path, tiles)
                except OSError as error:
                    raise FileFailed(f"cannot read file: {error.strerror or error}") from error
                except ValueError as error:
                    raise FileFailed(f"cannot tile file: {error}") from error
                chunks = [requests.submit(self.infer, encoded_images[start : start + per_request], score_threshold,
                                          iou_threshold) for start in range(0, len(encoded_images), per_request)]
                try:
                    return whole_image([d for chunk in chunks for d in chunk.result()], layout, tiles)
                except InferenceServerException as error:
                    raise FileFailed(error.message()) from error

            futures: dict[Future, int] = {files.submit(inspect_file, path): index for index, path in enumerate(paths)}
            results: list[Detections | None] = [None] * len(paths)
            failures: dict[str, str] = {}
            for future in tqdm(as_completed(futures), total=len(paths), unit="image", disable=not progress,
                               desc="Inference"):
                index = futures[future]
                try:
                    results[index] = future.result()
                except FileFailed as error:
                    failures[str(paths[index])] = str(error)
        if failures:
            ordered = {str(p): failures[str(p)] for p in paths if str(p) in failures}
            raise InferenceFailed(ordered, results)
        return results
