"""Golden-template inspection from the client side: the library, the CLI (--template, --templates), the JSON,
the table and the side-by-side pictures, against the live pipeline and on hand-made cases."""
from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from tools.client.__main__ import main
from tools.client.annotate import side_by_side
from tools.client.pipeline_client import InferenceFailed, PipelineClient
from tools.client.results import detections_record, detections_table, write_annotated
from tools.contract import served_contract
from tools.data.misregistration import Misregistration
from tools.detections import Detections
from tools.pipeline_math import preprocess_as_served

CONTRACT = served_contract()
LABELS = CONTRACT.labels
MIN_SCORE = CONTRACT.registration_parameters["registration_min_score"]


def found(registration=None) -> Detections:
    return Detections.of([[10, 20, 50, 60]], [0.9], [1], registration)


# ---- no server --------------------------------------------------------------------------------------------


def test_registration_travels_with_the_detections_through_selection():
    detections = Detections.of([[0, 0, 1, 1], [1, 1, 2, 2]], [0.4, 0.9], [0, 1], [1.5, -2.0, 0.25, 0.97])
    assert detections.ranked().above(0.5).registration.tolist() == pytest.approx([1.5, -2.0, 0.25, 0.97])
    assert found().registration is None


def test_record_and_table_show_the_registration(tmp_path):
    record = detections_record(tmp_path / "a.jpg", found([1.234, -2.0, 0.1234, 0.96789]), LABELS)
    assert record["registration"] == {"dx": 1.23, "dy": -2.0, "angle": 0.123, "score": 0.9679}
    scan = detections_record(tmp_path / "s.png", found([[1, 2, 0.1, 0.9], [3, 4, 0.2, 0.8]]), LABELS)
    assert [r["tile"] for r in scan["registrations"]] == [0, 1] and scan["registrations"][1]["score"] == 0.8
    assert "registration" not in detections_record(tmp_path / "b.jpg", found(), LABELS)

    paths = [tmp_path / n for n in ("a.jpg", "b.jpg", "s.png")]
    results = [found([1, 2, 0.1, 0.961]), found(), found([[1, 2, 0.1, 0.9], [3, 4, 0.2, 0.8]])]
    rows = detections_table(paths, results, LABELS, templates=True).splitlines()
    assert rows[0].split()[-1] == "template"
    assert rows[2].split()[-1] == "0.961" and rows[3].split()[-1] == "none" and rows[4].split()[-2:] == ["min", "0.800"]
    assert detections_table(paths, results, LABELS).splitlines()[0].split()[-1] == LABELS[-1], "no column without"


def test_side_by_side_shows_the_template_registered_onto_the_image():
    image = np.full((200, 300), 255, np.uint8)
    template = image.copy()
    template[50:60, 100:110] = 0  # a black square, moved right 7 px and down 3 px by the registration: 107-116, 53-62
    picture = side_by_side(image, template, found([7, 3, 0, 0.9]), LABELS, fill=114)
    bar = picture.shape[0] - 200
    gap = picture.shape[1] - 600
    assert bar > 0 and gap > 0
    right = picture[bar:, 300 + gap :]
    assert right.shape == (200, 300, 3)
    assert (right[55, 108] == 0).all() and (right[61, 115] == 0).all()
    assert (right[55, 104] == 255).all() and (right[51, 110] == 255).all()
    assert (right[1, 1] == 114).all(), "where the moved template has no pixels: the fill"


# ---- live -------------------------------------------------------------------------------------------------


def pair(sample) -> tuple[bytes, bytes]:
    return sample.image_path.read_bytes(), sample.template_path.read_bytes()


