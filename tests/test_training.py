"""A short training run and the ONNX export, so the training code stays alive (the full recipe is not run in CI)."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tools.contract import served_contract
from tools.data.misregistration import local_warp
from tools.data.splits import DEFAULT_SPLIT, ValidationSplit, check_model_split, recorded_split
from tools.pipeline_math import registration
from tools.train import export as export_onnx
from tools.train import recipe as train_detector
from tools.train.network import PcbDefectDetector, grid_centers

CONTRACT = served_contract()


@pytest.mark.slow  # trains, resumes and exports a detector
def test_short_training_resumes_and_exports(tmp_path, monkeypatch, deeppcb_root):
    args = ["--data", str(deeppcb_root), "--out", str(tmp_path), "--batch", "2", "--steps-per-epoch", "2",
            "--epochs", "3", "--limit", "8", "--crop", "160", "--val-every", "1"]
    draw_batch = train_detector.CropSampler.batch
    calls = iter(range(5))

    def interrupted_in_third_epoch(self, size):
        if next(calls) == 4:
            raise KeyboardInterrupt
        return draw_batch(self, size)

    monkeypatch.setattr(train_detector.CropSampler, "batch", interrupted_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_detector.train(train_detector.parse_args(args))
    monkeypatch.setattr(train_detector.CropSampler, "batch", draw_batch)
    assert torch.load(tmp_path / "last.pt", weights_only=False)["epoch"] == 2
    weights = train_detector.train(train_detector.parse_args(args + ["--resume"]))
    history = torch.load(weights, weights_only=False)["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["val_loss"]) for h in history)
    with pytest.raises(SystemExit, match="started with"):
        train_detector.train(train_detector.parse_args(args + ["--resume", "--split-seed", "1"]))

    onnx_path = tmp_path / "model.onnx"
    export_onnx.main(["--weights", str(weights), "--out", str(onnx_path), "--data", str(deeppcb_root),
                      "--check-images", "2"])
    graph = onnx.load(str(onnx_path))
    assert graph.opset_import[0].version >= 17
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (images,), (output,) = session.get_inputs(), session.get_outputs()
    input_shape = [CONTRACT.channels, CONTRACT.input_height, CONTRACT.input_width]
    assert (images.name, images.shape[1:]) == (CONTRACT.detector_input, input_shape)
    assert isinstance(images.shape[0], str), "batch must be dynamic"
    assert images.type == f"tensor({CONTRACT.pixel_type.name})" == "tensor(uint8)", "grey levels, scaled in the graph"
    result = session.run(None, {images.name: np.zeros((3, *input_shape), CONTRACT.pixel_type)})[0]
    assert result.shape == (3, 4 + CONTRACT.num_classes, (CONTRACT.input_size // 8) ** 2)
    assert output.name == CONTRACT.detector_output
    scores = result[:, 4:]
    assert ((scores >= 0) & (scores <= 1)).all()

    # The training split travels with the model: a tool choosing other "held-out" boards of the same list is refused.
    record = recorded_split(onnx_path)
    assert ValidationSplit.from_record(record) == DEFAULT_SPLIT
    trainval = deeppcb_root / "trainval.txt"
    check_model_split(onnx_path, DEFAULT_SPLIT, trainval)  # passes
    with pytest.raises(ValueError, match="some of the boards chosen now were trained on"):
        check_model_split(onnx_path, ValidationSplit(0.3, 1), trainval)


def test_assignment_prefers_smallest_box_and_centre_region():
    centers = grid_centers(64, 64)  # 8x8 cells of 8 px
    boxes = torch.tensor([[0.0, 0.0, 64.0, 64.0], [16.0, 16.0, 40.0, 40.0]])
    matched = train_detector.assign(centers, boxes)
    cell = lambda x, y: (y // 8) * 8 + (x // 8)  # noqa: E731
    assert matched[cell(28, 28)] == 1  # inside both: the smaller box wins
    assert matched[cell(4, 4)] == -1  # inside the large box but far from its centre
    assert matched[cell(36, 36)] == 1
    assert (train_detector.assign(centers, torch.zeros((0, 4))) == -1).all()


def test_flip_rotate_keeps_boxes_on_the_same_pixels():
    rng = np.random.default_rng(3)
    image = np.zeros((64, 64, 2), np.uint8)  # (H, W, C): the board and its template move together
    image[10:20, 30:50] = 255
    boxes = np.array([[30, 10, 50, 20]], np.float32)
    for _ in range(16):
        out, out_boxes = train_detector.flip_rotate(image, boxes, rng)
        x1, y1, x2, y2 = out_boxes[0].astype(int)
        assert out[y1:y2, x1:x2].min() == 255 and out.sum() == image.sum()


def test_rescale_keeps_boxes_on_the_same_pixels_and_never_goes_below_the_crop():
    rng = np.random.default_rng(4)
    image = np.zeros((64, 64, 2), np.uint8)
    image[16:32, 24:48] = 255
    boxes = np.array([[24, 16, 48, 32]], np.float32)
    factors = set()
    for _ in range(16):
        out, out_boxes = train_detector.rescale(image, boxes, 0.5, 48, rng)
        assert out.ndim == 3 and out.shape[2] == 2 and min(out.shape[:2]) >= 48
        x1, y1, x2, y2 = np.round(out_boxes[0]).astype(int)
        assert out[y1 + 1 : y2 - 1, x1 + 1 : x2 - 1].min() == 255  # the box still covers the scaled square
        assert out[: max(y1 - 1, 0)].max() == 0 and out[:, x2 + 1 :].max() == 0  # and nothing lies outside it
        factors.add(out.shape[0])
    assert len(factors) > 4  # the factor is random
    assert train_detector.rescale(image[:, :, :1], boxes, 0.5, 48, rng)[0].shape[2] == 1
    same, same_boxes = train_detector.rescale(image, boxes, 0.0, 48, rng)
    assert same is image and same_boxes is boxes


def test_exported_boxes_are_centre_size_in_pixels():
    model = PcbDefectDetector(num_classes=CONTRACT.num_classes).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 1, 64, 64))
        distances, _ = model.raw_outputs(torch.rand(1, 1, 64, 64))
    assert out.shape == (1, 4 + CONTRACT.num_classes, 64)
    assert (out[0, 2] > 0).all() and (out[0, 3] > 0).all()
    assert (distances >= 0).all()


def test_template_crops_carry_the_registered_template_or_the_no_template_fill(synthetic_boards):
    """With a 2-channel detector every crop is (board, template): the template drifted and registered again as
    served, so it lies on the board, or for the dropout share the served no-template fill."""
    assert CONTRACT.channels == 2
    sampler = train_detector.CropSampler(synthetic_boards, 160, template_fraction=0.0, seed=1, template_dropout=0.5,
                                         misregister_shift=30, misregister_angle=1)
    images, targets = sampler.batch(24)
    assert images.shape == (24, 2, 160, 160) and len(targets) == 24
    fill = np.float32(CONTRACT.pad_value) / np.float32(255)
    without = [(image[1] == fill).all().item() for image in images]
    assert 3 <= sum(without) <= 21  # about half
    for image, no_template in zip(images, without):
        if not no_template:  # the registered template matches the board up to the defects and the edge band
            assert (image[0] - image[1]).abs().mean() < 0.08
    # The registration undoes the drift: without it the template would lie tens of pixels off.
    sampler.template_dropout = 0.0
    board, template = sampler.images[0], sampler.templates[0]
    registered, labelled = sampler.registered_template(board, template, synthetic_boards[0].boxes)
    inside = (slice(40, -40), slice(40, -40))
    assert np.abs(registered[inside].astype(int) - template[inside]).mean() < 8
    assert labelled.all()  # no defect was made part of the design (designed_defects is 0)


def test_designed_defects_are_copied_into_the_template_and_lose_their_label(synthetic_boards):
    """A defect the template also shows is designed artwork: its pixels match the board's, it has no label;
    the other defects keep their label and still differ from the template."""
    sample = next(s for s in synthetic_boards if len(s.boxes) >= 2)
    sampler = train_detector.CropSampler([sample], 160, template_fraction=0.0, seed=3, designed_defects=0.5)
    board, template = sampler.images[0], sampler.templates[0]
    for _ in range(20):
        registered, labelled = sampler.registered_template(board, template, sample.boxes)
        if labelled.any() and not labelled.all():
            break
    assert labelled.any() and not labelled.all()

    def difference(box):
        x1, y1, x2, y2 = np.round(box).astype(int)
        return np.abs(board[y1:y2, x1:x2].astype(int) - registered[y1:y2, x1:x2]).mean()

    # A designed defect differs from the board only by the registration's sub-pixel resampling of its edges.
    assert max(difference(box) for box in sample.boxes[~labelled]) < 12
    assert min(difference(box) for box in sample.boxes[labelled]) > 15


def test_local_warp_bends_smoothly_by_at_most_its_limit():
    """The template's local stretch: every pixel moves by at most max_shift, neighbours alike (a smooth field),
    and by nothing at a limit of 0."""
    xs = registration.pixel_grid(200, 300)[..., 0].copy()
    rng = np.random.default_rng(5)
    inner = (slice(6, -6), slice(6, -6))  # the border repeats its edge pixels
    shifts = [(local_warp(xs, rng, 4.0) - xs)[inner] for _ in range(5)]  # an image of x: its value moves with it
    assert max(np.abs(shift).max() for shift in shifts) <= 4.0 + 1e-3
    assert max(np.abs(shift).max() for shift in shifts) > 0.5
    assert max(np.abs(np.diff(shift, axis=1)).max() for shift in shifts) < 0.2  # smooth: no tears
    np.testing.assert_array_equal(local_warp(xs, rng, 0.0), xs)


def test_template_warp_bends_the_registered_template(synthetic_boards):
    sample = synthetic_boards[0]
    kwargs = dict(crop=160, template_fraction=0.0, seed=2)
    straight = train_detector.CropSampler([sample], **kwargs)
    bent = train_detector.CropSampler([sample], **kwargs, template_warp=4.0)
    registered = [s.registered_template(s.images[0], s.templates[0], sample.boxes)[0] for s in (straight, bent)]
    difference = np.abs(registered[0].astype(int) - registered[1])
    assert 0 < difference.mean() < 20  # bent, not replaced


def test_training_registers_rigidly_unless_asked_to_bend(synthetic_boards):
    """The shipped detector trained on rigidly registered templates; --bend-templates adds the served bend."""
    sample = synthetic_boards[0]
    assert served_contract().registration_parameters["registration_local_max_shift"] > 0
    rigid = train_detector.CropSampler([sample], crop=160, template_fraction=0.0, seed=2)
    bent = train_detector.CropSampler([sample], crop=160, template_fraction=0.0, seed=2, bend_templates=True)
    assert rigid.settings.local_max_shift == 0
    assert bent.settings.local_max_shift == served_contract().registration_parameters["registration_local_max_shift"]
