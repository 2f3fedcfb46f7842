"""gRPC client for the ``pcb_pipeline`` ensemble: send encoded board images, get defect detections back.

CLI::

    python -m tools.client IMAGE_OR_DIR [...] [--url localhost:8001] [--json out.json] [--annotate-dir DIR]
        [--score-threshold S] [--iou-threshold T] [--concurrency N] [--recursive]
        [--tile [--tile-size 640] [--tile-overlap 192]]
"""
from __future__ import annotations

import argparse
import json
import queue
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import tritonclient.grpc as grpcclient
from tqdm import tqdm

from tools.tiling import DEFAULT_OVERLAP, DEFAULT_TILE_SIZE, TileSpec, Window, merge_tiles, read_tiles

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LABELS = REPO_ROOT / "models" / "pcb_defect_detector" / "1" / "labels.txt"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
OUTPUT_NAMES = ("NUM_DETECTIONS", "BOXES", "SCORES", "CLASSES")
TILES_PER_REQUEST = 8  # one of the dynamic batcher's preferred batch sizes, well under max_batch_size 32


@dataclass
class Detections:
    """Detections for one image; only the first NUM_DETECTIONS rows of the padded outputs."""

    boxes: np.ndarray  # (n, 4) float32 x1, y1, x2, y2 in original-image pixels
    scores: np.ndarray  # (n,) float32
    classes: np.ndarray  # (n,) int32, 0-based into the labels


class InferenceFailed(RuntimeError):
    """Some files could not be processed; ``failures`` maps each to its error, ``results`` holds the rest."""

    def __init__(self, failures: dict[str, str], results: list[Detections | None]):
        self.failures = failures
        self.results = results
        lines = [f"{name}: {message}" for name, message in failures.items()]
        super().__init__(f"{len(failures)} of {len(results)} images failed:\n" + "\n".join(lines))


def load_labels(path: Path = DEFAULT_LABELS) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def encoded_images_input(encoded_images: Sequence[bytes], input_class=grpcclient.InferInput):
    """The pipeline's ``IMAGE`` input (BYTES, [batch, 1]) for the given client module's InferInput class."""
    # dtype=object keeps every byte; a bytes_ array would strip trailing NULs from the encoded files.
    data = np.empty((len(encoded_images), 1), dtype=object)
    data[:, 0] = list(encoded_images)
    image_input = input_class("IMAGE", list(data.shape), "BYTES")
    image_input.set_data_from_numpy(data)
    return image_input


def request_parameters(score_threshold: float | None, iou_threshold: float | None) -> dict[str, float] | None:
    parameters = {name: float(value) for name, value in
                  (("score_threshold", score_threshold), ("iou_threshold", iou_threshold)) if value is not None}
    return parameters or None


def split_detections(result) -> list[Detections]:
    """One ``Detections`` per batch element of an inference result (tritonclient gRPC or HTTP)."""
    num, boxes, scores, classes = (result.as_numpy(name) for name in OUTPUT_NAMES)
    return [
        Detections(boxes=boxes[i, :n].astype(np.float32), scores=scores[i, :n].astype(np.float32),
                   classes=classes[i, :n].astype(np.int32))
        for i, n in enumerate(int(count) for count in num.reshape(-1))
    ]


