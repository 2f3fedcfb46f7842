"""Build the detector's TensorRT engine (``model.plan``) from the FP16 ONNX model, with polygraphy.

Run it on the GPU that will serve, inside the engine-builder image of this repository (same NVIDIA release as
the serving image, so the same TensorRT): an engine only loads on the TensorRT version and GPU architecture
that built it (see docs/gpu.md for the compatibility options and their costs).

    docker build --target engine-builder -t pcb-engine-builder .
    docker run --rm --gpus all -v "$PWD/models:/workspace/models" pcb-engine-builder \\
        python3 -m tools.engine.build

* Precision comes from the ONNX graph (``tools.engine.fp16``): the network is created strongly typed, which
  TensorRT 11 requires (it removed the FP16 builder flag) and 10.x supports. Only a TensorRT without
  strongly typed networks falls back to the FP16 builder flag, and says so.
* One optimization profile for ``images``: batch 1 .. the detector's ``max_batch_size`` (read from its
  config.pbtxt), tuned for a typical batch of 8.
* Tactic timings are cached per TensorRT version and GPU (name and compute capability), so rebuilding on
  the same kind of machine is fast and a cache is never reused where its timings mean nothing.
* The engine is written to a temporary file and renamed, so a server reading a shared volume never sees
  half an engine.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

from tools.contract import read_model_config, served_contract

CONTRACT = served_contract()
DEFAULT_ONNX = CONTRACT.detector_onnx.with_name("model.fp16.onnx")
DEFAULT_ENGINE = CONTRACT.detector_version_dir / CONTRACT.detector_model_file
DEFAULT_CONFIG = CONTRACT.models_root / CONTRACT.detector_model / "config.pbtxt"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / CONTRACT.detector_model / "tensorrt-timing"
MIN_BATCH = 1
OPT_BATCH = CONTRACT.typical_batch_size  # tactics are tuned for the batch the dynamic batcher forms most

BUILDER_IMAGE_HELP = (
    "Run it inside this repository's engine-builder image on the GPU that will serve:\n"
    "  docker build --target engine-builder -t pcb-engine-builder .\n"
    '  docker run --rm --gpus all -v "$PWD/models:/workspace/models" pcb-engine-builder '
    "python3 -m tools.engine.build\n"
    "(see docs/gpu.md)."
)


class MissingRequirement(RuntimeError):
    """Something the build needs is not on this machine; the message says what and where to run instead."""


@dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: str  # "8.6"


@dataclass(frozen=True)
class ProfileShapes:
    """Shapes of one optimization profile for one input."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def read_max_batch_size(config_path: Path) -> int:
    """``max_batch_size`` of a Triton model configuration (must be positive: the profile spans the batch)."""
    config = read_model_config(config_path)
    if config.max_batch_size < 1:
        raise ValueError(f"{config_path}: max_batch_size is {config.max_batch_size}; the detector must batch (>= 1)")
    return config.max_batch_size


def onnx_input(onnx_path: Path) -> tuple[str, tuple[int, ...]]:
    """(name, per-image shape) of the model's only input, e.g. ('images', (1, 640, 640))."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    if len(model.graph.input) != 1:
        raise ValueError(f"{onnx_path}: expected one input, found {[i.name for i in model.graph.input]}")
    graph_input = model.graph.input[0]
    dims = graph_input.type.tensor_type.shape.dim[1:]
    if any(d.dim_value <= 0 for d in dims):
        raise ValueError(f"{onnx_path}: input {graph_input.name} must have fixed non-batch dimensions")
    return graph_input.name, tuple(d.dim_value for d in dims)


def profile_shapes(image_shape: tuple[int, ...], max_batch_size: int, opt_batch: int = OPT_BATCH) -> ProfileShapes:
    """Batch MIN_BATCH .. max_batch_size, optimized for ``opt_batch`` (clamped into that range)."""
    opt = min(max(opt_batch, MIN_BATCH), max_batch_size)
    return ProfileShapes(
        min=(MIN_BATCH, *image_shape), opt=(opt, *image_shape), max=(max_batch_size, *image_shape)
    )


def timing_cache_name(tensorrt_version: str, gpu: Gpu) -> str:
    """File name of the timing cache for one TensorRT version on one kind of GPU."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.name.lower()).strip("-")
    return f"trt-{tensorrt_version}_{slug}_sm{gpu.compute_capability.replace('.', '')}.cache"


