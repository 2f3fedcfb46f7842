"""gRPC client library for the served models: send encoded board images or whole-board scans, get defects back.

    from tools.client import PipelineClient
    with PipelineClient("localhost:8001") as client:
        [detections] = client.infer([open("board.jpg", "rb").read()])        # pcb_pipeline
        [whole] = client.infer([open("panel.png", "rb").read()], scans=True)  # pcb_scan tiles it on the server
        [checked] = client.infer([board], templates=[template])             # golden-template inspection
        checked.registration                                                # dx, dy, angle, score
        results = client.infer_files(["a.jpg", "b.png"], concurrency=4, templates=["a_temp.jpg", None])

Model and tensor names come from ``tools.contract``. Large scans can go through system shared memory
(``shared_memory=True``) when the client runs on the server's host. A request sends a defect-free template
(``TEMPLATE``) for each of its images or for none; with templates the answer carries ``REGISTRATION``, kept as
``Detections.registration`` (None without a template). Requests carry the W3C trace context of the caller's
active OpenTelemetry span (``tools.client.tracing``), so a traced server continues the trace.
"""
from __future__ import annotations

import contextlib
import contextvars
import random
import time
import uuid
import warnings
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import tritonclient.grpc as grpcclient
from tqdm import tqdm
from tritonclient.utils import InferenceServerException, serialize_byte_tensor, serialized_byte_size

from tools.client.tracing import trace_headers
from tools.contract import ServedContract, served_contract
from tools.detections import Detections

UNAVAILABLE = "StatusCode.UNAVAILABLE"  # InferenceServerException.status() of a gRPC UNAVAILABLE
CANCELLED = "StatusCode.CANCELLED"  # a call the server cancelled as it shut down (this client cancels none)
# pcb_scan's tile count (README's contract; the scan model's one output beyond the pipeline's): with templates
# its REGISTRATION has one row per tile, padded with zeros to the longest scan of the request.
NUM_TILES = "NUM_TILES"
# Triton 2.51 refuses to unregister a shared-memory region while a request still holds it, and releases the
# request's inputs only just after sending its response; later releases defer the unregistration themselves.
REGION_IN_USE = "currently in use"
REGION_RELEASE_TIMEOUT_S = 10.0


class InferenceFailed(RuntimeError):
    """Some files could not be processed; ``failures`` maps each to its error, ``results`` holds the rest."""

    def __init__(self, failures: dict[str, str], results: list[Detections | None]):
        self.failures = failures
        self.results = results
        lines = [f"{name}: {message}" for name, message in failures.items()]
        super().__init__(f"{len(failures)} of {len(results)} images failed:\n" + "\n".join(lines))


class TemplateUnreadable(Exception):
    """A file's template could not be read from disk; the message names it."""


def encoded_images_array(encoded_images: Sequence[bytes]) -> np.ndarray:
    """The image input's data, [batch, 1] BYTES; dtype=object keeps every byte (a bytes_ array would strip
    trailing NULs from the encoded files)."""
    data = np.empty((len(encoded_images), 1), dtype=object)
    data[:, 0] = list(encoded_images)
    return data


def encoded_images_input(encoded_images: Sequence[bytes], input_class=grpcclient.InferInput,
                         contract: ServedContract | None = None, name: str | None = None):
    """The pipeline's image input (BYTES, [batch, 1]) for the given client module's InferInput class; ``name``
    another input of the same kind (``contract.template_input``)."""
    contract = contract or served_contract()
    data = encoded_images_array(encoded_images)
    image_input = input_class(name or contract.image_input, list(data.shape), "BYTES")
    image_input.set_data_from_numpy(data)
    return image_input


def request_parameters(score_threshold: float | None, iou_threshold: float | None) -> dict[str, float] | None:
    parameters = {name: float(value) for name, value in
                  (("score_threshold", score_threshold), ("iou_threshold", iou_threshold)) if value is not None}
    return parameters or None


def split_detections(result, contract: ServedContract | None = None, registration: bool = False,
                     scans: bool = False) -> list[Detections]:
    """One ``Detections`` per batch element of an inference result (tritonclient gRPC or HTTP).

    ``registration``: the request sent templates and asked for REGISTRATION (and, with ``scans``, NUM_TILES);
    each result then carries its row (pcb_pipeline) or its tiles' rows (pcb_scan)."""
    contract = contract or served_contract()
    detections = Detections.from_padded(*(result.as_numpy(name) for name in contract.output_names))
    if not registration:
        return detections
    rows = result.as_numpy(contract.registration_output)
    if not scans:
        return [d.with_registration(row.reshape(4)) for d, row in zip(detections, rows, strict=True)]
    tiles = result.as_numpy(NUM_TILES).reshape(-1)
    return [d.with_registration(row[:n]) for d, row, n in zip(detections, rows, tiles, strict=True)]


