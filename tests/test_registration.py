"""The served template registration (models/preprocess/1/registration.py): known drifts are recovered, the
convention of REGISTRATION holds, and templates that are not the board's are refused with their reason."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from tools.data.deeppcb import read_grey, read_split
from tools.data.misregistration import Misregistration, local_warp
from tools.pipeline_math import TemplateRejected, registration, registration_settings

SETTINGS = registration_settings()


@pytest.fixture(scope="module")
def templates(deeppcb_root):
    """Defect-free DeepPCB templates of four board designs (groups)."""
    samples = read_split(deeppcb_root)
    by_group = {}
    for sample in samples:
        by_group.setdefault(sample.image_path.parent.parent.name, sample)
    return [read_grey(sample.template_path) for sample in list(by_group.values())[:4]]


def test_convention_round_trips():
    matrix = registration.rotation_about_centre(640, 480, 12.5, -7.25, 0.8)
    np.testing.assert_allclose(registration.describe_transform(matrix, 640, 480), (12.5, -7.25, 0.8), atol=1e-9)
    # The centre turns in place: only the shift moves it.
    centre = np.array([(640 - 1) / 2, (480 - 1) / 2, 1])
    np.testing.assert_allclose(matrix @ centre, centre[:2] + (12.5, -7.25), atol=1e-9)


@pytest.mark.parametrize("dx,dy", [(0, 0), (30, -30), (-17, 9), (4.5, 22.25), (-29, -3)])
def test_pure_shifts_are_recovered_within_one_pixel(templates, dx, dy):
    """The board is a template itself, so the drift applied is the whole truth (DeepPCB's own pairs are offset
    by a few pixels)."""
    for board in templates:
        drift = Misregistration(dx, dy, 0.0)
        registered, found = registration.register_template(board, drift.apply(board, SETTINGS.fill), SETTINGS)
        expected = drift.expected_registration(board.shape[1], board.shape[0])
        assert abs(found[0] - expected[0]) <= 1 and abs(found[1] - expected[1]) <= 1, (found, expected)
        assert abs(found[2]) < 0.25 and found[3] > 0.9
        assert registered.shape == board.shape and registered.dtype == np.uint8


def test_shift_and_rotation_are_recovered(templates):
    rng = np.random.default_rng(3)
    for board in templates:
        drift = Misregistration.random(rng, 30, 1)
        registered, found = registration.register_template(board, drift.apply(board, SETTINGS.fill), SETTINGS)
        expected = drift.expected_registration(board.shape[1], board.shape[0])
        # Over the whole board (corners included) the registered template lies within 2 px of the board.
        true_map = registration.rotation_about_centre(board.shape[1], board.shape[0], *expected)
        found_map = registration.rotation_about_centre(board.shape[1], board.shape[0], *found[:3])
        corners = np.array([[0, 0, 1], [639, 0, 1], [0, 639, 1], [639, 639, 1]], float).T
        assert np.abs(true_map @ corners - found_map @ corners).max() < 2, (found, expected)
        inside = (slice(40, -40), slice(40, -40))  # the drift leaves the border without template pixels
        assert np.abs(registered[inside].astype(int) - board[inside]).mean() < 6


def test_a_template_of_another_board_is_refused_with_its_score(templates):
    with pytest.raises(TemplateRejected, match="template does not match the image") as refused:
        registration.register_template(templates[0], templates[1], SETTINGS)
    assert refused.value.reason == registration.TEMPLATE_MISMATCH


def test_a_blank_template_is_refused(templates):
    with pytest.raises(TemplateRejected) as refused:
        registration.register_template(templates[0], np.full_like(templates[0], 255), SETTINGS)
    assert refused.value.reason == registration.TEMPLATE_MISMATCH


def test_a_drift_beyond_the_search_range_is_refused(templates):
    drift = Misregistration(SETTINGS.max_shift + 40, 0, 0)
    with pytest.raises(TemplateRejected, match="template does not match the image"):
        registration.register_template(templates[0], drift.apply(templates[0], SETTINGS.fill), SETTINGS)


def test_size_tolerance(templates):
    board = templates[0]
    tolerance = SETTINGS.size_tolerance
    cropped = board[: board.shape[0] - tolerance, :]
    _, found = registration.register_template(board, cropped, SETTINGS)
    assert found[3] > 0.9
    taller = cv2.copyMakeBorder(board, 0, tolerance + 1, 0, 0, cv2.BORDER_REPLICATE)
    with pytest.raises(TemplateRejected, match=f"more than the {tolerance} px tolerance") as refused:
        registration.register_template(board, taller, SETTINGS)
    assert refused.value.reason == registration.BAD_TEMPLATE


def test_a_prealigned_template_is_scored_where_it_lies_not_searched_nor_refused(templates):
    """pcb_scan's tiles: their templates lie on them already (the scan was registered whole)."""
    board, other = templates[0], templates[1]
    prealigned = SETTINGS.for_prealigned()
    registered, found = registration.register_template(board, board, prealigned)
    assert np.abs(registered.astype(int) - board).mean() < 1  # not moved (its bend onto itself is no bend)
    assert found[:3].tolist() == [0, 0, 0] and found[3] > 0.99
    _, moved = registration.register_template(board, Misregistration(6, 0, 0).apply(board, SETTINGS.fill), prealigned)
    assert moved[:3].tolist() == [0, 0, 0] and moved[3] < found[3], "scored where it lies: a moved one scores less"
    # A tile of blank margin, or of another board, is reported with its score, not refused: the scan passed.
    blank = np.full_like(board, 255)
    assert registration.register_template(blank, blank, prealigned)[1].tolist() == [0, 0, 0, 0]
    assert registration.register_template(board, other, prealigned)[1][3] < SETTINGS.min_score
    # The border fill (where a drifted template had no pixels) does not count against the score.
    band = board.copy()
    band[:, -60:] = round(SETTINGS.fill)
    assert registration.register_template(board, band, prealigned)[1][3] == pytest.approx(found[3], abs=0.01)


