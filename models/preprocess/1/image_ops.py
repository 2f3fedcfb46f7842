"""Turning one encoded image into the detector's input tensor.

Decoding runs on the CPU (Pillow reads the header, OpenCV decodes the pixels), and so does registering a
template onto the image (registration.py). Letterboxing (resize, pad, and the detector input's pixel type)
has two implementations with the same geometry: ``letterbox_opencv`` for CPU instances
(OpenCV's resize and border, a fraction of a millisecond per board) and array code written once for NumPy
and CuPy for GPU instances (every function taking ``xp`` runs unchanged on either).

Channel layout (the detector input's channel count C decides it): C = 1 grey image; C = 3 RGB image (an
Ultralytics detector); C = 2 grey image, then the board's registered template in grey, or the border fill
throughout when the request sent none. With C = 1 or 3 a template is still decoded, checked and registered
(the REGISTRATION output), but the detector does not see it.

Pixel type (the detector input's data type decides it): uint8 keeps the grey levels 0-255 (the detector's
graph scales them: a quarter of the bytes between the pipeline's steps); float32 scales them to [0, 1] (an
Ultralytics detector). ``PIXEL_TYPES`` lists both.

Geometry convention: a point at ``x`` in original pixels lands at ``x * scale + pad_x`` in the detector
input (continuous coordinates, pixel edges at integers), so ``x = (x_in - pad_x) / scale`` maps it back.
"""
from __future__ import annotations

import io
import warnings

import cv2
import numpy as np
from PIL import BmpImagePlugin, JpegImagePlugin, PngImagePlugin, TiffImagePlugin
from registration import BAD_TEMPLATE, RegistrationSettings, TemplateRejected, register_template

# Pillow's format classes read only the header when constructed: the declared size is known before any
# pixel is decoded. (PIL.Image.open would add Pillow's own fixed bomb limit on top of the configured one.)
_HEADER_READERS = (
    ("JPEG", JpegImagePlugin.JpegImageFile),
    ("PNG", PngImagePlugin.PngImageFile),
    ("BMP", BmpImagePlugin.BmpImageFile),
    ("TIFF", TiffImagePlugin.TiffImageFile),
)
SUPPORTED_CHANNELS = (1, 3)  # decoded image channels
TEMPLATE_CHANNELS = 2  # a detector input of this many channels takes the grey image and the registered template
NO_REGISTRATION = np.zeros(4, dtype=np.float32)  # REGISTRATION when no template was sent
PIXEL_TYPES = ("uint8", "float32")  # the detector input's: grey levels as decoded, or scaled to [0, 1]
# The first bytes of each format read here: data starting like one of them but unreadable is cut short.
_SIGNATURES = (b"\xff\xd8", b"\x89PNG", b"BM", b"II*\x00", b"MM\x00*")

# Why an image is rejected, one word each: the `reason` label of pcb_rejected_images_total.
EMPTY, NOT_AN_IMAGE, TRUNCATED, TOO_LARGE = "empty", "not_an_image", "truncated", "too_large"
REJECTION_REASONS = (EMPTY, NOT_AN_IMAGE, TRUNCATED, TOO_LARGE)