def test_infer_returns_the_served_registration(triton_server, synthetic_boards):
    image, template = pair(synthetic_boards[0])
    with PipelineClient(triton_server.grpc_url) as client:
        [alone] = client.infer([image])
        [paired] = client.infer([image], templates=[template])
        with pytest.raises(ValueError, match="for each of its images or for none"):
            client.infer([image, image], templates=[template, None])
    assert alone.registration is None
    _, _, expected = preprocess_as_served(image, template)  # what the CPU preprocess computes
    np.testing.assert_allclose(paired.registration, expected, atol=1e-3)
    assert paired.registration[3] >= MIN_SCORE


def test_a_known_shift_of_the_template_comes_back_in_registration(triton_server, synthetic_boards):
    sample = synthetic_boards[1]
    template = cv2.imread(str(sample.template_path), cv2.IMREAD_GRAYSCALE)
    drift = Misregistration(17.0, -11.0, 0.0)
    ok, moved = cv2.imencode(".png", drift.apply(template, CONTRACT.pad_value))
    image = sample.image_path.read_bytes()
    with PipelineClient(triton_server.grpc_url) as client:
        [own, shifted] = client.infer([image, image], templates=[sample.template_path.read_bytes(), moved.tobytes()])
    # The template's own offset from its board, plus the known shift undone.
    np.testing.assert_allclose(shifted.registration[:2] - own.registration[:2], [-17.0, 11.0], atol=1.0)


def test_mixed_concurrent_requests_are_each_answered_for_what_they_sent(triton_server, synthetic_boards):
    pairs = [pair(s) for s in synthetic_boards[:4]]
    with PipelineClient(triton_server.grpc_url) as client:
        alone = [client.infer([image])[0] for image, _ in pairs]
        paired = [client.infer([image], templates=[template])[0] for image, template in pairs]
        jobs = [(i, with_template) for _ in range(3) for i in range(len(pairs)) for with_template in (False, True)]

        def send(job):
            i, with_template = job
            image, template = pairs[i]
            return client.infer([image], templates=[template] if with_template else None)[0]

        with ThreadPoolExecutor(8) as pool:  # requests in flight together: the dynamic batcher mixes them
            answers = list(pool.map(send, jobs))
    for (i, with_template), answer in zip(jobs, answers):
        expected = paired[i] if with_template else alone[i]
        np.testing.assert_array_equal(answer.classes, expected.classes)
        np.testing.assert_allclose(answer.boxes, expected.boxes, atol=1e-2)
        if with_template:
            np.testing.assert_allclose(answer.registration, expected.registration, atol=1e-4)
        else:
            assert answer.registration is None


def test_a_bad_template_fails_only_its_own_file(triton_server, synthetic_boards, tmp_path):
    boards = synthetic_boards[:5]
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(boards[1].template_path.read_bytes()[:500])
    # Good, truncated, another board's (does not match), missing, none at all.
    templates = [boards[0].template_path, truncated, boards[0].template_path, tmp_path / "missing.jpg", None]
    with PipelineClient(triton_server.grpc_url) as client:
        with pytest.raises(InferenceFailed) as failed:
            client.infer_files([b.image_path for b in boards], templates=templates, progress=False, concurrency=5)
        [alone] = client.infer([boards[4].image_path.read_bytes()])
    failures = failed.value.failures
    assert list(failures) == [str(b.image_path) for b in boards[1:4]]
    assert "TEMPLATE[0]: " in failures[str(boards[1].image_path)] and "truncated" in failures[str(boards[1].image_path)]
    assert "TEMPLATE[0]: template does not match the image: score" in failures[str(boards[2].image_path)]
    assert failures[str(boards[3].image_path)].startswith(f"cannot read template file {tmp_path / 'missing.jpg'}")
    results = failed.value.results
    assert results[0].registration[3] >= MIN_SCORE
    assert results[4].registration is None
    np.testing.assert_allclose(results[4].boxes, alone.boxes, atol=1e-2)


