"""preprocess array code (models/preprocess/1/image_ops.py): decoding, rejection of bad input, letterbox."""
from __future__ import annotations

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from tests.array_backends import ARRAY_MODULES, to_numpy
from tools.contract import MODELS_ROOT, served_contract
from tools.pipeline_math import image_ops, preprocess_as_served, registration_settings

ImageRejected = image_ops.ImageRejected
LOSSLESS_FORMATS = (".png", ".bmp", ".tiff")
ALL_FORMATS = (".jpg",) + LOSSLESS_FORMATS
INPUT_SIZE = 640
# (height, width): square, wide, tall, odd, extreme aspect, large, upscaled, tiny
SIZES = [(640, 640), (480, 1280), (900, 300), (1001, 1000), (200, 3000), (3000, 4000), (100, 150), (37, 45)]
# Sizes the letterbox keeps at scale 1 (only padded); and one-pixel strips, whose short side stays one pixel
UNSCALED_SIZES = [(640, 640), (640, 320), (200, 640)]
STRIP_SIZES = [(1, 3000), (3000, 1)]
# The CPU instances' OpenCV letterbox against the GPU instances' array letterbox, which the CuPy variant
# runs on a GPU machine. OpenCV resizes uint8 with fixed-point weights (11 bits, fewer in its vector code)
# and rounds to whole grey levels, the array code stays in float32: at most 0.5 + a fraction of a grey
# level apart (0.80 the worst seen on white noise); one grey level is the bound.
RESIZE_TOLERANCE = 1 / 255
LETTERBOX_PATHS = [
    *(pytest.param(("array", param.values[0]), id=f"array-{param.id}", marks=param.marks) for param in ARRAY_MODULES),
    pytest.param(("opencv", np), id="opencv"),
]


def encode(image: np.ndarray, extension: str) -> bytes:
    ok, buffer = cv2.imencode(extension, image)
    assert ok
    return buffer.tobytes()


def smooth_image(height: int, width: int, channels: int, seed: int = 0) -> np.ndarray:
    """Smooth random content (compresses like a real picture, unlike white noise)."""
    noise = np.random.default_rng(seed).random((height, width, channels)).astype(np.float32) * 255
    blurred = cv2.GaussianBlur(noise, (7, 7), 2).reshape(height, width, channels)
    return np.clip((blurred - blurred.mean()) * 4 + 128, 0, 255).astype(np.uint8)


def run_letterbox(path, image: np.ndarray, pad_value: float = 114, dtype=np.float32):
    """(tensor, geometry) as NumPy arrays from one letterbox implementation (see LETTERBOX_PATHS), the tensor
    of the pixel type ``dtype``."""
    kind, xp = path
    if kind == "opencv":
        out = np.empty((image.shape[2], INPUT_SIZE, INPUT_SIZE), dtype=dtype)
        return image_ops.letterbox_opencv(image, INPUT_SIZE, INPUT_SIZE, pad_value, out=out)
    tensor, geometry = image_ops.letterbox(xp.asarray(image), INPUT_SIZE, INPUT_SIZE, pad_value, xp, dtype)
    return to_numpy(tensor), to_numpy(geometry)


# --- resize and letterbox -------------------------------------------------------------------------


@pytest.mark.parametrize("xp", ARRAY_MODULES)
@pytest.mark.parametrize("height,width,scale", [(100, 150, 0.37), (64, 64, 2.5), (480, 1280, 0.5),
                                                (333, 517, 1.2345), (1000, 800, 0.64), (640, 640, 1.0)])