def xor_pixels(a: np.ndarray, b: np.ndarray, region=(slice(8, -8), slice(8, -8))) -> int:
    """Pixels where two binarised boards disagree, inside a margin (where a bend repeats its edge pixels)."""
    return int(np.count_nonzero((a[region] > 127) != (b[region] > 127)))


def test_local_stretch_is_bent_away_and_a_defect_is_not(templates):
    """A template stretched locally by up to 3 px disagrees with its board along every trace edge; bent onto the
    board it agrees again, except where the board has a defect the template lacks (it stays to be found)."""
    rng = np.random.default_rng(11)
    assert SETTINGS.local_max_shift >= 3
    stretched_boards = 0
    for board in templates:
        stretched = local_warp(board, rng, 3.0)  # a random share of 3 px: some hardly move
        inspected = board.copy()
        inspected[300:312, 300:312] = 255 - inspected[300:312, 300:312]  # a 12 px defect: copper flipped
        bent = registration.bend_onto(inspected, stretched, SETTINGS.local_max_shift)
        defect = (slice(300, 312), slice(300, 312))
        assert xor_pixels(inspected, bent, defect) >= 0.8 * 144  # the defect still differs from the template
        outside = inspected.copy()
        outside[defect], bent[defect] = 0, 0
        if xor_pixels(board, stretched) > 200:
            stretched_boards += 1
            assert xor_pixels(outside, bent) < 0.4 * xor_pixels(board, stretched)  # the stretch is taken up
    assert stretched_boards >= 2


def test_a_bend_never_moves_a_pixel_beyond_its_limit(templates):
    board = templates[0]
    stretched = local_warp(board, np.random.default_rng(2), 8.0)  # more than the limit can take up
    ys, xs = np.mgrid[0 : board.shape[0], 0 : board.shape[1]].astype(np.float32)
    for limit in (1.0, 3.0):
        field = registration.bend_field(board, stretched, limit)
        displacement = field - np.dstack([xs, ys])
        assert np.abs(displacement).max() <= limit + 1e-3 and np.abs(displacement).max() > 0.5 * limit
    assert registration.bend_onto(board, stretched, 0.0) is stretched  # 0: rigid only
