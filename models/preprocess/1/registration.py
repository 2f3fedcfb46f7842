"""Registering a board's defect-free template onto its inspected image, with OpenCV.

Line-scan crops of the same board region drift by tens of pixels and turn by up to about a degree, so the
template is brought over the image before the detector compares the two: phase correlation on a coarse copy
finds the shift (it needs no starting point), then ECC (``cv2.findTransformECC``, Euclidean motion) refines
shift and rotation at ``scale`` of full size, starting again from no shift when that fails. ECC's correlation
coefficient is the match score: about 0.93 to 0.99 for a DeepPCB board and its own template, under 0.7 for
most other boards.

A rigid map leaves the local stretch of a line-scan image (camera speed jitter, the board's own distortion):
fringes of 2-4 px along traces that the detector took for opens. So the registered template is then bent onto
the image by a smooth displacement of at most ``local_max_shift`` px: DIS optical flow (``cv2.DISOpticalFlow``)
on half-size copies, smoothed, clipped to that bound so it takes up stretch but cannot close a real defect.
Measured on the 200 held-out DeepPCB boards, the detector trained on rigid registration (postprocess then kept
one class per anchor): DeepPCB AP 97.77 -> 98.89 %, false alarms 49 -> 29 and misses 65 -> 44 (each at its
deployed threshold), for about 1.3 ms a board.

A template registered already (``RegistrationSettings.prealigned``: pcb_scan registers a scan's template onto
the whole scan, then sends its tiles' windows) is only scored where it lies, not searched (a tile can hold
artwork that matches itself shifted, lines along it), and not refused for its score: the whole scan passed the
minimum, and a tile of blank margin or of a large defect scores low without being the wrong board.

Convention (the ``REGISTRATION`` output, ``dx, dy, angle, score``): the template pixel at (x, y) lies over the
image pixel (x + dx, y + dy) after a rotation by ``angle`` degrees about the image centre ((W - 1) / 2,
(H - 1) / 2), turning as ``cv2.getRotationMatrix2D`` does (positive: counter-clockwise on screen).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import cv2
import numpy as np

# Why a template is refused, one word each (the `reason` of the error).
BAD_TEMPLATE, TEMPLATE_MISMATCH = "bad_template", "template_mismatch"
REJECTION_REASONS = (BAD_TEMPLATE, TEMPLATE_MISMATCH)
COARSE_SCALE = 0.25  # phase correlation's copy: 160 px for a 640 px board, a fraction of a millisecond
ECC_ITERATIONS, ECC_EPSILON, ECC_BLUR = 30, 1e-4, 3
# The local bend: flow on this fraction of full size (a quarter bent less well: 98.29 against 98.87 % AP, offline),
# smoothed with this Gaussian sigma in flow pixels (so the field follows stretch, not the edges of a defect).
BEND_SCALE, BEND_SMOOTHING = 0.5, 2.0


class TemplateRejected(ValueError):
    """The template cannot be registered onto the image; the message says why, ``reason`` in one word, ``score``
    the match score reached (0 when there is none)."""

    def __init__(self, message: str, reason: str, score: float = 0.0):
        super().__init__(message)
        self.reason, self.score = reason, score


@dataclass(frozen=True)
class RegistrationSettings:
    """The registration's config parameters (preprocess's config owns them)."""

    max_shift: float  # pixels, either axis: a larger offset is not this board
    max_angle: float  # degrees
    min_score: float  # ECC correlation coefficient, 0 to 1
    size_tolerance: int  # pixels a template's width or height may differ from the image's
    scale: float  # ECC works on this fraction of full size
    fill: float  # grey level where the registered template has no pixels (the letterbox border fill)
    local_max_shift: float = 0.0  # pixels the registered template may be bent by, locally (0: rigid only)
    prealigned: bool = False  # the template lies on the image already: score it in place, search nothing

    def for_prealigned(self) -> "RegistrationSettings":
        """The same settings for templates registered already (a scan's tiles)."""
        return replace(self, prealigned=True)

    @classmethod
    def from_parameters(cls, parameters: dict, fill: float) -> "RegistrationSettings":
        """From preprocess's config parameters (as strings, or as numbers), and the border fill. Without
        ``registration_local_max_shift`` (pcb_scan's config: a whole scan is registered rigidly, and preprocess
        bends each of its tiles) the registration is rigid."""
        return cls(max_shift=float(parameters["registration_max_shift"]),
                   max_angle=float(parameters["registration_max_angle"]),
                   min_score=float(parameters["registration_min_score"]),
                   size_tolerance=int(float(parameters["template_size_tolerance"])),
                   scale=float(parameters["registration_scale"]), fill=fill,
                   local_max_shift=float(parameters.get("registration_local_max_shift", 0.0)))


def rotation_about_centre(width: int, height: int, dx: float, dy: float, angle: float) -> np.ndarray:
    """The 2x3 affine map template pixel -> image pixel that (dx, dy, angle) describes."""
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), angle, 1.0)
    matrix[:, 2] += (dx, dy)
    return matrix