class ImageRejected(ValueError):
    """The encoded bytes cannot be turned into a detector input; the message says why, ``reason`` in one word
    (one of REJECTION_REASONS)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def read_declared_size(encoded: bytes) -> tuple[str, int, int]:
    """Return (format name, width, height) as the image header declares them, without decoding pixels."""
    for format_name, reader in _HEADER_READERS:
        try:
            # Pillow warns about damaged metadata; the rejection below (or the decode) says what matters.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with reader(io.BytesIO(encoded)) as header:
                    width, height = header.size
        except (SyntaxError, OSError, ValueError):
            continue
        return format_name, width, height
    raise ImageRejected(
        f"not a JPEG, PNG, BMP or TIFF image, or its header is cut short "
        f"({len(encoded)} bytes starting with {encoded[:8].hex(' ')})",
        TRUNCATED if encoded.startswith(_SIGNATURES) else NOT_AN_IMAGE,
    )


def decode_image(encoded: bytes, channels: int, max_pixels: int) -> np.ndarray:
    """Decode to an (H, W, channels) uint8 array: grayscale for 1 channel, RGB for 3.

    Raises ImageRejected for empty data, data that is not a JPEG/PNG/BMP/TIFF image, an image whose
    header declares more than ``max_pixels`` pixels (checked before decoding), and data that does not
    decode completely (OpenCV 4.11 fails on every truncation point of a JPEG, PNG or BMP; tests pin this).
    """
    if channels not in SUPPORTED_CHANNELS:
        raise ValueError(f"channels must be one of {SUPPORTED_CHANNELS}, got {channels}")
    if len(encoded) == 0:
        raise ImageRejected("empty image data (0 bytes)", EMPTY)
    format_name, width, height = read_declared_size(encoded)
    if width * height > max_pixels:
        raise ImageRejected(
            f"{format_name} header declares {width}x{height} = {width * height} pixels, "
            f"over the limit of {max_pixels} pixels",
            TOO_LARGE,
        )
    flags = cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR
    try:
        image = cv2.imdecode(np.frombuffer(encoded, np.uint8), flags)
    except cv2.error as exc:  # e.g. OpenCV's own OPENCV_IO_MAX_IMAGE_PIXELS check
        reason = str(exc).strip().splitlines()[-1]
        raise ImageRejected(f"{format_name} image ({width}x{height}) could not be decoded: {reason}",
                            TOO_LARGE if "CV_IO_MAX_IMAGE_PIXELS" in str(exc) else TRUNCATED) from exc
    if image is None:
        raise ImageRejected(
            f"{format_name} image ({width}x{height}, {len(encoded)} bytes) could not be decoded: "
            "the data is truncated or corrupt",
            TRUNCATED,
        )
    if channels == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image.reshape(image.shape[0], image.shape[1], channels)


def letterbox_geometry(height: int, width: int, input_height: int, input_width: int) -> tuple[float, int, int, int, int]:
    """Fit a height x width image into the input keeping its aspect ratio.

    Returns (scale, pad_x, pad_y, resized_width, resized_height): the image is resized by ``scale`` in
    both directions to resized_width x resized_height pixels and placed at (pad_x, pad_y).
    """
    scale = min(input_height / height, input_width / width)
    resized_width = min(input_width, max(1, round(width * scale)))
    resized_height = min(input_height, max(1, round(height * scale)))
    return scale, (input_width - resized_width) // 2, (input_height - resized_height) // 2, resized_width, resized_height


def _bilinear_taps(out_size: int, scale: float, in_size: int, xp):
    """Source indices and weights for half-pixel bilinear sampling, clamped at the borders as OpenCV does."""
    source = (xp.arange(out_size, dtype=xp.float64) + 0.5) / scale - 0.5
    source = xp.clip(source, 0, in_size - 1)
    lower = xp.floor(source).astype(xp.int64)
    upper = xp.minimum(lower + 1, in_size - 1)
    return lower, upper, (source - lower).astype(xp.float32)


def resize_bilinear(image, scale: float, out_height: int, out_width: int, xp):
    """Resize an (H, W, C) array by ``scale`` to (out_height, out_width, C) float32.

    Same sampling as ``cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)``
    (half-pixel centres, replicated borders), computed in float32 without OpenCV's fixed-point rounding.
    """
    row_lo, row_hi, row_weight = _bilinear_taps(out_height, scale, image.shape[0], xp)
    col_lo, col_hi, col_weight = _bilinear_taps(out_width, scale, image.shape[1], xp)
    # Gather the needed rows before converting to float so a large image is never copied whole.
    top = image[row_lo].astype(xp.float32)
    rows = top + (image[row_hi].astype(xp.float32) - top) * row_weight[:, None, None]
    left = rows[:, col_lo]
    return left + (rows[:, col_hi] - left) * col_weight[None, :, None]


def pixel_type(dtype) -> np.dtype:
    """The detector input's pixel type as a NumPy dtype; ValueError for one not in PIXEL_TYPES."""
    if np.dtype(dtype).name not in PIXEL_TYPES:
        raise ValueError(f"the detector input must be one of {PIXEL_TYPES}, got {np.dtype(dtype).name}")
    return np.dtype(dtype)


