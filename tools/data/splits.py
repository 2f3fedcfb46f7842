"""The train/validation split of a DeepPCB-format list: one named object, recorded with every model.

``DEFAULT_SPLIT`` is the split the recipe is validated with (three whole groups held out). The shipped detector
is the same recipe trained on every board of trainval (``ALL_BOARDS``); the held-out-groups run that validated
it is kept in ``HELD_OUT_GROUPS_DETECTOR``. Training writes the split it used, with a digest of the list it
divided, into its checkpoint; export copies that into the ONNX metadata (``validation_split``); evaluate
``--split val`` refuses a split other than the one the served model was trained with on the same list, and a
model that held no board of it out.
"""
from __future__ import annotations

import hashlib
import json
import random
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from tools.contract import REPO_ROOT
from tools.data.deeppcb import DEFAULT_ROOT, Sample, read_split

METADATA_KEY = "validation_split"
PARTS = ("train", "val", "all")


@dataclass(frozen=True)
class ValidationSplit:
    """``fraction`` of the boards, drawn with ``seed``, are held out for validation; or, with ``groups``,
    whole DeepPCB groups (board designs), which measures accuracy on designs never seen in training."""

    fraction: float = 0.15
    seed: int = 0
    groups: tuple[str, ...] = ()

    @property
    def holds_out(self) -> bool:
        """False for a model trained on every board of its list (no validation boards)."""
        return bool(self.groups) or self.fraction > 0

    def __post_init__(self):
        if not 0 <= self.fraction < 1:
            raise ValueError(f"validation fraction {self.fraction} must be in [0, 1)")
        object.__setattr__(self, "groups", tuple(sorted(self.groups)))

    def divide(self, samples: list[Sample]) -> tuple[list[Sample], list[Sample]]:
        """(train, validation); both keep file order."""
        if self.groups:
            val_ids = {i for i, s in enumerate(samples) if sample_group(s) in self.groups}
            missing = set(self.groups) - {sample_group(s) for s in samples}
            if missing:
                raise ValueError(f"no boards of the held-out groups {sorted(missing)}")
        else:
            order = list(range(len(samples)))
            random.Random(self.seed).shuffle(order)
            val_ids = set(order[: int(round(len(samples) * self.fraction))])
        train = [s for i, s in enumerate(samples) if i not in val_ids]
        val = [s for i, s in enumerate(samples) if i in val_ids]
        return train, val

    @classmethod
    def from_record(cls, record: dict) -> "ValidationSplit":
        """The split of a ``split_record`` (records written before groups existed have none)."""
        return cls(record["fraction"], record["seed"], tuple(record.get("groups", ())))

    def part(self, samples: list[Sample], part: str) -> list[Sample]:
        """The ``part`` ("train", "val" or "all") of ``samples``."""
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        if part == "all":
            return samples
        train, val = self.divide(samples)
        return val if part == "val" else train


# Three of the seven trainval groups (board designs), 200 of the 1,000 boards: the official test split's boards
# are mostly of designs trainval lacks, so the validation boards must be of designs the detector never saw.
HELD_OUT_GROUPS = ("group44000", "group50600", "group77000")
DEFAULT_SPLIT = ValidationSplit(groups=HELD_OUT_GROUPS)
ALL_BOARDS = ValidationSplit(fraction=0.0)
# The recipe trained with DEFAULT_SPLIT (its ONNX files): what the held-out-groups figures are of.
HELD_OUT_GROUPS_DETECTOR = REPO_ROOT / "validation" / "heldout_groups"


def sample_group(sample: Sample) -> str:
    """The DeepPCB group (one board design) of a sample: ``groupNNNNN`` in ``groupNNNNN/NNNNN/ID_test.jpg``."""
    return sample.image_path.parent.parent.name


def select_samples(data: Path, list_file: str, part: str, split: ValidationSplit = DEFAULT_SPLIT) -> list[Sample]:
    """The boards of ``data/list_file``: all of them, or the train/val part of ``split``."""
    return split.part(read_split(data, list_file), part)


