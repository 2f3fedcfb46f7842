"""Build, validate and publish one immutable model release on the model store (the engine-build Job runs this).

    python3 publish_release.py --store /store --source /workspace/models --data /data/deeppcb

1. copies the model repository baked into the engine-builder image to ``staging/<release>/models``;
2. builds the detector's TensorRT engine there (``tools.engine.build``) and validates it against the FP32
   ONNX model on real boards (``tools.engine.validate``); a failure publishes nothing;
3. writes the release's provenance (``RELEASE.json``: source ONNX hashes, TensorRT version, GPU, driver, build
   date, node) and every file's SHA-256 (``SHA256SUMS``), and makes the files read-only;
4. publishes it with one ``rename`` to ``releases/<release>`` (atomic on one file system, NFS included: a
   server either sees the whole release or none of it). An existing release is never replaced.

With ``--cpu-only`` (deploy/k8s/release-cpu-only, for a cluster without GPUs) step 2 is skipped: the release
has no engine (``"engine_sha256": null``) and serves only with the CPU configs (--model-config-name=cpu).

The release name is ``<UTC build time>-<first 12 hex of the source ONNX's SHA-256>-<GPU or cpu-only>``; it is printed
last ("published release ...") and written to the Job's termination message. Serving pods name it in
PCB_MODEL_RELEASE (deploy/k8s/overlays/<variant>/release.yaml).

Runs inside the engine-builder image (tools/ on PYTHONPATH). Mounted from a ConfigMap by
deploy/k8s/engine-build; tests/test_deploy_release.py runs its steps on CPU with a stand-in build.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

RELEASE_FILE = "RELEASE.json"
CHECKSUMS_FILE = "SHA256SUMS"
TERMINATION_LOG = Path("/dev/termination-log")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def release_name(onnx_sha256: str, gpu_name: str, built_at: dt.datetime) -> str:
    return f"{built_at:%Y%m%dT%H%M%SZ}-{onnx_sha256[:12]}-{slug(gpu_name)}"


def stage(source_models: Path, staging: Path) -> Path:
    """A private copy of the model repository to build in; returns its models/ folder."""
    if staging.exists():
        raise FileExistsError(f"{staging} exists: another build with the same name is running or failed")
    staging.mkdir(parents=True)
    models = staging / "models"
    shutil.copytree(source_models, models, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return models


def checksums(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``, by path relative to it."""
    return {str(path.relative_to(root)): sha256(path) for path in sorted(root.rglob("*")) if path.is_file()}


def write_provenance(staging: Path, provenance: dict) -> None:
    (staging / RELEASE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    sums = checksums(staging)
    sums.pop(CHECKSUMS_FILE, None)
    (staging / CHECKSUMS_FILE).write_text("".join(f"{digest}  {path}\n" for path, digest in sums.items()))


def make_read_only(root: Path) -> None:
    """Files r--r--r--, folders r-xr-xr-x, except ``root`` itself (renaming a folder needs it writable)."""
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_symlink():
            continue
        path.chmod(0o555 if path.is_dir() else mode & 0o555 | 0o444)


def publish(staging: Path, releases: Path) -> Path:
    """Move a complete, read-only staging folder to releases/<its name> in one rename; never replaces one."""
    releases.mkdir(parents=True, exist_ok=True)
    target = releases / staging.name
    if target.exists():
        raise FileExistsError(f"release {target.name} already exists; releases are immutable")
    make_read_only(staging)
    os.sync()
    os.rename(staging, target)
    target.chmod(0o555)
    return target


def run(command: list[str]) -> None:
    print("+ " + " ".join(command), flush=True)
    subprocess.run(command, check=True)


def gpu_facts() -> dict:
    """The build GPU as tools.engine.build sees it, and the driver (nvidia-smi)."""
    from tools.engine.build import first_visible_device, query_gpu

    device = first_visible_device()
    gpu = query_gpu(device)
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"--id={device}"],
                            capture_output=True, text=True).stdout.strip()
    return {"name": gpu.name, "compute_capability": gpu.compute_capability, "driver_version": driver}


def tensorrt_version() -> str:
    import tensorrt

    return tensorrt.__version__


def build_and_validate(models: Path, detector: str, store: Path, data: Path) -> None:
    folder = models / detector
    run([sys.executable, "-m", "tools.engine.build", "--onnx", str(folder / "1" / "model.fp16.onnx"),
         "--engine", str(folder / "1" / "model.plan"), "--config", str(folder / "config.pbtxt"),
         "--timing-cache-dir", str(store / "timing-caches")])
    run([sys.executable, "-m", "tools.engine.validate", "--engine", str(folder / "1" / "model.plan"),
         "--reference", str(folder / "1" / "model.onnx"), "--data", str(data)])


def make_release(store: Path, source_models: Path, data: Path, *, gpu: dict | None, tensorrt: str | None,
                 detector: str, build=build_and_validate, now: dt.datetime | None = None,
                 extra: dict | None = None) -> Path:
    """Stage, build + validate, record provenance, publish; on any failure the staging folder is removed.

    ``gpu=None`` makes a CPU-only release: nothing is built, the release records no engine."""
    now = now or dt.datetime.now(dt.timezone.utc)
    onnx_sha = sha256(source_models / detector / "1" / "model.onnx")
    name = release_name(onnx_sha, gpu["name"] if gpu else "cpu-only", now)
    staging = store / "staging" / name
    try:
        models = stage(source_models, staging)
        engine = models / detector / "1" / "model.plan"
        if gpu:
            build(models, detector, store, data)
            if not engine.is_file():
                raise FileNotFoundError(f"the build left no engine at {engine}")
        elif engine.exists():
            engine.unlink()  # an engine copied from the source was not built or validated here
        write_provenance(staging, {
            "release": name,
            "built_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "detector": detector,
            "source_onnx_sha256": onnx_sha,
            "source_fp16_onnx_sha256": sha256(models / detector / "1" / "model.fp16.onnx"),
            "engine_sha256": sha256(engine) if gpu else None,
            "tensorrt_version": tensorrt,
            "gpu": gpu,
            **(extra or {}),
        })
        return publish(staging, store / "releases")
    except BaseException:
        if staging.exists():
            for path in [staging, *staging.rglob("*")]:
                if path.is_dir() and not path.is_symlink():
                    path.chmod(0o755)
            shutil.rmtree(staging)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=Path("/store"), help="the model store's mount")
    parser.add_argument("--source", type=Path, default=Path("/workspace/models"), help="model repository to release")
    parser.add_argument("--data", type=Path, default=Path("/data/deeppcb"), help="DeepPCB boards for validation")
    parser.add_argument("--cpu-only", action="store_true", help="no engine: a release for the CPU configs only")
    args = parser.parse_args(argv)
    from tools.contract import served_contract

    # Where it was built (the Job passes these through the downward API).
    extra = {key: os.environ[env] for key, env in (("node", "NODE_NAME"), ("pod", "POD_NAME")) if os.environ.get(env)}
    gpu, tensorrt = (None, None) if args.cpu_only else (gpu_facts(), tensorrt_version())
    release = make_release(args.store, args.source, args.data, gpu=gpu, tensorrt=tensorrt,
                           detector=served_contract(models_root=args.source).detector_model, extra=extra)
    print((release / RELEASE_FILE).read_text(), flush=True)
    print(f"published release {release.name}", flush=True)
    if TERMINATION_LOG.exists():  # in a pod: `kubectl get pod` shows the name as the termination message
        TERMINATION_LOG.write_text(release.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