def test_resize_matches_opencv_inter_linear(xp, height, width, scale):
    image = np.random.default_rng(1).random((height, width, 3)).astype(np.float32) * 255
    expected = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    resized = image_ops.resize_bilinear(xp.asarray(image), scale, expected.shape[0], expected.shape[1], xp)
    np.testing.assert_allclose(to_numpy(resized), expected, atol=1e-3)

    # On uint8 OpenCV uses 11-bit fixed-point weights: rounding ours lands within one grey level.
    image8 = image.astype(np.uint8)
    expected8 = cv2.resize(image8, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    resized8 = image_ops.resize_bilinear(xp.asarray(image8), scale, expected8.shape[0], expected8.shape[1], xp)
    assert np.abs(np.rint(to_numpy(resized8)) - expected8).max() <= 1


@pytest.mark.parametrize("path", LETTERBOX_PATHS)
@pytest.mark.parametrize("height,width", SIZES)
def test_letterbox_places_the_resized_image_on_a_padded_canvas(path, height, width):
    image = smooth_image(height, width, 1)
    tensor, geometry = run_letterbox(path, image)
    scale, pad_x, pad_y, resized_width, resized_height = image_ops.letterbox_geometry(height, width, INPUT_SIZE, INPUT_SIZE)

    assert tensor.shape == (1, INPUT_SIZE, INPUT_SIZE) and tensor.dtype == np.float32
    assert geometry.dtype == np.float32
    np.testing.assert_allclose(geometry, [scale, pad_x, pad_y, width, height], rtol=1e-7)
    assert scale == min(INPUT_SIZE / height, INPUT_SIZE / width)
    # aspect kept: one side fills the input, the image is centred along the other
    assert resized_width == INPUT_SIZE or resized_height == INPUT_SIZE
    assert abs(pad_x * 2 + resized_width - INPUT_SIZE) <= 1 and abs(pad_y * 2 + resized_height - INPUT_SIZE) <= 1

    content = np.zeros((INPUT_SIZE, INPUT_SIZE), bool)
    content[pad_y : pad_y + resized_height, pad_x : pad_x + resized_width] = True
    assert (tensor[0][~content] == np.float32(114) / np.float32(255)).all()
    expected = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    assert expected.shape == (resized_height, resized_width)  # OpenCV rounds the size the same way
    inside = tensor[0][content].reshape(resized_height, resized_width) * 255
    assert np.abs(inside - expected).max() <= 1 + 1e-3
    assert 0 <= tensor.min() and tensor.max() <= 1


def centroid(plane: np.ndarray) -> tuple[float, float]:
    """Intensity centroid (x, y) with pixel i covering [i, i + 1)."""
    ys, xs = np.mgrid[0 : plane.shape[0], 0 : plane.shape[1]] + 0.5
    return float((plane * xs).sum() / plane.sum()), float((plane * ys).sum() / plane.sum())


@pytest.mark.parametrize("path", LETTERBOX_PATHS)
@pytest.mark.parametrize("height,width", SIZES)
def test_geometry_maps_points_back_to_sub_pixel_exactness(path, height, width):
    """A blob's position survives letterbox + geometry; mapping points forward and back is the identity."""
    rng = np.random.default_rng(height * 7 + width)
    scale, *_ = image_ops.letterbox_geometry(height, width, INPUT_SIZE, INPUT_SIZE)
    sigma = 4.0 / min(scale, 1.0)  # four input pixels wide at least, so resampling cannot alias it away
    for _ in range(2):
        centre_x, centre_y = rng.uniform(0.4, 0.6) * width, rng.uniform(0.4, 0.6) * height
        gauss_x = np.exp(-((np.arange(width) + 0.5 - centre_x) ** 2) / (2 * sigma**2))
        gauss_y = np.exp(-((np.arange(height) + 0.5 - centre_y) ** 2) / (2 * sigma**2))
        image = (np.outer(gauss_y, gauss_x) * 255).astype(np.float32)[..., None]

        tensor, geometry = run_letterbox(path, image, pad_value=0)
        scale, pad_x, pad_y = (float(v) for v in geometry[:3])
        seen_x, seen_y = centroid(tensor[0])
        true_x, true_y = centroid(image[..., 0])
        assert abs((seen_x - pad_x) / scale - true_x) * scale < 0.01  # in detector-input pixels
        assert abs((seen_y - pad_y) / scale - true_y) * scale < 0.01

    points = rng.uniform(0, 1, (50, 2)) * [width, height]
    forward = points * scale + [pad_x, pad_y]
    assert ((forward >= 0) & (forward <= INPUT_SIZE)).all()
    np.testing.assert_allclose((forward - [pad_x, pad_y]) / scale, points, atol=1e-3)


def assert_same_letterbox(opencv, array, exact: bool, dtype=np.float32) -> None:
    """Same geometry, layout, pixel type and border to the bit; pixels exactly equal or within one grey level
    (RESIZE_TOLERANCE in [0, 1])."""
    (tensor, geometry), (expected_tensor, expected_geometry) = opencv, array
    assert tensor.shape == expected_tensor.shape and tensor.flags.c_contiguous
    assert tensor.dtype == expected_tensor.dtype == dtype
    np.testing.assert_array_equal(geometry, expected_geometry)
    assert geometry.dtype == np.float32
    _, pad_x, pad_y, width, height = (int(v) for v in expected_geometry)
    _, _, _, resized_width, resized_height = image_ops.letterbox_geometry(height, width, INPUT_SIZE, INPUT_SIZE)
    border = np.ones(tensor.shape[1:], bool)
    border[pad_y : pad_y + resized_height, pad_x : pad_x + resized_width] = False
    np.testing.assert_array_equal(tensor[:, border], expected_tensor[:, border])
    if exact:
        np.testing.assert_array_equal(tensor, expected_tensor)
    else:
        one_level = 1 if tensor.dtype == np.uint8 else RESIZE_TOLERANCE
        np.testing.assert_allclose(tensor.astype(np.float32), expected_tensor.astype(np.float32), rtol=0, atol=one_level)


@pytest.mark.parametrize("xp", ARRAY_MODULES)
@pytest.mark.parametrize("dtype", image_ops.PIXEL_TYPES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("height,width", SIZES + UNSCALED_SIZES + STRIP_SIZES)
def test_opencv_letterbox_matches_the_array_letterbox(xp, dtype, channels, height, width):
    """White noise: a sampling position off by any fraction of a pixel would move values far past the bound."""
    image = np.random.default_rng(height * 3 + width).integers(0, 256, (height, width, channels), dtype=np.uint8)
    unscaled = image_ops.letterbox_geometry(height, width, INPUT_SIZE, INPUT_SIZE)[0] == 1
    assert_same_letterbox(run_letterbox(("opencv", np), image, dtype=dtype),
                          run_letterbox(("array", xp), image, dtype=dtype), exact=unscaled, dtype=dtype)


@pytest.mark.parametrize("path", LETTERBOX_PATHS)
def test_uint8_pixels_are_the_float_pixels_times_255(path):
    """The two pixel types carry the same letterbox: grey levels, or the same levels scaled to [0, 1]."""
    image = smooth_image(480, 1280, 1)
    grey, geometry = run_letterbox(path, image, dtype=np.uint8)
    scaled, same_geometry = run_letterbox(path, image, dtype=np.float32)
    np.testing.assert_array_equal(geometry, same_geometry)
    np.testing.assert_allclose(scaled * 255, grey, rtol=0, atol=0.5 if path[0] == "array" else 1e-4)


def test_only_uint8_and_float32_pixels_are_served():
    with pytest.raises(ValueError, match="uint8.*float32.*float16"):
        image_ops.letterbox_opencv(smooth_image(64, 64, 1), INPUT_SIZE, INPUT_SIZE, 114,
                                   out=np.empty((1, INPUT_SIZE, INPUT_SIZE), np.float16))


def test_opencv_letterbox_resizes_only_when_the_size_changes(monkeypatch):
    def no_resize(*args, **kwargs):
        raise AssertionError("an image kept at scale 1 must not be resized")

    monkeypatch.setattr(image_ops.cv2, "resize", no_resize)
    for height, width in UNSCALED_SIZES:
        tensor, _ = image_ops.letterbox_opencv(smooth_image(height, width, 1), INPUT_SIZE, INPUT_SIZE, 114)
        assert tensor.shape == (1, INPUT_SIZE, INPUT_SIZE)


@pytest.mark.parametrize("xp", ARRAY_MODULES)
@pytest.mark.parametrize("extension", ALL_FORMATS)
@pytest.mark.parametrize("channels,with_template", [(1, False), (3, False), (2, False), (2, True), (1, True)])
@pytest.mark.parametrize("height,width", [(640, 640), (480, 1280), (700, 500)])
def test_opencv_preprocess_matches_the_array_preprocess(xp, extension, channels, with_template, height, width):
    board = smooth_image(height, width, 3)
    encoded = encode(board, extension)
    template = encode(board, ".png") if with_template else None  # registers onto the board with score ~1
    arguments = (encoded, INPUT_SIZE, INPUT_SIZE, channels, 114, 10**7, template, registration_settings())
    for dtype in image_ops.PIXEL_TYPES:
        array = tuple(to_numpy(a) for a in image_ops.preprocess_image(*arguments, dtype=dtype, xp=xp))
        opencv = image_ops.preprocess_image_opencv(*arguments, dtype=dtype)
        assert_same_letterbox(opencv[:2], array[:2], exact=(height, width) == (640, 640), dtype=dtype)
    np.testing.assert_array_equal(opencv[2], array[2])  # the one registration, on the CPU for both
    assert opencv[0].shape[0] == channels and (opencv[2][3] > 0.9 if with_template else not opencv[2].any())


def test_opencv_preprocess_rejects_what_the_array_preprocess_rejects():
    arguments = (INPUT_SIZE, INPUT_SIZE, 1, 114, 10**6)
    for data, reason in [(b"", "empty image data"), (b"%PDF-1.7", "not a JPEG"),
                         (encode(smooth_image(40, 60, 1), ".png")[:-20], "truncated"),
                         (jpeg_declaring(2000, 1000), "over the limit of 1000000 pixels")]:
        for preprocess in (image_ops.preprocess_image, image_ops.preprocess_image_opencv):
            with pytest.raises(ImageRejected, match=reason):
                preprocess(data, *arguments)


# --- decoding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("extension", ALL_FORMATS)
@pytest.mark.parametrize("source_channels", [1, 3])
def test_decode_gives_the_requested_channels(extension, source_channels):
    source = smooth_image(48, 80, source_channels)
    encoded = encode(source, extension)
    reference_bgr = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR)

    gray = image_ops.decode_image(encoded, channels=1, max_pixels=10**6)
    rgb = image_ops.decode_image(encoded, channels=3, max_pixels=10**6)
    assert gray.shape == (48, 80, 1) and gray.dtype == np.uint8
    assert rgb.shape == (48, 80, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(gray[..., 0], cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_GRAYSCALE))
    np.testing.assert_array_equal(rgb, reference_bgr[..., ::-1])
    if extension in LOSSLESS_FORMATS and source_channels == 1:
        np.testing.assert_array_equal(gray[..., 0], source[..., 0])


def test_sixteen_bit_png_decodes_to_eight_bits():
    deep = (smooth_image(30, 40, 1).astype(np.uint16) * 257)[..., 0]
    decoded = image_ops.decode_image(encode(deep, ".png"), channels=1, max_pixels=10**6)
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded[..., 0], (deep >> 8).astype(np.uint8))