def held_out_boards(root: Path = DEFAULT_ROOT, split: ValidationSplit = DEFAULT_SPLIT) -> list[Path]:
    """Inspected-board images (not templates) of the validation side of ``root``'s trainval, in file order."""
    return [sample.image_path for sample in select_samples(root, "trainval.txt", "val", split)]


def list_digest(list_path: Path) -> str:
    """SHA-256 of a list file: which boards a model was trained on, without their paths."""
    return hashlib.sha256(Path(list_path).read_bytes()).hexdigest()


def split_record(split: ValidationSplit, list_path: Path) -> str:
    """What a checkpoint and the exported model record: the split, and the list it divided."""
    return json.dumps({**asdict(split), "list_sha256": list_digest(list_path)}, sort_keys=True)


def recorded_split(onnx_path: Path) -> dict | None:
    """The split record an exported detector carries in its metadata; None for a model that has none."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    recorded = {prop.key: prop.value for prop in model.metadata_props}
    return json.loads(recorded[METADATA_KEY]) if METADATA_KEY in recorded else None


def check_model_split(onnx_path: Path, split: ValidationSplit, list_path: Path) -> None:
    """Raise ValueError when the detector at ``onnx_path`` was trained on ``list_path`` with a split other than
    ``split``: the validation boards chosen now would include boards it learnt. Warns when the model records
    no split (a model trained elsewhere); passes when the model was trained on another list, since none of
    these boards are then its training boards."""
    record = recorded_split(onnx_path)
    if record is None:
        warnings.warn(f"{onnx_path} records no {METADATA_KEY}; cannot check that these boards were held out",
                      stacklevel=2)
        return
    if record["list_sha256"] != list_digest(list_path):
        return
    trained = ValidationSplit.from_record(record)
    if not trained.holds_out:
        raise ValueError(f"{onnx_path} was trained on every board of {list_path}: none is held out to validate it "
                         f"on. Evaluate it on boards of another list (DeepPCB's test.txt), or evaluate the recipe's "
                         f"held-out-groups detector instead (tools.eval --detector "
                         f"{HELD_OUT_GROUPS_DETECTOR.relative_to(REPO_ROOT)})")
    if trained != split:
        raise ValueError(f"{onnx_path} was trained on {list_path} with {trained}, not {split}: some of the boards "
                         f"chosen now were trained on; choose the boards with {split_flags(trained)}")


def agreement_boards(onnx_path: Path, root: Path = DEFAULT_ROOT) -> list[Path]:
    """Boards of ``root``'s trainval to calibrate and check a conversion of the detector at ``onnx_path`` on (FP16,
    INT8, a TensorRT engine, the export), in file order: the validation boards of the split it was trained with,
    boards it never saw. A detector trained on every board (the shipped one) has none left unseen; checking that
    two graphs agree needs boards like the served ones, not unseen ones, so it gets ``DEFAULT_SPLIT``'s, and is
    told so. So does, unannounced, a detector that records no split or was trained on another list."""
    list_path = Path(root) / "trainval.txt"
    record = recorded_split(onnx_path)
    split = DEFAULT_SPLIT
    if record is not None and record["list_sha256"] == list_digest(list_path):
        split = ValidationSplit.from_record(record)
    if not split.holds_out:
        print(f"{onnx_path} was trained on every board of {list_path}: its calibration and check boards are boards "
              "it learnt (as good as any for agreement between graphs; no measure of accuracy)", flush=True)
        split = DEFAULT_SPLIT
    return held_out_boards(root, split)


def split_flags(split: ValidationSplit) -> str:
    """The command-line flags that select ``split``."""
    if split.groups:
        return "--val-groups " + " ".join(split.groups)
    return f"--val-groups --val-fraction {split.fraction} --split-seed {split.seed}"  # no groups: a random draw
