"""Decoding a whole-board scan once, and encoding its tiles for the pipeline without copying the scan.

OpenCV reads the declared size from the header and refuses a scan over OPENCV_IO_MAX_IMAGE_PIXELS before it
allocates the pixels; model.py sets that variable from the config before cv2 is first imported.
"""
from __future__ import annotations

import cv2
import numpy as np
from tiling import Window

# The first bytes of the formats OpenCV reads here: data starting like one of them but undecodable is cut short.
_SIGNATURES = (b"\xff\xd8", b"\x89PNG", b"BM", b"II*\x00", b"MM\x00*")

# Why a scan is rejected, one word each: the `reason` label of pcb_rejected_images_total.
EMPTY, NOT_AN_IMAGE, TRUNCATED, TOO_LARGE = "empty", "not_an_image", "truncated", "too_large"
REJECTION_REASONS = (EMPTY, NOT_AN_IMAGE, TRUNCATED, TOO_LARGE)


class ScanRejected(ValueError):
    """The encoded bytes cannot be inspected as a scan; the message says why, ``reason`` in one word (one of
    REJECTION_REASONS)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def decode_scan(encoded: bytes, max_pixels: int) -> np.ndarray:
    """(H, W) grey or (H, W, 3) BGR uint8 pixels of an encoded JPEG, PNG, BMP or TIFF scan."""
    if len(encoded) == 0:
        raise ScanRejected("empty: 0 bytes", EMPTY)
    try:
        # ANYCOLOR keeps a grey scan one channel (a third of the memory of BGR) and applies EXIF orientation.
        image = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_ANYCOLOR)
    except cv2.error as error:
        if "CV_IO_MAX_IMAGE_PIXELS" in str(error):
            raise ScanRejected(f"its header declares more than the limit of {max_pixels} pixels", TOO_LARGE) from None
        raise ScanRejected(f"OpenCV cannot decode it ({error.err or error})", TRUNCATED) from None
    if image is None:
        raise ScanRejected(f"not a JPEG, PNG, BMP or TIFF image, or cut short ({len(encoded)} bytes starting "
                           f"with {encoded[:8].hex(' ')})",
                           TRUNCATED if encoded.startswith(_SIGNATURES) else NOT_AN_IMAGE)
    return image


def encode_tile(image: np.ndarray, window: Window) -> bytes:
    """The tile as a BMP: uncompressed, so encoding is a copy of the tile's rows and decoding is as cheap."""
    ok, buffer = cv2.imencode(".bmp", image[window.y0 : window.y1, window.x0 : window.x1])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode the tile at x={window.x0}, y={window.y0}")
    return buffer.tobytes()
