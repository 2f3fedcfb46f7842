"""Train the PCB defect detector on a DeepPCB-format folder (CPU, PyTorch).

    python -m tools.train --data ../shared/datasets/deeppcb --out runs/detector
    python -m tools.train --out runs/detector --resume      # continue after an interruption

(the command line is ``tools/train/__main__.py``).

Recipe: random square crops of the 640x640 boards (the network is fully convolutional and is served on the
whole board), flips and 90-degree rotations (board artwork is Manhattan/45-degree, so these preserve labels),
with ``--scale-jitter`` a random rescale of board and template together first (designs differ in feature size),
defect-free template crops as extra negatives, AdamW with a one-cycle schedule, an EMA of the weights,
FCOS-style centre sampling on the stride-8 grid, a GIoU box loss and an IoU-aware focal class loss (the class
score learns the box quality, which ranks detections well for AP and for NMS).

A detector whose input has 2 channels (the served config says) sees the board and its registered template:
each template is first moved off the board by a random shift and rotation (``--misregister-shift``,
``--misregister-angle``: line-scan drift) and brought back by the served registration's rigid map, so the
detector learns its residual error; ``--template-warp PX --bend-templates`` also bends each template by up to
PX before and onto the board after (the served registration's local bend), which the shipped detector was not
trained with (the model card says why); ``--template-dropout`` of the samples get the served "no template" fill
instead, so requests without a template keep working. And ``--designed-defects`` of the labelled defects
of a sample that keeps its template are copied into the template too and lose their label: a defect-shaped
feature that the template also has is designed artwork, which teaches the detector to report differences from
the template rather than shapes it has learnt (the false alarms on board designs it never saw).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import random
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from tools.arguments import add_data_arguments, validation_split
from tools.contract import served_contract
from tools.data.deeppcb import CLASS_NAMES, Sample, read_grey, read_split
from tools.data.misregistration import Misregistration, local_warp
from tools.data.splits import sample_group, split_record
from tools.pipeline_math import TemplateRejected, image_ops, registration, registration_settings
from tools.train.network import STRIDE, PcbDefectDetector, distances_to_xyxy, grid_centers

CENTER_RADIUS = 2.5 * STRIDE  # anchors within this distance of a box centre (and inside the box) are positives
MIN_VISIBLE_FRACTION = 0.5  # a box cut by a crop is kept when at least this much of it stays inside


def random_crop(image: np.ndarray, boxes: np.ndarray, classes: np.ndarray, size: int, rng: np.random.Generator):
    height, width = image.shape[:2]
    y0 = int(rng.integers(0, height - size + 1))
    x0 = int(rng.integers(0, width - size + 1))
    crop = image[y0 : y0 + size, x0 : x0 + size]
    shifted = boxes - np.array([x0, y0, x0, y0], dtype=np.float32)
    clipped = np.clip(shifted, 0, size)
    area = lambda b: (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)  # noqa: E731
    keep = area(clipped) >= MIN_VISIBLE_FRACTION * area(shifted)
    return crop, clipped[keep], classes[keep]


def rescale(image: np.ndarray, boxes: np.ndarray, jitter: float, min_size: int, rng: np.random.Generator):
    """The (H, W, C) image and its boxes scaled by a random factor in [1/(1+jitter), 1+jitter] (log-uniform), never
    below ``min_size`` pixels a side: board designs differ in feature size (trace widths, pads), so a detector
    that has seen its designs at other scales generalises to new ones."""
    if jitter <= 0:
        return image, boxes
    height, width = image.shape[:2]
    factor = max(float(np.exp(rng.uniform(-np.log1p(jitter), np.log1p(jitter)))), min_size / min(height, width))
    size = (round(width * factor), round(height * factor))  # the factor keeps both sides >= min_size
    scaled = cv2.resize(image, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
    scaled = scaled.reshape(size[1], size[0], image.shape[2])  # cv2 drops a single channel axis
    scale = np.array([size[0] / width, size[1] / height] * 2, np.float32)
    return scaled, boxes * scale


def flip_rotate(image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator):
    """Random horizontal/vertical flip and 90-degree rotation of a square (H, W, C) image and its boxes."""
    size = image.shape[0]
    boxes = boxes.copy()
    if rng.random() < 0.5:
        image = image[:, ::-1]
        boxes[:, [0, 2]] = size - boxes[:, [2, 0]]
    if rng.random() < 0.5:
        image = image[::-1, :]
        boxes[:, [1, 3]] = size - boxes[:, [3, 1]]
    if rng.random() < 0.5:  # transpose = rotation by 90 degrees combined with the flips above
        image = image.transpose(1, 0, 2)
        boxes = boxes[:, [1, 0, 3, 2]]
    return np.ascontiguousarray(image), boxes


def round_robin_by_group(samples: list[Sample]) -> list[Sample]:
    """The samples reordered: the first of each group (board design), then the second of each, and so on."""
    groups: dict[str, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(sample_group(sample), []).append(sample)
    rounds = itertools.zip_longest(*groups.values())
    return [sample for round_ in rounds for sample in round_ if sample is not None]


def detector_pixels(image: np.ndarray, template: np.ndarray | None) -> np.ndarray:
    """(H, W, C) pixels in the served detector's channel layout: the grey board, then (for a 2-channel
    detector) its registered template or the served "no template" fill."""
    if served_contract().channels != image_ops.TEMPLATE_CHANNELS:
        return image[:, :, None]
    if template is None:
        template = np.full_like(image, round(served_contract().pad_value))
    return np.dstack([image, template])


def with_designed_defects(image: np.ndarray, template: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """The template with the image's pixels inside ``boxes`` (x1 y1 x2 y2, widened to whole pixels) copied in."""
    designed = template.copy()
    height, width = image.shape[:2]
    for x1, y1, x2, y2 in boxes:
        rows = slice(max(int(np.floor(y1)), 0), min(int(np.ceil(y2)), height))
        cols = slice(max(int(np.floor(x1)), 0), min(int(np.ceil(x2)), width))
        designed[rows, cols] = image[rows, cols]
    return designed


