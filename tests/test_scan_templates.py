"""pcb_scan with the scan's template: cut into the scan's tiles, registered tile by tile, REGISTRATION per tile."""
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
from tools.data.mosaic import write_mosaics
from tools.pipeline_math import preprocess_as_served, tiling

CONTRACT = served_contract()
SCAN_CONFIG = load_repository()[CONTRACT.scan_model]
TILE_SIZE, OVERLAP = int(parameter(SCAN_CONFIG, "tile_size")), int(parameter(SCAN_CONFIG, "tile_overlap"))
TOLERANCE = int(parameter(SCAN_CONFIG, "template_size_tolerance"))
MIN_SCORE = CONTRACT.registration_parameters["registration_min_score"]


@pytest.fixture(scope="module")
def scan_pair(synthetic_boards, tmp_path_factory):
    """Two synthetic boards side by side (1280 x 640, three tiles), with the template stitched the same way."""
    out = tmp_path_factory.mktemp("scan_pair")
    list_path, _ = write_mosaics(synthetic_boards[:2], columns=2, rows=1, out_dir=out, progress=False)
    (scan,) = read_split(out, list_path.name)
    return scan


def grey(path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)


def png(image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", image)
    return encoded.tobytes()


def bmp(image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".bmp", image)
    return encoded.tobytes()


def test_each_tile_is_registered_against_the_same_window_of_the_template(triton_server, scan_pair):
    image, template = grey(scan_pair.image_path), grey(scan_pair.template_path)
    windows = tiling.tile_windows(*image.shape, TILE_SIZE, OVERLAP)
    with PipelineClient(triton_server.grpc_url) as client:
        [alone] = client.infer([scan_pair.image_path.read_bytes()], scans=True)
        [paired] = client.infer([scan_pair.image_path.read_bytes()], scans=True,
                                templates=[scan_pair.template_path.read_bytes()])
    assert alone.registration is None
    assert paired.registration.shape == (len(windows), 4) == (3, 4)
    for row, w in zip(paired.registration, windows):  # in tile order, each what the pipeline finds for its tile
        _, _, expected = preprocess_as_served(bmp(image[w.y0 : w.y1, w.x0 : w.x1]),
                                              bmp(template[w.y0 : w.y1, w.x0 : w.x1]))
        np.testing.assert_allclose(row, expected, atol=1e-3)
        assert row[3] >= MIN_SCORE
    assert (paired.boxes[:, 2] <= image.shape[1]).all() and (paired.boxes[:, 3] <= image.shape[0]).all()


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
        "wrong board": (png(swapped), "tile 0 (x 0-640, y 0-640): template does not match the image: score"),
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