def query_gpu(device: str) -> Gpu:
    """Name and compute capability of one GPU (index or UUID) from nvidia-smi."""
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        raise MissingRequirement("No NVIDIA GPU here: nvidia-smi is not on PATH.\n" + BUILDER_IMAGE_HELP)
    result = subprocess.run(
        [nvidia_smi, "--query-gpu=name,compute_cap", "--format=csv,noheader", f"--id={device}"],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0 or not result.stdout.strip():
        reason = (result.stderr or result.stdout).strip()
        raise MissingRequirement(f"No usable NVIDIA GPU {device}: nvidia-smi says {reason!r}.\n" + BUILDER_IMAGE_HELP)
    name, capability = (field.strip() for field in result.stdout.strip().splitlines()[0].split(","))
    return Gpu(name=name, compute_capability=capability)


def first_visible_device() -> str:
    """The GPU CUDA will use as device 0: the first of CUDA_VISIBLE_DEVICES (index or UUID), else 0."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return visible or "0"


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as exc:
        raise MissingRequirement(
            f"The TensorRT Python package is not installed here ({exc}).\n" + BUILDER_IMAGE_HELP
        ) from exc
    return tensorrt


def supports_strong_typing(trt) -> bool:
    """Whether this TensorRT can create strongly typed networks (all of 10.x and 11.x; not 8.x)."""
    return hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")


def engine_loaders(
    onnx_path: Path,
    input_name: str,
    shapes: ProfileShapes,
    strongly_typed: bool,
    timing_cache: Path,
    version_compatible: bool = False,
    hardware_compatibility_level=None,
):
    """polygraphy's network and builder-config loaders. Making them needs no TensorRT: it only runs when
    they are called, so the arguments are checked against the pinned polygraphy on any machine."""
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=strongly_typed or None)
    config = CreateConfig(
        profiles=[Profile().add(input_name, min=shapes.min, opt=shapes.opt, max=shapes.max)],
        load_timing_cache=str(timing_cache) if timing_cache.exists() else None,
        version_compatible=version_compatible or None,
        hardware_compatibility_level=hardware_compatibility_level,
        fp16=None if strongly_typed else True,  # strongly typed: precision is the graph's own
    )
    return network, config


def build(
    onnx_path: Path,
    engine_path: Path,
    max_batch_size: int,
    cache_dir: Path,
    version_compatible: bool = False,
    ampere_plus: bool = False,
) -> Path:
    """Build and write the engine; returns the timing cache used. GPU and TensorRT only."""
    trt = import_tensorrt()
    gpu = query_gpu(first_visible_device())
    input_name, image_shape = onnx_input(onnx_path)
    shapes = profile_shapes(image_shape, max_batch_size)
    strongly_typed = supports_strong_typing(trt)
    if not strongly_typed:
        print(f"TensorRT {trt.__version__} has no strongly typed networks: falling back to the FP16 builder flag")
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache = cache_dir / timing_cache_name(trt.__version__, gpu)
    network, config = engine_loaders(
        onnx_path, input_name, shapes, strongly_typed, cache,
        version_compatible=version_compatible,
        hardware_compatibility_level=trt.HardwareCompatibilityLevel.AMPERE_PLUS if ampere_plus else None,
    )
    print(
        f"building on {gpu.name} (sm {gpu.compute_capability}) with TensorRT {trt.__version__}: "
        f"{'strongly typed' if strongly_typed else 'FP16 flag'}, {input_name} {shapes.min} .. {shapes.opt} .. "
        f"{shapes.max}, timing cache {cache}"
    )
    engine_bytes = EngineBytesFromNetwork(network, config=config, save_timing_cache=str(cache))()
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=engine_path.parent, prefix=".model.plan.", delete=False) as partial:
        partial.write(engine_bytes)
    os.replace(partial.name, engine_path)
    print(f"wrote {engine_path} ({engine_path.stat().st_size / 1e6:.1f} MB)")
    return cache


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", type=Path, default=DEFAULT_ONNX, help="FP16 mixed-precision ONNX (tools.engine.fp16)")
    parser.add_argument("--engine", type=Path, default=DEFAULT_ENGINE)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="detector config.pbtxt (max_batch_size)")
    parser.add_argument("--timing-cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument(
        "--version-compatible",
        action="store_true",
        help="embed the lean runtime so later TensorRT releases of the same major version load the engine "
        "(slower; Triton needs --backend-config=tensorrt,version-compatible=true)",
    )
    parser.add_argument(
        "--ampere-plus",
        action="store_true",
        help="hardware compatibility level AMPERE_PLUS: one engine for every Ampere-or-newer GPU (slower)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    max_batch_size = read_max_batch_size(args.config)
    try:
        build(args.onnx, args.engine, max_batch_size, args.timing_cache_dir, args.version_compatible, args.ampere_plus)
    except MissingRequirement as missing:
        print(f"cannot build the TensorRT engine: {missing}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