def letterbox(image, input_height: int, input_width: int, pad_value: float, xp, dtype=np.float32):
    """Letterbox an (H, W, C) uint8 array into the detector input.

    Returns (tensor, geometry): tensor is (C, input_height, input_width) of the pixel type ``dtype`` (uint8
    grey levels, or float32 in [0, 1]) with the border filled with ``pad_value`` (``pad_value / 255``);
    geometry is float32 (scale, pad_x, pad_y, orig_width, orig_height).
    """
    height, width, channels = image.shape
    scale, pad_x, pad_y, resized_width, resized_height = letterbox_geometry(height, width, input_height, input_width)
    canvas = xp.full((input_height, input_width, channels), pad_value, dtype=xp.float32)
    canvas[pad_y : pad_y + resized_height, pad_x : pad_x + resized_width] = resize_bilinear(
        image, scale, resized_height, resized_width, xp
    )
    if pixel_type(dtype).name == "uint8":  # bilinear values stay within 0-255: rounding is all it takes
        tensor = xp.ascontiguousarray(xp.rint(canvas.transpose(2, 0, 1)).astype(xp.uint8))
    else:
        tensor = xp.ascontiguousarray(canvas.transpose(2, 0, 1) / 255)
    geometry = xp.asarray([scale, pad_x, pad_y, width, height], dtype=xp.float32)
    return tensor, geometry


def resize_opencv(image: np.ndarray, scale: float, resized_height: int, resized_width: int) -> np.ndarray:
    """Resize an (H, W, C) pixel array (uint8 as decoded) by ``scale`` to (resized_height, resized_width, C).

    Passing fx = fy = ``scale`` (no target size) makes OpenCV sample exactly where ``resize_bilinear`` does;
    a target size would rescale each side by its own rounded ratio instead.
    """
    channels = image.shape[2]
    if round(image.shape[0] * scale) == 0 or round(image.shape[1] * scale) == 0:
        # A side under half an input pixel (aspect over 1280:1), which OpenCV's own rounding would make
        # empty: the geometry's one-pixel side instead, sampled mid-strip (the array code takes its last line).
        resized = cv2.resize(image, (resized_width, resized_height), interpolation=cv2.INTER_LINEAR)
    else:
        resized = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    return resized.reshape(resized_height, resized_width, channels)  # OpenCV drops a single channel axis


def letterbox_opencv(image: np.ndarray, input_height: int, input_width: int, pad_value: float,
                     out: np.ndarray | None = None):
    """``letterbox`` for CPU instances, on OpenCV: the same geometry, layout and border (``pad_value`` a whole
    grey level, as the pixels are), exactly the same values when no resize is needed, within one grey level
    otherwise (OpenCV resizes uint8 with fixed-point weights and rounds to whole grey levels; the array code
    stays in float32). ``out``: the (channels, input_height, input_width) array to write the tensor to, of the
    pixel type (uint8 grey levels, or float32 in [0, 1]); a new float32 one when None.
    """
    height, width, channels = image.shape
    scale, pad_x, pad_y, resized_width, resized_height = letterbox_geometry(height, width, input_height, input_width)
    if (resized_height, resized_width) != (height, width):
        image = resize_opencv(image, scale, resized_height, resized_width)
    # Padding the uint8 pixels, then one pass to float32 and CHW, moves the least memory.
    padded = cv2.copyMakeBorder(
        image, pad_y, input_height - resized_height - pad_y, pad_x, input_width - resized_width - pad_x,
        cv2.BORDER_CONSTANT, value=(pad_value,) * 4,  # a Scalar per channel: a lone number fills channel 0 only
    )
    tensor = np.empty((channels, input_height, input_width), dtype=np.float32) if out is None else out
    planar = padded.reshape(input_height, input_width, channels).transpose(2, 0, 1)
    if pixel_type(tensor.dtype) == np.uint8:
        tensor[...] = planar
    else:
        np.divide(planar, np.float32(255), out=tensor)
    geometry = np.asarray([scale, pad_x, pad_y, width, height], dtype=np.float32)
    return tensor, geometry


