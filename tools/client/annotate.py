"""Draw defect detections on a board image: a box, class name and score per detection, one colour per class;
and, for an image inspected with a template, the image beside its (registered) template."""
from __future__ import annotations

import colorsys
from typing import Sequence

import cv2
import numpy as np

from tools import pipeline_math
from tools.detections import Detections

# Saturated BGR colours that stand out on both the black and the white of binarised boards, one per DeepPCB
# class in label order (open, short, mousebite, spur, copper, pin-hole).
CLASS_COLOURS = (
    (40, 40, 230),  # red
    (230, 60, 230),  # magenta
    (0, 150, 255),  # orange
    (40, 180, 40),  # green
    (230, 120, 20),  # blue
    (200, 170, 0),  # teal
)


def class_colour(class_id: int) -> tuple[int, int, int]:
    """BGR colour of a class; classes past the palette get evenly spaced hues."""
    if class_id < len(CLASS_COLOURS):
        return CLASS_COLOURS[class_id]
    red, green, blue = colorsys.hsv_to_rgb((class_id * 0.618034) % 1.0, 0.9, 0.85)
    return int(blue * 255), int(green * 255), int(red * 255)


def to_bgr(image: np.ndarray) -> np.ndarray:
    """An 8-bit BGR copy of a grey, BGR or BGRA image (8 or 16 bit)."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    if image.dtype != np.uint8:
        raise ValueError(f"expected an 8- or 16-bit image, got dtype {image.dtype}")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim == 3 and image.shape[2] == 3:
        return image.copy()
    raise ValueError(f"expected a grey, BGR or BGRA image, got shape {image.shape}")


def draw_detections(image: np.ndarray, detections: Detections, labels: Sequence[str]) -> np.ndarray:
    """Return a BGR copy of ``image`` with every detection drawn as a box labelled ``class score``."""
    canvas = to_bgr(image)
    height, width = canvas.shape[:2]
    # Line width and text size grow with the image so labels stay legible on large boards.
    thickness = max(1, round(min(height, width) / 400))
    font_scale = max(0.4, min(height, width) / 1400)
    text_thickness = max(1, round(font_scale * 1.5))
    font = cv2.FONT_HERSHEY_SIMPLEX
    for box, score, class_id in zip(detections.boxes, detections.scores, detections.classes):
        colour = class_colour(int(class_id))
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, thickness)
        name = labels[int(class_id)] if 0 <= int(class_id) < len(labels) else f"class {int(class_id)}"
        text = f"{name} {float(score):.2f}"
        (text_w, text_h), baseline = cv2.getTextSize(text, font, font_scale, text_thickness)
        # Label above the box, or inside it when the box touches the top edge.
        top = y1 - text_h - baseline - 2 if y1 - text_h - baseline - 2 >= 0 else y1
        left = min(max(x1, 0), max(width - text_w - 2, 0))
        cv2.rectangle(canvas, (left, top), (left + text_w + 2, top + text_h + baseline + 2), colour, cv2.FILLED)
        cv2.putText(canvas, text, (left + 1, top + text_h + 1), font, font_scale, _text_colour(colour), text_thickness,
                    cv2.LINE_AA)
    return canvas


def _text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on ``background`` (BGR)."""
    blue, green, red = background
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 150 else (255, 255, 255)


def registered_template(template: np.ndarray, registration: np.ndarray, width: int, height: int,
                        fill: float) -> np.ndarray:
    """The template brought over a ``width`` x ``height`` image by its served registration (dx, dy, angle, ...),
    as preprocess registers it; ``fill`` where the template has no pixels."""
    dx, dy, angle = (float(v) for v in np.asarray(registration).reshape(-1)[:3])
    matrix = pipeline_math.registration.rotation_about_centre(width, height, dx, dy, angle)
    return cv2.warpAffine(template, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(fill, fill, fill))


def registration_caption(registration: np.ndarray) -> str:
    """One line saying how the template was registered: one image, or the tiles of a scan."""
    registration = np.asarray(registration, np.float32)
    if registration.ndim == 1:
        dx, dy, angle, score = registration.tolist()
        return f"template, registered: dx {dx:+.1f} dy {dy:+.1f} px, angle {angle:+.2f} deg, score {score:.3f}"
    scores = registration[:, 3] if len(registration) else np.zeros(1, np.float32)
    return f"template as sent: {len(registration)} tiles registered, score {scores.min():.3f} to {scores.max():.3f}"


def side_by_side(image: np.ndarray, template: np.ndarray, detections: Detections, labels: Sequence[str],
                 fill: float) -> np.ndarray:
    """The image with its detections | its template with the same boxes, each under a caption.

    With one registration (pcb_pipeline) the template is shown registered onto the image, as the detector saw
    it; with per-tile registrations (pcb_scan) it is shown as sent. Without a registration, as sent too."""
    height, width = image.shape[:2]
    registration = detections.registration
    if registration is not None and np.asarray(registration).ndim == 1:
        shown = registered_template(to_bgr(template), registration, width, height, fill)
    else:
        shown = to_bgr(template)
    caption = registration_caption(registration) if registration is not None else "template as sent"
    panels = [(draw_detections(image, detections, labels), "image, defects found"),
              (draw_detections(shown, detections, labels), caption)]
    font_scale = max(0.45, min(height, width) / 1400)
    bar = int(30 * font_scale / 0.45)
    panel_height = max(p.shape[0] for p, _ in panels)
    columns = []
    for panel, text in panels:
        column = np.full((bar + panel_height, panel.shape[1], 3), 255, np.uint8)
        column[bar : bar + panel.shape[0]] = panel
        cv2.putText(column, text, (4, bar - int(8 * font_scale / 0.45)), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                    (0, 0, 0), max(1, round(font_scale * 1.5)), cv2.LINE_AA)
        columns.append(column)
    gap = np.full((bar + panel_height, max(8, width // 80), 3), 160, np.uint8)
    return np.hstack([columns[0], gap, columns[1]])