def describe_transform(matrix: np.ndarray, width: int, height: int) -> tuple[float, float, float]:
    """(dx, dy, angle) of a rigid 2x3 map template pixel -> image pixel (the inverse of rotation_about_centre)."""
    angle = math.degrees(math.atan2(matrix[0, 1], matrix[0, 0]))
    rotation_only = rotation_about_centre(width, height, 0.0, 0.0, angle)
    dx, dy = matrix[:, 2] - rotation_only[:, 2]
    return float(dx), float(dy), angle


def _shrunk(image: np.ndarray, scale: float) -> np.ndarray:
    return cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA).astype(np.float32)


@functools.lru_cache(maxsize=8)
def pixel_grid(height: int, width: int) -> np.ndarray:
    """(H, W, 2) float32 x, y of every pixel (a remap's identity): cached, as a line's boards share a size.
    Read only."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    return np.dstack([xs, ys])


def bend_field(image: np.ndarray, registered: np.ndarray, max_shift: float) -> np.ndarray:
    """(H, W, 2) float32: for each image pixel, where to sample ``registered`` (lying on ``image`` up to local
    stretch) so that it lies on the image; a smooth field at most ``max_shift`` px from the identity."""
    height, width = image.shape
    small = [cv2.resize(plane, None, fx=BEND_SCALE, fy=BEND_SCALE, interpolation=cv2.INTER_AREA)
             for plane in (image, registered)]
    # flow[y, x]: where the image's pixel (x, y) lies in the template, at the flow's scale
    flow = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST).calc(small[0], small[1], None)
    flow = cv2.resize(cv2.GaussianBlur(flow, (0, 0), BEND_SMOOTHING), (width, height), interpolation=cv2.INTER_LINEAR)
    np.clip(flow * np.float32(1 / BEND_SCALE), -max_shift, max_shift, out=flow)
    return pixel_grid(height, width) + flow


def bend_onto(image: np.ndarray, registered: np.ndarray, max_shift: float) -> np.ndarray:
    """``registered`` bent onto ``image`` (``bend_field``); itself when ``max_shift`` is 0."""
    if max_shift <= 0:
        return registered
    return cv2.remap(registered, bend_field(image, registered, max_shift), None, cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)


def _refine(scaled: tuple[np.ndarray, np.ndarray], start: np.ndarray, settings: RegistrationSettings, width: int,
            height: int):
    """ECC from ``start`` on the scaled (image, template): (full-size warp image -> template, dx, dy, angle,
    score), or TemplateRejected (its ``score`` set) when it fails, scores too low or lands out of range."""
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, ECC_ITERATIONS, ECC_EPSILON)
    try:
        score, warp = cv2.findTransformECC(*scaled, start.copy(), cv2.MOTION_EUCLIDEAN, criteria, None, ECC_BLUR)
    except cv2.error:  # ECC stops when the images do not correlate (its iterations diverge)
        raise TemplateRejected("template does not match the image: score 0.00 (the registration did not converge)",
                               TEMPLATE_MISMATCH, 0.0) from None
    warp = warp.astype(np.float64)
    warp[:, 2] /= settings.scale
    dx, dy, angle = describe_transform(cv2.invertAffineTransform(warp), width, height)
    score = min(1.0, max(0.0, float(score)))  # [0, 1] through float rounding too
    if score < settings.min_score:
        raise TemplateRejected(f"template does not match the image: score {score:.2f}, under the minimum of "
                               f"{settings.min_score:.2f}", TEMPLATE_MISMATCH, score)
    if max(abs(dx), abs(dy)) > settings.max_shift or abs(angle) > settings.max_angle:
        raise TemplateRejected(
            f"template does not match the image: offset ({dx:.1f}, {dy:.1f}) px, angle {angle:.2f} deg, beyond "
            f"the search range of {settings.max_shift:g} px and {settings.max_angle:g} deg (score {score:.2f})",
            TEMPLATE_MISMATCH, score)
    return warp, dx, dy, angle, score


def _score_in_place(image: np.ndarray, template: np.ndarray, settings: RegistrationSettings) -> float:
    """ECC's correlation of a template lying on the image already (at ``scale``, blurred as ECC blurs), over the
    template's pixels other than the border fill; 0 where it is undefined (a blank tile)."""
    scaled = [cv2.GaussianBlur(_shrunk(plane, settings.scale), (ECC_BLUR, ECC_BLUR), 0) for plane in (image, template)]
    has_pixels = np.where(template == round(settings.fill), 0, 255).astype(np.uint8)
    mask = cv2.resize(has_pixels, scaled[1].shape[::-1], interpolation=cv2.INTER_NEAREST)
    score = float(cv2.computeECC(*scaled, mask))
    return min(1.0, max(0.0, score)) if math.isfinite(score) else 0.0  # [0, 1] through float rounding too