class PipelineClient:
    """Talks to ``model_name`` over gRPC; use as a context manager or call ``close()``."""

    def __init__(self, url: str = "localhost:8001", model_name: str = "pcb_pipeline", timeout_s: float = 60.0):
        self.url = url
        self.model_name = model_name
        self.timeout_s = timeout_s
        self._client = grpcclient.InferenceServerClient(url=url)

    def __enter__(self) -> "PipelineClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def _request(self, encoded_images: Sequence[bytes], score_threshold, iou_threshold) -> dict:
        return dict(
            model_name=self.model_name,
            inputs=[encoded_images_input(encoded_images)],
            outputs=[grpcclient.InferRequestedOutput(name) for name in OUTPUT_NAMES],
            client_timeout=self.timeout_s,
            parameters=request_parameters(score_threshold, iou_threshold),
        )

    def infer(self, encoded_images: list[bytes], score_threshold: float | None = None,
              iou_threshold: float | None = None) -> list[Detections]:
        """Run all images as one batched request (at most the model's max_batch_size, 32)."""
        result = self._client.infer(**self._request(encoded_images, score_threshold, iou_threshold))
        return split_detections(result)

    def infer_files(self, paths: Iterable[str | Path], score_threshold: float | None = None,
                    iou_threshold: float | None = None, concurrency: int = 4,
                    progress: bool = True, tiles: TileSpec | None = None) -> list[Detections]:
        """Send each file as its own request, ``concurrency`` requests in flight; results in input order.

        With ``tiles``, a file larger than one tile is cut into overlapping tiles at its native resolution,
        sent ``TILES_PER_REQUEST`` to a request, and its detections are merged back into file coordinates
        (tools.tiling). Every file is attempted; if any fails, ``InferenceFailed`` names each failed file
        with its error and carries the results of the others.
        """
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        paths = [Path(p) for p in paths]
        results: list[Detections | None] = [None] * len(paths)
        failures: dict[str, str] = {}
        tile_results: dict[int, list] = {}  # file index -> its tiles' Detections, filled as requests return
        layouts: dict[int, tuple[list[Window], int, int] | None] = {}  # file index -> tiles, height, width
        pending: dict[int, int] = {}  # file index -> requests not yet returned
        completed: queue.Queue = queue.Queue()

        def on_done(index, first_tile, result, error):  # runs on a gRPC thread: hand over to the submitting thread
            completed.put((index, first_tile, result, error))

        def collect(bar) -> None:
            index, first_tile, result, error = completed.get()
            if error is not None:
                failures.setdefault(str(paths[index]), error.message())
            else:
                detections = split_detections(result)
                tile_results[index][first_tile : first_tile + len(detections)] = detections
            pending[index] -= 1
            if pending[index] == 0:
                if str(paths[index]) not in failures:
                    results[index] = whole_image(tile_results[index], layouts[index], tiles)
                bar.update()

        in_flight = 0
        with tqdm(total=len(paths), unit="image", disable=not progress, desc="Inference") as bar:
            for index, path in enumerate(paths):
                try:
                    encoded_images, layouts[index] = read_requests(path, tiles)
                except OSError as error:
                    failures[str(path)] = f"cannot read file: {error.strerror or error}"
                    bar.update()
                    continue
                except ValueError as error:
                    failures[str(path)] = f"cannot tile file: {error}"
                    bar.update()
                    continue
                tile_results[index] = [None] * len(encoded_images)
                first_tiles = range(0, len(encoded_images), TILES_PER_REQUEST)
                pending[index] = len(first_tiles)  # all of them before any returns, so none completes the file early
                for first_tile in first_tiles:
                    while in_flight >= concurrency:
                        collect(bar)
                        in_flight -= 1
                    chunk = encoded_images[first_tile : first_tile + TILES_PER_REQUEST]
                    self._client.async_infer(callback=partial(on_done, index, first_tile),
                                             **self._request(chunk, score_threshold, iou_threshold))
                    in_flight += 1
            for _ in range(in_flight):
                collect(bar)
        if failures:
            ordered = {str(p): failures[str(p)] for p in paths if str(p) in failures}
            raise InferenceFailed(ordered, results)
        return results


def read_requests(path: Path, tiles: TileSpec | None) -> tuple[list[bytes], tuple[list[Window], int, int] | None]:
    """What to send for one file: its bytes, or with ``tiles`` its tiles and their (windows, height, width)."""
    if tiles is None:
        return [path.read_bytes()], None
    return read_tiles(path, tiles)


def whole_image(tile_detections: list[Detections], layout: tuple[list[Window], int, int] | None,
                tiles: TileSpec | None) -> Detections:
    """One file's detections from its requests' results (one result unless the file was tiled)."""
    if layout is None:
        return tile_detections[0]
    return Detections(*merge_tiles(tile_detections, *layout, tiles.merge_iou))