def test_preprocess_image_uses_the_served_settings():
    contract = served_contract()
    image = smooth_image(640, 640, 1)
    tensor, geometry, registration = preprocess_as_served(encode(image, ".png"))
    assert tensor.shape == (contract.channels, contract.input_height, contract.input_width)
    np.testing.assert_array_equal(geometry, [1, 0, 0, 640, 640])
    np.testing.assert_array_equal(registration, [0, 0, 0, 0])  # no template sent
    assert tensor.dtype == contract.pixel_type == np.uint8  # grey levels: the detector's graph scales them
    np.testing.assert_array_equal(tensor[0], image[..., 0])
    if contract.channels == image_ops.TEMPLATE_CHANNELS:  # no template: the border fill throughout
        np.testing.assert_array_equal(tensor[1], np.full_like(tensor[1], contract.pad_value))


# --- rejection of bad input -----------------------------------------------------------------------


def test_empty_data_is_rejected():
    with pytest.raises(ImageRejected, match=r"empty image data \(0 bytes\)"):
        image_ops.decode_image(b"", channels=1, max_pixels=10**6)


@pytest.mark.parametrize("data", [b"%PDF-1.7 not an image", b"\x00" * 100, b"GIF89a" + b"\x00" * 50, b"\xff\xd8"])
def test_non_images_are_rejected(data):
    with pytest.raises(ImageRejected, match="not a JPEG, PNG, BMP or TIFF image"):
        image_ops.decode_image(data, channels=1, max_pixels=10**6)


