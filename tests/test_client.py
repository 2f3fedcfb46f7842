"""The client library and CLI, and the detection drawing they use."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from tools.client.__main__ import main
from tools.client.annotate import CLASS_COLOURS, class_colour, draw_detections
from tools.client.pipeline_client import InferenceFailed, PipelineClient
from tools.client.results import detections_record, detections_table, find_images, write_annotated
from tools.contract import served_contract
from tools.detections import Detections

LABELS = served_contract().labels


def test_labels_file_lists_the_six_deeppcb_classes_in_order():
    assert LABELS == ("open", "short", "mousebite", "spur", "copper", "pin-hole")


def test_find_images_expands_folders_and_rejects_missing(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "a.JPG", "notes.txt", "sub/c.tiff"):
        (tmp_path / name).write_bytes(b"x")
    assert find_images([tmp_path]) == [tmp_path / "a.JPG", tmp_path / "b.png"]
    assert find_images([tmp_path], recursive=True)[-1] == tmp_path / "sub" / "c.tiff"
    assert find_images([tmp_path / "notes.txt"]) == [tmp_path / "notes.txt"]
    with pytest.raises(FileNotFoundError, match="missing.png"):
        find_images([tmp_path / "missing.png"])


def two_detections() -> Detections:
    return Detections(boxes=np.array([[10, 20, 50, 60], [100, 100, 140, 130]], np.float32),
                      scores=np.array([0.9, 0.4], np.float32), classes=np.array([1, 5], np.int32))


def test_detections_record_and_table(tmp_path):
    labels = LABELS
    record = detections_record(tmp_path / "board.jpg", two_detections(), labels)
    assert record["detections"][0] == {"box": [10.0, 20.0, 50.0, 60.0], "class": "short", "class_id": 1, "score": 0.9}
    assert record["detections"][1]["class"] == "pin-hole"
    paths = [tmp_path / "board.jpg", tmp_path / "bad.jpg"]
    table = detections_table(paths, [two_detections(), None], labels, {str(paths[1]): "not an image"})
    rows = table.splitlines()
    assert rows[0].split() == ["image", "total", *labels]
    assert rows[2].split() == ["board.jpg", "2", ".", "1", ".", ".", ".", "1"]
    assert rows[3].split(maxsplit=1) == ["bad.jpg", "FAILED: not an image"]


@pytest.mark.parametrize("shape", [(200, 300), (200, 300, 1), (200, 300, 3), (200, 300, 4)])
def test_draw_detections_boxes_in_class_colours(shape):
    image = np.full(shape, 255, np.uint8)
    drawn = draw_detections(image, two_detections(), LABELS)
    assert drawn.shape == (200, 300, 3) and drawn.dtype == np.uint8
    assert image.min() == 255, "the input image is left untouched"
    # Bottom-left corner of each box (the label sits at the top) has the class colour.
    assert tuple(drawn[60, 10]) == CLASS_COLOURS[1]
    assert tuple(drawn[130, 100]) == CLASS_COLOURS[5]
    assert (drawn[0:15, 200:] == 255).all(), "nothing drawn away from the detections"


def test_class_colours_are_distinct_beyond_the_palette():
    colours = {class_colour(c) for c in range(12)}
    assert len(colours) == 12


def test_infer_files_names_the_failed_file(triton_server, board_bytes, tmp_path):
    good, bad, missing = tmp_path / "good.jpg", tmp_path / "bad.jpg", tmp_path / "missing.jpg"
    good.write_bytes(board_bytes)
    bad.write_bytes(board_bytes[: len(board_bytes) // 2])
    with PipelineClient(triton_server.grpc_url) as client:
        expected = client.infer([board_bytes])[0]
        with pytest.raises(InferenceFailed) as error:
            client.infer_files([bad, good, missing], progress=False)
    assert list(error.value.failures) == [str(bad), str(missing)]
    assert "truncated" in error.value.failures[str(bad)]
    assert "cannot read file" in error.value.failures[str(missing)]
    assert f"{bad}:" in str(error.value)
    result = error.value.results[1]
    np.testing.assert_allclose(result.boxes, expected.boxes, atol=1e-2)
    assert error.value.results[0] is None and error.value.results[2] is None


def test_cli_writes_json_and_annotated_images(triton_server, board_bytes, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "board.jpg").write_bytes(board_bytes)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out_json, annotated = tmp_path / "out" / "detections.json", tmp_path / "annotated"

    code = main([str(images), "--url", triton_server.grpc_url, "--json", str(out_json),
                 "--annotate-dir", str(annotated), "--score-threshold", "0.3", "--concurrency", "2"])

    assert code == 1, "a failed image makes the exit status non-zero"
    records = json.loads(out_json.read_text())
    assert [r["file"] for r in records] == [str(images / "board.jpg"), str(images / "broken.png")]
    detections = records[0]["detections"]
    assert detections and all(d["score"] > 0.3 and d["class"] in LABELS for d in detections)
    assert "IMAGE[0]" in records[1]["error"]
    drawn = cv2.imread(str(annotated / "board.png"))
    assert drawn.shape == (640, 640, 3)
    assert (drawn.max(axis=2) != drawn.min(axis=2)).any(), "coloured boxes are drawn on the grey board"
    assert not (annotated / "broken.png").exists()
    printed = capsys.readouterr().out
    assert "board.jpg" in printed and "FAILED" in printed


def test_annotated_images_of_different_folders_sharing_a_stem_both_stay(tmp_path):
    paths = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        paths.append(tmp_path / folder / "board.png")
        cv2.imwrite(str(paths[-1]), np.full((200, 300), 255, np.uint8))
    written = write_annotated(paths, [two_detections(), two_detections()], LABELS, tmp_path / "out")
    assert [p.name for p in written] == ["board.png", "board-2.png"] and all(p.is_file() for p in written)