def board_planes(encoded: bytes, encoded_template: bytes | None, channels: int, max_pixels: int,
                 registration: RegistrationSettings | None):
    """Decode the image (and register its template onto it) into the planes of the detector's channel layout.

    Returns (planes, registration float32 (dx, dy, angle, score), zeros without a template). ``planes`` are
    (H, W, c) uint8 arrays in channel order: the image alone (1 or 3 channels), or the grey image and the
    registered template, the latter None when no template was sent (the border fill throughout). Raises
    ImageRejected for the image, TemplateRejected for the template (its reason: registration.BAD_TEMPLATE or
    TEMPLATE_MISMATCH).
    """
    image = decode_image(encoded, 1 if channels == TEMPLATE_CHANNELS else channels, max_pixels)
    if encoded_template is None:
        return ([image] if channels != TEMPLATE_CHANNELS else [image, None]), NO_REGISTRATION
    try:
        template = decode_image(encoded_template, 1, max_pixels)[:, :, 0]
    except ImageRejected as exc:
        raise TemplateRejected(str(exc), BAD_TEMPLATE) from None
    grey = image[:, :, 0] if image.shape[2] == 1 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    registered, found = register_template(grey, template, registration)
    if channels != TEMPLATE_CHANNELS:
        return [image], found
    return [image, registered[:, :, None]], found


def board_pixels(encoded: bytes, encoded_template: bytes | None, channels: int, max_pixels: int,
                 registration: RegistrationSettings | None):
    """``board_planes`` as one (H, W, channels) uint8 array, the fill in place of a missing template."""
    planes, found = board_planes(encoded, encoded_template, channels, max_pixels, registration)
    image = planes[0]
    return np.dstack([plane if plane is not None else np.full_like(image, round(registration.fill))
                      for plane in planes]), found


def preprocess_image_opencv(encoded: bytes, input_height: int, input_width: int, channels: int, pad_value: float,
                            max_pixels: int, template: bytes | None = None,
                            registration: RegistrationSettings | None = None, dtype=np.float32):
    """``preprocess_image`` for CPU instances: decode and letterbox with OpenCV (see ``letterbox_opencv``),
    plane by plane (OpenCV is fastest on contiguous planes); a missing template's plane is the fill itself."""
    planes, found = board_planes(encoded, template, channels, max_pixels, registration)
    tensor = np.empty((channels, input_height, input_width), dtype=pixel_type(dtype))
    start = 0
    for plane in planes:
        if plane is None:  # letterboxing a plane of the fill gives the fill: skip the work
            tensor[start] = pad_value if tensor.dtype == np.uint8 else np.float32(pad_value) / np.float32(255)
            start += 1
            continue
        _, geometry = letterbox_opencv(plane, input_height, input_width, pad_value,
                                       out=tensor[start : start + plane.shape[2]])
        start += plane.shape[2]
    return tensor, geometry, found


def preprocess_image(encoded: bytes, input_height: int, input_width: int, channels: int, pad_value: float,
                     max_pixels: int, template: bytes | None = None, registration: RegistrationSettings | None = None,
                     dtype=np.float32, xp=np):
    """Decode (and register) on the CPU, move the pixels to ``xp``'s device and letterbox them there (see
    ``letterbox``). Returns (tensor, geometry, registration), the last on the CPU."""
    pixels, found = board_pixels(encoded, template, channels, max_pixels, registration)
    return (*letterbox(xp.asarray(pixels), input_height, input_width, pad_value, xp, dtype), found)