@pytest.mark.parametrize("extension", [".jpg", ".png", ".bmp"])
def test_every_truncation_is_rejected(extension):
    """OpenCV 4.11 fails on a JPEG/PNG/BMP cut anywhere, even one missing only its end-of-image marker."""
    encoded = encode(smooth_image(24, 40, 1), extension)
    for length in range(1, len(encoded)):
        with pytest.raises(ImageRejected, match="truncated|not a JPEG"):
            image_ops.decode_image(encoded[:length], channels=1, max_pixels=10**6)


@pytest.mark.parametrize("extension,expected", [
    (".jpg", "could not be decoded: the data is truncated or corrupt"),
    (".png", "could not be decoded: the data is truncated or corrupt"),
    (".bmp", "could not be decoded: the data is truncated or corrupt"),
    (".tiff", "header is cut short"),  # OpenCV writes the TIFF directory after the pixels
])
@pytest.mark.parametrize("channels", [1, 3])
def test_image_cut_in_half_is_rejected_as_truncated(extension, expected, channels):
    encoded = encode(smooth_image(120, 160, 3), extension)
    with pytest.raises(ImageRejected, match=expected):
        image_ops.decode_image(encoded[: len(encoded) // 2], channels=channels, max_pixels=10**6)


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) is rewritten to declare width x height."""
    data = bytearray(encode(smooth_image(16, 16, 1), ".jpg"))
    frame = data.index(b"\xff\xc0")
    data[frame + 5 : frame + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@pytest.mark.parametrize("preprocess", [image_ops.preprocess_image, image_ops.preprocess_image_opencv])
def test_pixel_limit_is_checked_from_the_header_before_decoding(monkeypatch, preprocess):
    def no_decoding(*args):
        raise AssertionError("the pixels must not be decoded")

    monkeypatch.setattr(image_ops.cv2, "imdecode", no_decoding)
    with pytest.raises(ImageRejected, match=r"declares 60000x50000 = 3000000000 pixels, over the limit of 40000000"):
        preprocess(jpeg_declaring(60000, 50000), INPUT_SIZE, INPUT_SIZE, 1, 114, 40_000_000)


@pytest.mark.parametrize("extension", ALL_FORMATS)
def test_pixel_limit_is_inclusive(extension):
    encoded = encode(smooth_image(50, 60, 1), extension)
    assert image_ops.decode_image(encoded, channels=1, max_pixels=3000).shape == (50, 60, 1)
    with pytest.raises(ImageRejected, match=r"declares 60x50 = 3000 pixels, over the limit of 2999 pixels"):
        image_ops.decode_image(encoded, channels=1, max_pixels=2999)


def test_opencv_pixel_limit_from_the_environment_is_reported():
    """The preprocess model sets OPENCV_IO_MAX_IMAGE_PIXELS before importing cv2; OpenCV then refuses too."""
    script = (
        "import cv2, numpy as np\n"
        "from tools.pipeline_math import image_ops\n"
        "data = cv2.imencode('.png', np.zeros((20, 30), np.uint8))[1].tobytes()\n"
        "try:\n"
        "    image_ops.decode_image(data, channels=1, max_pixels=10**6)\n"
        "except image_ops.ImageRejected as exc:\n"
        "    print(exc)\n"
    )
    env = dict(os.environ, OPENCV_IO_MAX_IMAGE_PIXELS="100")
    result = subprocess.run([sys.executable, "-c", script], cwd=MODELS_ROOT.parent, env=env, capture_output=True, text=True, check=True)
    assert "PNG image (30x20) could not be decoded" in result.stdout
    assert "CV_IO_MAX_IMAGE_PIXELS" in result.stdout


def test_unsupported_channel_count_is_a_programming_error():
    with pytest.raises(ValueError, match="channels must be one of"):
        image_ops.decode_image(encode(smooth_image(8, 8, 1), ".png"), channels=2, max_pixels=10**6)