def find_images(inputs: Iterable[str | Path], recursive: bool = False) -> list[Path]:
    """Expand files and folders into image files (folders: sorted, by suffix); missing inputs raise."""
    images = []
    for item in map(Path, inputs):
        if item.is_dir():
            candidates = item.rglob("*") if recursive else item.iterdir()
            images += sorted(p for p in candidates if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            images.append(item)
        else:
            raise FileNotFoundError(f"no such file or folder: {item}")
    return images


def detections_record(path: Path, detections: Detections, labels: Sequence[str]) -> dict:
    """JSON-ready record of one image's detections."""
    return {
        "file": str(path),
        "detections": [
            {"box": [round(float(v), 2) for v in box], "class": labels[int(c)], "class_id": int(c),
             "score": round(float(s), 4)}
            for box, s, c in zip(detections.boxes, detections.scores, detections.classes)
        ],
    }


def detections_table(paths: Sequence[Path], results: Sequence[Detections | None], labels: Sequence[str],
                     failures: dict[str, str] | None = None) -> str:
    """A plain-text table: one row per image with its defect count per class."""
    failures = failures or {}
    names = [p.name for p in paths]
    name_width = max([len("image"), *map(len, names)])
    widths = [max(len(label), 3) for label in labels]
    header = f"{'image':<{name_width}}  {'total':>5}  " + "  ".join(f"{l:>{w}}" for l, w in zip(labels, widths))
    rows = [header, "-" * len(header)]
    for path, name, detections in zip(paths, names, results):
        if detections is None:
            rows.append(f"{name:<{name_width}}  FAILED: {failures.get(str(path), 'no result')}")
            continue
        counts = np.bincount(detections.classes, minlength=len(labels))
        rows.append(f"{name:<{name_width}}  {len(detections.classes):>5}  "
                    + "  ".join(f"{int(n) if n else '.':>{w}}" for n, w in zip(counts, widths)))
    return "\n".join(rows)


def write_annotated(paths: Sequence[Path], results: Sequence[Detections | None], labels: Sequence[str],
                    out_dir: Path) -> list[Path]:
    """Save each successfully processed image with its detections drawn, as ``out_dir/<stem>.png``."""
    import cv2

    from tools.annotate import draw_detections

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path, detections in zip(paths, results):
        if detections is None:
            continue
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)  # applies EXIF orientation, like decoding for inference
        if image is None:
            raise ValueError(f"{path}: OpenCV cannot read this image to annotate it")
        target = out_dir / f"{path.stem}.png"
        cv2.imwrite(str(target), draw_detections(image, detections, labels))
        written.append(target)
    return written


def add_tiling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tile", action="store_true",
                        help="cut images larger than one tile into overlapping tiles at native resolution "
                             "(whole-board scans) instead of letting the pipeline shrink them to 640x640")
    parser.add_argument("--tile-size", type=int, default=DEFAULT_TILE_SIZE, help="tile side in pixels")
    parser.add_argument("--tile-overlap", type=int, default=DEFAULT_OVERLAP,
                        help="pixels shared by neighbouring tiles; keep it wider than the largest defect")


def tile_spec(args: argparse.Namespace) -> TileSpec | None:
    return TileSpec(args.tile_size, args.tile_overlap) if args.tile else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Detect PCB defects in images with the pcb_pipeline model.")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    parser.add_argument("--url", default="localhost:8001", help="gRPC address of the Triton server")
    parser.add_argument("--model", default="pcb_pipeline")
    parser.add_argument("--json", type=Path, help="write detections per file to this JSON file")
    parser.add_argument("--annotate-dir", type=Path, help="write annotated images to this folder")
    parser.add_argument("--score-threshold", type=float)
    parser.add_argument("--iou-threshold", type=float)
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    parser.add_argument("--recursive", action="store_true", help="look for images in subfolders too")
    parser.add_argument("--labels", type=Path, default=DEFAULT_LABELS)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    add_tiling_arguments(parser)
    args = parser.parse_args(argv)

    paths = find_images(args.inputs, recursive=args.recursive)
    if not paths:
        parser.error("no images found")
    labels = load_labels(args.labels)
    failures: dict[str, str] = {}
    with PipelineClient(args.url, args.model, timeout_s=args.timeout) as client:
        try:
            results = client.infer_files(paths, args.score_threshold, args.iou_threshold, args.concurrency,
                                         tiles=tile_spec(args))
        except InferenceFailed as error:
            results, failures = error.results, error.failures

    print(detections_table(paths, results, labels, failures))
    if args.json:
        records = [detections_record(p, d, labels) if d is not None else {"file": str(p), "error": failures[str(p)]}
                   for p, d in zip(paths, results)]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=2))
        print(f"Detections written to {args.json}")
    if args.annotate_dir:
        written = write_annotated(paths, results, labels, args.annotate_dir)
        print(f"{len(written)} annotated images written to {args.annotate_dir}")
    if failures:
        print(f"{len(failures)} of {len(paths)} images failed (see table above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