def test_cli_with_one_template(triton_server, synthetic_boards, tmp_path, capsys):
    sample, out_json, annotated = synthetic_boards[0], tmp_path / "d.json", tmp_path / "annotated"
    code = main([str(sample.image_path), "--template", str(sample.template_path), "--url", triton_server.grpc_url,
                 "--json", str(out_json), "--annotate-dir", str(annotated)])
    assert code == 0
    (record,) = json.loads(out_json.read_text())
    assert record["template"] == str(sample.template_path)
    assert set(record["registration"]) == {"dx", "dy", "angle", "score"} and record["registration"]["score"] >= MIN_SCORE
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split()[-1] == "template"
    assert rows[2].split()[-1] == f"{record['registration']['score']:.3f}"
    picture = cv2.imread(str(annotated / f"{sample.image_path.stem}.png"))
    assert picture.shape[0] > 640 and picture.shape[1] > 2 * 640, "the board beside its template"
    with pytest.raises(SystemExit):
        main([str(sample.image_path), str(synthetic_boards[1].image_path), "--template", str(sample.template_path),
              "--url", triton_server.grpc_url])


def test_cli_with_a_templates_folder_by_both_naming_rules(triton_server, synthetic_boards, tmp_path, capsys):
    # DeepPCB naming: X_test.jpg finds X_temp.jpg in the folder.
    deeppcb = synthetic_boards[:2]
    # Same file name in another folder; the third image has no template there.
    images, templates = tmp_path / "images", tmp_path / "templates"
    images.mkdir()
    templates.mkdir()
    for i, sample in enumerate(synthetic_boards[2:5]):
        shutil.copy(sample.image_path, images / f"board{i}.jpg")
        if i < 2:
            shutil.copy(sample.template_path, templates / f"board{i}.jpg")
    out = tmp_path / "d.json"
    code = main([*(str(s.image_path) for s in deeppcb), "--templates", str(deeppcb[0].template_path.parent),
                 "--url", triton_server.grpc_url, "--json", str(out)])
    assert code == 0
    records = json.loads(out.read_text())
    assert [r["template"] for r in records] == [str(s.template_path) for s in deeppcb]
    assert all(r["registration"]["score"] >= MIN_SCORE for r in records)

    code = main([str(images), "--templates", str(templates), "--url", triton_server.grpc_url, "--json", str(out),
                 "--annotate-dir", str(tmp_path / "annotated")])
    assert code == 0
    records = json.loads(out.read_text())
    assert [r["template"] for r in records] == [str(templates / "board0.jpg"), str(templates / "board1.jpg"), None]
    assert records[2]["registration"] is None and records[0]["registration"]["score"] >= MIN_SCORE
    printed = capsys.readouterr().out
    (row,) = [line for line in printed.splitlines() if line.startswith("board2.jpg")]
    assert row.split()[-1] == "none", "the table says it was inspected without a template"
    assert "2 of 3 images inspected with a template" in printed
    assert cv2.imread(str(tmp_path / "annotated" / "board2.png")).shape == (640, 640, 3), "no template: as before"
    assert cv2.imread(str(tmp_path / "annotated" / "board0.png")).shape[1] > 2 * 640


def test_write_annotated_takes_templates_made_in_memory(synthetic_boards, tmp_path):
    sample = synthetic_boards[0]
    written = write_annotated([sample.image_path], [found([0, 0, 0, 0.9])], LABELS, tmp_path,
                              [sample.template_path.read_bytes()])
    assert cv2.imread(str(written[0])).shape[1] > 2 * 640


def test_templates_in_the_images_folder_are_references_not_boards(tmp_path):
    from tools.client.__main__ import find_templates

    for name in ("X_test.png", "X_temp.png", "Y_test.png"):
        (tmp_path / name).write_bytes(b"image")
    boards, templates = find_templates(sorted(tmp_path.iterdir()), None, tmp_path)
    assert [p.name for p in boards] == ["X_test.png", "Y_test.png"]
    assert [t.name if t else None for t in templates] == ["X_temp.png", None]