def to_tensor(pixels: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(pixels).transpose(0, 3, 1, 2).astype(np.float32) / 255.0)


class CropSampler:
    """Draws augmented training crops; a fraction of them are defect-free templates (pure negatives). For a
    2-channel detector each crop carries its template, misregistered and registered again as served, or (a
    ``template_dropout`` share) the no-template fill."""

    def __init__(self, samples: list[Sample], crop: int, template_fraction: float, seed: int,
                 template_dropout: float = 0.0, misregister_shift: float = 0.0, misregister_angle: float = 0.0,
                 designed_defects: float = 0.0, template_warp: float = 0.0, bend_templates: bool = False,
                 scale_jitter: float = 0.0):
        self.samples = samples
        self.images = [read_grey(s.image_path) for s in tqdm(samples, desc="loading boards", leave=False)]
        self.templates = [read_grey(s.template_path) if s.template_path.exists() else None for s in samples]
        self.crop = crop
        self.template_fraction = template_fraction
        self.template_dropout = template_dropout
        self.misregister_shift, self.misregister_angle = misregister_shift, misregister_angle
        self.designed_defects = designed_defects
        self.template_warp = template_warp
        self.scale_jitter = scale_jitter
        # The served registration; its local bend only with bend_templates.
        served = registration_settings()
        self.settings = served if bend_templates else dataclasses.replace(served, local_max_shift=0.0)
        self.rng = np.random.default_rng(seed)

    def registered_template(self, image: np.ndarray, template: np.ndarray | None,
                            boxes: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """(template, which boxes keep their label). The template after a random drift and the served
        registration, with a ``designed_defects`` share of the boxes copied in from the image (those lose their
        label) and a smooth local warp of up to ``template_warp`` pixels; None (no template, every label kept)
        for a ``template_dropout`` share, when there is none, or when the registration refuses it."""
        every_label = np.ones(len(boxes), dtype=bool)
        if template is None or served_contract().channels != image_ops.TEMPLATE_CHANNELS:
            return None, every_label
        if self.rng.random() < self.template_dropout:
            return None, every_label
        designed = self.rng.random(len(boxes)) < self.designed_defects
        if designed.any():
            template = with_designed_defects(image, template, boxes[designed])
        drift = Misregistration.random(self.rng, self.misregister_shift, self.misregister_angle)
        moved = drift.apply(template, self.settings.fill)
        if self.template_warp > 0:
            moved = local_warp(moved, self.rng, self.template_warp)
        try:
            registered = registration.register_template(image, moved, self.settings)
        except TemplateRejected:
            return None, every_label
        return registered[0], ~designed

    def batch(self, size: int):
        images, targets = [], []
        for _ in range(size):
            i = int(self.rng.integers(len(self.samples)))
            sample, image, template = self.samples[i], self.images[i], self.templates[i]
            boxes, classes = sample.boxes, sample.classes
            if template is not None and self.rng.random() < self.template_fraction:
                image, boxes, classes = template, boxes[:0], classes[:0]
            registered, labelled = self.registered_template(image, template, boxes)
            pixels = detector_pixels(image, registered)
            boxes, classes = boxes[labelled], classes[labelled]
            pixels, boxes = rescale(pixels, boxes, self.scale_jitter, self.crop, self.rng)
            crop, boxes, classes = random_crop(pixels, boxes, classes, self.crop, self.rng)
            crop, boxes = flip_rotate(crop, boxes, self.rng)
            images.append(crop)
            targets.append((torch.from_numpy(boxes), torch.from_numpy(classes)))
        return to_tensor(images), targets


def assign(centers: torch.Tensor, boxes: torch.Tensor):
    """For each anchor centre, the index of the ground-truth box it learns (-1 for background).

    Positives lie inside a box and within CENTER_RADIUS of its centre; ties go to the smallest box.
    """
    if len(boxes) == 0:
        return torch.full((len(centers),), -1, dtype=torch.long)
    x, y = centers[:, :1], centers[:, 1:]
    inside = (x > boxes[:, 0]) & (x < boxes[:, 2]) & (y > boxes[:, 1]) & (y < boxes[:, 3])
    box_cx, box_cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    near = ((x - box_cx).abs() < CENTER_RADIUS) & ((y - box_cy).abs() < CENTER_RADIUS)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    cost = torch.where(inside & near, area, torch.full_like(area, float("inf")).expand_as(inside))
    best_cost, best = cost.min(dim=1)
    return torch.where(torch.isfinite(best_cost), best, torch.full_like(best, -1))


def iou_and_giou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise IoU and generalised IoU of two [n,4] xyxy box sets."""
    lt, rb = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    union = (a[:, 2:] - a[:, :2]).prod(1) + (b[:, 2:] - b[:, :2]).prod(1) - inter
    iou = inter / union.clamp(min=1e-6)
    hull = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).prod(1)
    return iou, iou - (hull - union) / hull.clamp(min=1e-6)


def detection_loss(distances, logits, targets, centers, box_weight: float = 2.0):
    """IoU-aware focal class loss (quality focal loss) + GIoU box loss, normalised by the positives."""
    class_targets = torch.zeros_like(logits)
    box_losses, num_positive = [], 0
    for b, (gt_boxes, gt_classes) in enumerate(targets):
        matched = assign(centers, gt_boxes)
        positive = matched >= 0
        if not positive.any():
            continue
        predicted = distances_to_xyxy(centers[positive], distances[b, positive])
        target_boxes = gt_boxes[matched[positive]]
        iou, giou = iou_and_giou(predicted, target_boxes)
        box_losses.append((1 - giou).sum())
        class_targets[b, positive.nonzero()[:, 0], gt_classes[matched[positive]]] = iou.detach().clamp(min=0.01)
        num_positive += int(positive.sum())
    probabilities = logits.sigmoid()
    focal_weight = (class_targets - probabilities).abs().pow(2)
    class_loss = (F.binary_cross_entropy_with_logits(logits, class_targets, reduction="none") * focal_weight).sum()
    normaliser = max(num_positive, 1)
    box_loss = torch.stack(box_losses).sum() if box_losses else distances.sum() * 0
    return (class_loss + box_weight * box_loss) / normaliser, class_loss.item() / normaliser, box_loss.item() / normaliser


@torch.no_grad()
def validation_loss(model, samples: list[Sample], batch: int = 8) -> float:
    """Mean loss over whole boards (all of one size, as in DeepPCB)."""
    model.eval()
    total = 0.0
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        images = to_tensor([detector_pixels(read_grey(s.image_path), read_grey(s.template_path) if s.template_path.exists()
                                             else None) for s in chunk])
        centers = grid_centers(*images.shape[2:])
        targets = [(torch.from_numpy(s.boxes), torch.from_numpy(s.classes)) for s in chunk]
        distances, logits = model.raw_outputs(images)
        total += detection_loss(distances, logits, targets, centers)[0].item() * len(chunk)
    return total / max(len(samples), 1)


def ramped_ema(decay: float, ramp_steps: float = 300.0):
    """EMA update whose decay ramps up from 0, so the average is not dragged towards the random initial weights."""

    def update(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        d = decay * (1 - torch.exp(-num_averaged.float() / ramp_steps))
        return d * averaged + (1 - d) * current

    return update


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: an interrupted save never corrupts the last good checkpoint


def train(args: argparse.Namespace) -> Path:
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = read_split(Path(args.data), args.list)
    if args.limit:  # taken from the groups in turn, so every group (a held-out one too) keeps boards
        samples = round_robin_by_group(samples)[: args.limit]
    split = validation_split(args)
    train_samples, val_samples = split.divide(samples)
    # The split, and the list it divided, travel with the weights: tools that must not see training boards check it.
    split_json = split_record(split, Path(args.data) / args.list)
    sampler = CropSampler(train_samples, args.crop, args.template_fraction, args.seed, args.template_dropout,
                          args.misregister_shift, args.misregister_angle, args.designed_defects,
                          args.template_warp, args.bend_templates, args.scale_jitter)

    model = PcbDefectDetector(num_classes=len(CLASS_NAMES), in_channels=served_contract().channels)
    ema = AveragedModel(model, avg_fn=ramped_ema(args.ema_decay), use_buffers=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    total_steps = args.epochs * args.steps_per_epoch
    warmup = min(0.5, max(0.1, 2.0 / total_steps))  # OneCycleLR needs at least two warm-up steps
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total_steps, pct_start=warmup)
    start_epoch, history = 0, []
    checkpoint_path = out / "last.pt"
    if args.resume and checkpoint_path.exists():
        state = torch.load(checkpoint_path, weights_only=False)
        planned = {k: state["args"][k] for k in ("epochs", "steps_per_epoch")}
        if planned != {"epochs": args.epochs, "steps_per_epoch": args.steps_per_epoch}:
            raise SystemExit(f"--resume continues the run as planned: pass the same {planned}")
        if state.get("validation_split", split_json) != split_json:
            raise SystemExit(f"--resume continues the run as planned: it was started with {state['validation_split']}")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.rng.bit_generator.state = state["sampler_rng"]
        torch.set_rng_state(state["torch_rng"])
        start_epoch, history = state["epoch"], state["history"]
        print(f"resumed from {checkpoint_path} at epoch {start_epoch}")

    centers = grid_centers(args.crop, args.crop)
    for epoch in range(start_epoch, args.epochs):
        model.train()
        progress = tqdm(range(args.steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}")
        running = []
        for _ in progress:
            images, targets = sampler.batch(args.batch)
            distances, logits = model.raw_outputs(images)
            loss, class_loss, box_loss = detection_loss(distances, logits, targets, centers)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            scheduler.step()
            ema.update_parameters(model)
            running.append(loss.item())
            progress.set_postfix(loss=f"{np.mean(running[-20:]):.3f}", cls=f"{class_loss:.3f}", box=f"{box_loss:.3f}")
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(running))}
        if val_samples and ((epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs):
            record["val_loss"] = validation_loss(ema.module, val_samples)
        history.append(record)
        print(json.dumps(record))
        save_checkpoint(
            checkpoint_path,
            {
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "sampler_rng": sampler.rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
                "epoch": epoch + 1,
                "history": history,
                "args": vars(args),
                "validation_split": split_json,
            },
        )
    weights_path = out / "detector.pt"
    torch.save({"weights": ema.module.state_dict(), "history": history, "args": vars(args),
                "validation_split": split_json}, weights_path)
    print(f"wrote {weights_path}")
    return weights_path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser, default_list="trainval.txt", default_part=None)
    parser.add_argument("--out", default="runs/detector", help="checkpoints and final weights go here")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--steps-per-epoch", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crop", type=int, default=320, help="square training crop, a multiple of 32")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--ema-decay", type=float, default=0.998)
    parser.add_argument("--template-fraction", type=float, default=0.1, help="share of crops taken from templates")
    parser.add_argument("--template-dropout", type=float, default=0.5,
                        help="share of samples a 2-channel detector sees without their template")
    parser.add_argument("--misregister-shift", type=float, default=30.0,
                        help="templates drift by up to this many pixels before registration")
    parser.add_argument("--misregister-angle", type=float, default=1.0,
                        help="and turn by up to this many degrees")
    parser.add_argument("--template-warp", type=float, default=0.0,
                        help="templates also bend smoothly by up to this many pixels before registration (stretch)")
    parser.add_argument("--bend-templates", action="store_true",
                        help="register with the served local bend too (registration_local_max_shift)")
    parser.add_argument("--designed-defects", type=float, default=0.25,
                        help="share of the defects copied into their (kept) template, unlabelled: designed artwork")
    parser.add_argument("--scale-jitter", type=float, default=0.0,
                        help="boards (and templates) scaled by a random factor up to 1+J either way before cropping")
    parser.add_argument("--val-every", type=int, default=6, help="epochs between validation losses")
    parser.add_argument("--seed", type=int, default=0, help="seeds the crops, augmentation and initial weights")
    parser.add_argument("--limit", type=int, default=0, help="use only N samples, taken from each group in turn (smoke runs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    args = parser.parse_args(argv)
    if args.crop % 32:
        parser.error("--crop must be a multiple of 32")
    if args.epochs * args.steps_per_epoch < 3:
        parser.error("train for at least 3 steps in all")
    return args
