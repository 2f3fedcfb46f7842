"""pcb_scan with the scan's template: registered onto the whole scan, cut into the scan's tiles, registered again
tile by tile, REGISTRATION per tile."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tools.client.__main__ import main
from tools.client.pipeline_client import NUM_TILES, InferenceFailed, PipelineClient, encoded_images_input
from tools.contract import load_repository, parameter, served_contract
from tools.data.deeppcb import read_split
from tools.data.misregistration import Misregistration
from tools.data.mosaic import write_mosaics
from tools.eval.evaluate import expected_registrations
from tools.pipeline_math import load_model_module, registration, tiling

CONTRACT = served_contract()
SCAN_CONFIG = load_repository()[CONTRACT.scan_model]
TILE_SIZE, OVERLAP = int(parameter(SCAN_CONFIG, "tile_size")), int(parameter(SCAN_CONFIG, "tile_overlap"))
TOLERANCE = int(parameter(SCAN_CONFIG, "template_size_tolerance"))
MIN_SCORE = CONTRACT.registration_parameters["registration_min_score"]
MAX_SHIFT = CONTRACT.registration_parameters["registration_max_shift"]
scan_registration = load_model_module(CONTRACT.scan_model, "scan_registration")
SCAN_SETTINGS = registration.RegistrationSettings.from_parameters(
    {key: parameter(SCAN_CONFIG, key) for key in ("registration_max_shift", "registration_max_angle",
                                                  "registration_min_score", "registration_scale",
                                                  "template_size_tolerance")}, CONTRACT.pad_value)
# A line-scan template's drift: tens of pixels and a degree. On the 1920 x 1280 scan below the turn moves the
# corner tiles' centres by 11 px more, beyond the search range a tile registered on its own has (on a 4096 px
# scan by 30 px, on a 16k panel by 136 px).
SCAN_DRIFT = Misregistration(dx=40.0, dy=-38.0, angle=1.0)


def stitched_scan(boards, columns: int, rows: int, out):
    """One scan of ``columns`` x ``rows`` boards, with the template stitched the same way."""
    list_path, _ = write_mosaics(boards[: columns * rows], columns=columns, rows=rows, out_dir=out, progress=False)
    (scan,) = read_split(out, list_path.name)
    return scan


@pytest.fixture(scope="module")
def scan_pair(synthetic_boards, tmp_path_factory):
    """Two synthetic boards side by side (1280 x 640, three tiles)."""
    return stitched_scan(synthetic_boards, 2, 1, tmp_path_factory.mktemp("scan_pair"))


@pytest.fixture(scope="module")
def wide_scan(synthetic_boards, tmp_path_factory):
    """Six synthetic boards stitched 3 x 2 (1920 x 1280, 12 tiles)."""
    return stitched_scan(synthetic_boards, 3, 2, tmp_path_factory.mktemp("wide_scan"))


def grey(path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)


def png(image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", image)
    return encoded.tobytes()


def bmp(image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".bmp", image)
    return encoded.tobytes()


def test_each_tile_row_says_where_its_window_of_the_template_went(triton_server, scan_pair):
    """The template as stitched lies on the scan (synthetic boards: exactly): each tile's row is within a pixel
    of no move, and all rows are one registration, the scan's, seen from each tile."""
    image = grey(scan_pair.image_path)
    windows = tiling.tile_windows(*image.shape, TILE_SIZE, OVERLAP)
    with PipelineClient(triton_server.grpc_url) as client:
        [alone] = client.infer([scan_pair.image_path.read_bytes()], scans=True)
        [paired] = client.infer([scan_pair.image_path.read_bytes()], scans=True,
                                templates=[scan_pair.template_path.read_bytes()])
    assert alone.registration is None
    assert paired.registration.shape == (len(windows), 4) == (3, 4)
    assert np.abs(paired.registration[:, :2]).max() < 1.0 and np.abs(paired.registration[:, 2]).max() < 0.1
    np.testing.assert_allclose(paired.registration[:, 2], paired.registration[0, 2], atol=1e-4)  # one turn
    assert (paired.registration[:, 3] >= MIN_SCORE).all()
    assert (paired.boxes[:, 2] <= image.shape[1]).all() and (paired.boxes[:, 3] <= image.shape[0]).all()


def test_tile_rows_compose_the_scan_registration_with_each_tile_registration(wide_scan):
    """Offline, the two steps pcb_scan takes: the drifted template onto the whole scan, then a tile's window of
    the registered template onto the tile (preprocess's registration); the composed row is where the drifted
    template's window went."""
    image = grey(wide_scan.image_path)
    drifted = SCAN_DRIFT.apply(grey(wide_scan.template_path), CONTRACT.pad_value)
    registered, scan_map = scan_registration.register_scan_template(image, drifted, SCAN_SETTINGS)
    found = registration.describe_transform(scan_map[:2], image.shape[1], image.shape[0])  # template -> scan
    np.testing.assert_allclose(found, SCAN_DRIFT.expected_registration(image.shape[1], image.shape[0]), atol=1.0)
    for window in tiling.tile_windows(*image.shape, TILE_SIZE, OVERLAP)[::4]:
        _, residual = registration.register_template(image[window.y0 : window.y1, window.x0 : window.x1],
                                                     registered[window.y0 : window.y1, window.x0 : window.x1],
                                                     registration.RegistrationSettings.from_parameters(
                                                         CONTRACT.registration_parameters, CONTRACT.pad_value))
        row = scan_registration.tile_registration(scan_map, residual, window)
        (expected,) = expected_registrations(SCAN_DRIFT, image.shape[1], image.shape[0], [window])
        np.testing.assert_allclose(row[:2], expected[:2], atol=1.0)
        np.testing.assert_allclose(row[2], expected[2], atol=0.05)
        assert row[3] == residual[3]