def register_template(image: np.ndarray, template: np.ndarray, settings: RegistrationSettings):
    """Bring a grey (H', W') template over a grey (H, W) image (``settings.prealigned``: score it where it lies).

    Returns (registered (H, W) uint8 template in the image's frame, bent onto it by up to
    ``settings.local_max_shift`` px; registration float32 (dx, dy, angle, score) of the rigid map). Raises
    TemplateRejected when the sizes differ beyond the tolerance, or when the template does not match the image
    (no ECC convergence, offset or angle out of range, score under the minimum).
    """
    height, width = image.shape
    if abs(template.shape[0] - height) > settings.size_tolerance or abs(template.shape[1] - width) > settings.size_tolerance:
        raise TemplateRejected(
            f"template is {template.shape[1]}x{template.shape[0]}, the image {width}x{height}: more than the "
            f"{settings.size_tolerance} px tolerance apart", BAD_TEMPLATE)
    if template.shape != image.shape:  # within tolerance: the same origin, the registration takes up the rest
        template = cv2.copyMakeBorder(template[:height, :width], 0, max(0, height - template.shape[0]), 0,
                                      max(0, width - template.shape[1]), cv2.BORDER_REPLICATE)
    if settings.prealigned:
        score = _score_in_place(image, template, settings)
        return bend_onto(image, template, settings.local_max_shift), np.array([0, 0, 0, score], dtype=np.float32)
    coarse_image, coarse_template = _shrunk(image, COARSE_SCALE), _shrunk(template, COARSE_SCALE)
    window = cv2.createHanningWindow(coarse_image.shape[::-1], cv2.CV_32F)
    (shift_x, shift_y), _ = cv2.phaseCorrelate(coarse_template, coarse_image, window)  # image ~ template moved by it
    # ECC's warp maps image pixels to template pixels, at its working scale. It starts from phase correlation's
    # shift, then (if that fails) from no shift: on periodic artwork phase correlation can lock onto a repeat
    # of the pattern, and on sparse boards the coarse copy loses the thin features it needs.
    ratio = settings.scale / COARSE_SCALE
    starts = [np.array([[1, 0, -shift_x * ratio], [0, 1, -shift_y * ratio]], np.float32), np.eye(2, 3, dtype=np.float32)]
    scaled = _shrunk(image, settings.scale), _shrunk(template, settings.scale)
    refusal = None
    for start in starts:
        try:
            warp, dx, dy, angle, score = _refine(scaled, start, settings, width, height)
            break
        except TemplateRejected as rejected:
            refusal = refusal if refusal is not None and refusal.score >= rejected.score else rejected
    else:
        raise refusal
    registered = cv2.warpAffine(template, warp, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=settings.fill)
    return bend_onto(image, registered, settings.local_max_shift), np.array([dx, dy, angle, score], dtype=np.float32)