def requested_outputs(contract: ServedContract, templates: bool, scans: bool) -> list[str]:
    """The outputs a request asks for: the detections, and with templates the registration (scans: per tile)."""
    names = list(contract.output_names)
    if templates:
        names.append(contract.registration_output)
        if scans:
            names.append(NUM_TILES)
    return names


def retryable(error: InferenceServerException) -> bool:
    """A transient failure worth another attempt: gRPC UNAVAILABLE (server restarting or draining, connection
    closed at its maximum age, pod gone), or CANCELLED (a call still open when the server shut down; inference
    is stateless, so sending it again is safe). Triton also answers UNAVAILABLE to a restricted protocol called
    without its key (--grpc-restricted-protocol); that is not transient."""
    if error.status() == CANCELLED:
        return True
    return error.status() == UNAVAILABLE and "restricted" not in (error.message() or "")


class PipelineClient:
    """Talks to the served models over gRPC; use as a context manager or call ``close()``.

    ``contract`` (default: this checkout's ``models/``) names the models and tensors.
    ``infer`` makes up to ``max_attempts`` attempts when the server answers UNAVAILABLE, waiting
    ``retry_backoff_s`` before the second, doubling up to ``retry_backoff_max_s`` (each wait jittered to
    between half and all of it, so clients cut off together do not return together). Inference is
    stateless, so a retried request gives the same answer. ``max_attempts=1`` turns retrying off.
    """

    def __init__(self, url: str = "localhost:8001", model_name: str | None = None, timeout_s: float = 60.0,
                 contract: ServedContract | None = None, max_attempts: int = 4, retry_backoff_s: float = 0.25,
                 retry_backoff_max_s: float = 2.0):
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if retry_backoff_s < 0 or retry_backoff_max_s < retry_backoff_s:
            raise ValueError("need 0 <= retry_backoff_s <= retry_backoff_max_s")
        self.contract = contract or served_contract()
        self.url = url
        self.model_name = model_name or self.contract.pipeline_model
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.retry_backoff_s = retry_backoff_s
        self.retry_backoff_max_s = retry_backoff_max_s
        self._client = grpcclient.InferenceServerClient(url=url)  # thread-safe for infer

    def __enter__(self) -> "PipelineClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def infer(self, encoded_images: Sequence[bytes], score_threshold: float | None = None,
              iou_threshold: float | None = None, scans: bool = False, shared_memory: bool = False,
              templates: Sequence[bytes] | None = None) -> list[Detections]:
        """Run all images as one batched request (at most the model's max_batch_size).

        ``scans`` sends them to the scan model, which tiles each at native resolution and returns the defects in
        scan pixels. ``shared_memory`` passes the encoded bytes through a system shared-memory region instead of
        the gRPC message (the client must run on the server's host). ``templates``: one encoded defect-free
        template per image (a scan's whole template with ``scans``), registered onto it on the server; each
        result's ``registration`` then holds what the registration found (None without templates).
        """
        if templates is not None:
            templates = list(templates)
            if len(templates) != len(encoded_images) or any(t is None for t in templates):
                raise ValueError(f"{len(encoded_images)} images need {len(encoded_images)} templates, got "
                                 f"{sum(t is not None for t in templates)}: a request sends a template for each "
                                 "of its images or for none")
        model = self.contract.scan_model if scans else self.model_name
        outputs = requested_outputs(self.contract, templates is not None, scans)
        attempt = 1
        while True:
            try:
                with contextlib.ExitStack() as stack:
                    inputs = [stack.enter_context(self._bytes_input(self.contract.image_input, encoded_images,
                                                                    shared_memory))]
                    if templates is not None:
                        inputs.append(stack.enter_context(self._bytes_input(self.contract.template_input, templates,
                                                                            shared_memory)))
                    result = self._client.infer(
                        model_name=model,
                        inputs=inputs,
                        outputs=[grpcclient.InferRequestedOutput(name) for name in outputs],
                        client_timeout=self.timeout_s,
                        parameters=request_parameters(score_threshold, iou_threshold),
                        headers=trace_headers(),
                    )
                return split_detections(result, self.contract, templates is not None, scans)
            except InferenceServerException as error:
                if attempt >= self.max_attempts or not retryable(error):
                    raise
                time.sleep(self.retry_delay_s(attempt))
                attempt += 1

    def retry_delay_s(self, attempt: int) -> float:
        """The wait after failed attempt ``attempt`` (1-based): exponential, capped, jittered."""
        delay = min(self.retry_backoff_max_s, self.retry_backoff_s * 2 ** (attempt - 1))
        return random.uniform(delay / 2, delay)

    @contextlib.contextmanager
    def _bytes_input(self, name: str, encoded_images: Sequence[bytes], shared_memory: bool):
        """The BYTES input ``name`` ([batch, 1]) of encoded images, in the message or in shared memory."""
        if not shared_memory:
            yield encoded_images_input(encoded_images, contract=self.contract, name=name)
            return
        with warnings.catch_warnings():  # tritonclient 2.51 imports the deprecated pkg_resources here
            warnings.simplefilter("ignore", UserWarning)
            import tritonclient.utils.shared_memory as system_shared_memory
        serialized = serialize_byte_tensor(encoded_images_array(encoded_images))
        size = serialized_byte_size(serialized)
        region_name = f"pcb-inspect-{uuid.uuid4().hex}"  # one region per input of a request: never shared
        region = system_shared_memory.create_shared_memory_region(region_name, f"/{region_name}", size)
        try:
            system_shared_memory.set_shared_memory_region(region, [serialized])
            self._client.register_system_shared_memory(region_name, f"/{region_name}", size)
            try:
                image_input = grpcclient.InferInput(name, [len(encoded_images), 1], "BYTES")
                image_input.set_shared_memory(region_name, size)
                yield image_input
            finally:
                self._unregister_when_released(region_name)
        finally:
            system_shared_memory.destroy_shared_memory_region(region)

    def _unregister_when_released(self, region_name: str) -> None:
        """Unregister a system shared-memory region, waiting for the server to release it (REGION_IN_USE)."""
        deadline = time.monotonic() + REGION_RELEASE_TIMEOUT_S
        delay_s = 0.005
        while True:
            try:
                self._client.unregister_system_shared_memory(region_name)
                return
            except InferenceServerException as error:
                if REGION_IN_USE not in str(error) or time.monotonic() > deadline:
                    raise
            time.sleep(delay_s)
            delay_s = min(2 * delay_s, 0.2)

    def infer_files(self, paths: Iterable[str | Path], score_threshold: float | None = None,
                    iou_threshold: float | None = None, concurrency: int = 4, progress: bool = True,
                    scans: bool = False, shared_memory: bool = False,
                    templates: Sequence[str | Path | bytes | None] | None = None) -> list[Detections]:
        """Send each file as its own request, at most ``concurrency`` in flight; results in input order.

        ``scans`` and ``shared_memory`` as for ``infer``. ``templates``: one per file, its template's path,
        its encoded bytes (a template made in memory), or None to inspect that file without one. Every file is
        attempted; if any fails, ``InferenceFailed`` names each failed file with its error and carries the
        results of the others.
        """
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        paths = [Path(p) for p in paths]
        templates = [None] * len(paths) if templates is None else list(templates)
        if len(templates) != len(paths):
            raise ValueError(f"{len(paths)} files but {len(templates)} templates (use None for a file without one)")

        def inspect_file(path: Path, template: str | Path | bytes | None) -> Detections:
            image = path.read_bytes()
            if template is not None and not isinstance(template, bytes):
                try:
                    template = Path(template).read_bytes()
                except OSError as error:
                    raise TemplateUnreadable(f"cannot read template file {template}: "
                                             f"{error.strerror or error}") from None
            (detections,) = self.infer([image], score_threshold, iou_threshold, scans, shared_memory,
                                       None if template is None else [template])
            return detections

        results: list[Detections | None] = [None] * len(paths)
        failures: dict[str, str] = {}
        with ThreadPoolExecutor(concurrency, "pcb-requests") as pool:
            # Each request in the caller's context, so it carries the caller's trace (threads do not inherit it).
            futures: dict[Future, int] = {pool.submit(contextvars.copy_context().run, inspect_file, path, template): index
                                          for index, (path, template) in enumerate(zip(paths, templates))}
            for future in tqdm(as_completed(futures), total=len(paths), unit="image", disable=not progress,
                               desc="Inference"):
                index = futures[future]
                try:
                    results[index] = future.result()
                except TemplateUnreadable as error:
                    failures[str(paths[index])] = str(error)
                except OSError as error:
                    failures[str(paths[index])] = f"cannot read file: {error.strerror or error}"
                except InferenceServerException as error:
                    failures[str(paths[index])] = error.message()
        if failures:
            ordered = {str(p): failures[str(p)] for p in paths if str(p) in failures}
            raise InferenceFailed(ordered, results)
        return results