def test_a_drifted_and_turned_scan_template_registers_every_tile(triton_server, wide_scan):
    """Tens of pixels and a degree, as line scans drift: every tile registered, each row where its window of
    the template went, although far from the centre the drift exceeds what one tile's registration searches."""
    image = grey(wide_scan.image_path)
    windows = tiling.tile_windows(*image.shape, TILE_SIZE, OVERLAP)
    expected = expected_registrations(SCAN_DRIFT, image.shape[1], image.shape[0], windows)
    assert max(np.abs(e[:2]).max() for e in expected) > MAX_SHIFT, "some tile drifts beyond a tile's search range"
    drifted = png(SCAN_DRIFT.apply(grey(wide_scan.template_path), CONTRACT.pad_value))
    with PipelineClient(triton_server.grpc_url) as client:
        [paired] = client.infer([wide_scan.image_path.read_bytes()], scans=True, templates=[drifted])
        [exact] = client.infer([wide_scan.image_path.read_bytes()], scans=True,
                               templates=[wide_scan.template_path.read_bytes()])
    assert paired.registration.shape == (len(windows), 4) == (12, 4)
    for row, want in zip(paired.registration, expected):
        np.testing.assert_allclose(row[:2], want[:2], atol=1.0)
        np.testing.assert_allclose(row[2], want[2], atol=0.05)
        assert row[3] >= MIN_SCORE
    assert np.abs(exact.registration[:, :3]).max() < 1.0, "the template as stitched lies on the scan"


def raw_scan_request(server, scans, templates=None):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        inputs = [encoded_images_input(scans)]
        if templates is not None:
            inputs.append(encoded_images_input(templates, name=CONTRACT.template_input))
        names = [*CONTRACT.output_names, CONTRACT.registration_output, NUM_TILES]
        result = client.infer(CONTRACT.scan_model, inputs, outputs=[grpcclient.InferRequestedOutput(n) for n in names])
        return {name: result.as_numpy(name) for name in names}
    finally:
        client.close()


def test_scans_of_one_request_pad_their_tile_rows_and_without_template_rows_are_zero(triton_server, scan_pair,
                                                                                     synthetic_boards):
    board = synthetic_boards[2]  # one tile
    scans = [scan_pair.image_path.read_bytes(), board.image_path.read_bytes()]
    templates = [scan_pair.template_path.read_bytes(), board.template_path.read_bytes()]
    outputs = raw_scan_request(triton_server, scans, templates)
    assert outputs[NUM_TILES].reshape(-1).tolist() == [3, 1]
    registration = outputs[CONTRACT.registration_output]
    assert registration.shape == (2, 3, 4)
    assert (registration[0, :, 3] >= MIN_SCORE).all() and registration[1, 0, 3] >= MIN_SCORE
    assert not registration[1, 1:].any(), "rows past the scan's tiles are zero"
    with PipelineClient(triton_server.grpc_url) as client:
        first, second = client.infer(scans, scans=True, templates=templates)
    assert first.registration.shape == (3, 4) and second.registration.shape == (1, 4)

    without = raw_scan_request(triton_server, scans)
    assert without[CONTRACT.registration_output].shape == (2, 3, 4)
    assert not without[CONTRACT.registration_output].any(), "no template: all zeros"


def test_a_bad_scan_template_refuses_only_its_scan(triton_server, scan_pair, synthetic_boards, tmp_path):
    image, template = grey(scan_pair.image_path), grey(scan_pair.template_path)
    width = image.shape[1]
    swapped = np.hstack([template[:, width // 2 :], template[:, : width // 2]])  # the boards' templates swapped
    bad = {
        "truncated": (scan_pair.template_path.read_bytes()[:300], "not a JPEG, PNG, BMP or TIFF"),
        "narrow": (png(template[:, : width - TOLERANCE - 8]), "px tolerance apart"),
        "wrong board": (png(swapped), "template does not match the image"),
    }
    paths, templates = [], []
    for name, (data, _) in bad.items():
        path = tmp_path / f"{name}.png"
        path.write_bytes(data)
        paths.append(scan_pair.image_path)
        templates.append(path)
    with PipelineClient(triton_server.grpc_url) as client:
        for (name, (_, reason)), template_path in zip(bad.items(), templates):
            with pytest.raises(InferenceFailed) as failed:
                client.infer_files([scan_pair.image_path, synthetic_boards[2].image_path], progress=False,
                                   scans=True, templates=[template_path, synthetic_boards[2].template_path])
            (message,) = failed.value.failures.values()
            assert message.startswith("TEMPLATE[0]: ") and reason in message, name
            assert failed.value.results[1].registration.shape == (1, 4), "the other scan is answered"


def test_cli_tile_with_template_records_every_tile(triton_server, scan_pair, tmp_path, capsys):
    out = tmp_path / "scan.json"
    code = main([str(scan_pair.image_path), "--tile", "--template", str(scan_pair.template_path),
                 "--url", triton_server.grpc_url, "--json", str(out), "--annotate-dir", str(tmp_path / "annotated")])
    assert code == 0
    (record,) = json.loads(out.read_text())
    assert [r["tile"] for r in record["registrations"]] == [0, 1, 2]
    assert all(r["score"] >= MIN_SCORE and set(r) == {"tile", "dx", "dy", "angle", "score"}
               for r in record["registrations"])
    lowest = min(r["score"] for r in record["registrations"])
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith(scan_pair.image_path.name)]
    assert row.split()[-2:] == ["min", f"{lowest:.3f}"]
    picture = cv2.imread(str(tmp_path / "annotated" / f"{scan_pair.image_path.stem}.png"))
    assert picture.shape[1] > 2 * 1280, "the scan beside its template"
