"""The image preprocessing against a plain float64 reference, for every layout, channel order
and kind of normalization (one scale for all channels, or a mean and std per channel)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from edge_agent.model.preprocess import MAX_GROWTH, Preprocessor, PreprocessSpec, letterbox


def _reference(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """What the spec says, written the slow and obvious way."""
    if spec.resize == "letterbox":
        image = letterbox(image, spec.width, spec.height)
    elif spec.resize == "crop":  # 120x90 (h x w) into 48x40: 90 -> 48 wide, 120 -> 64 tall
        assert (image.shape[:2], spec.width, spec.height) == ((120, 90), 48, 40)
        image = cv2.resize(image, (48, 64), interpolation=cv2.INTER_AREA)[12:52]
    elif spec.resize == "pad-right":  # 120x90 into 48x40: 40 tall, 30 wide, 18 zeros right
        assert (image.shape[:2], spec.width, spec.height) == ((120, 90), 48, 40)
        image = cv2.resize(image, (30, 40), interpolation=cv2.INTER_LINEAR)
    else:
        image = cv2.resize(image, (spec.width, spec.height), interpolation=cv2.INTER_LINEAR)
    if image.ndim == 2 and spec.channels != "gray":
        image = np.repeat(image[:, :, None], 3, axis=2)
    if spec.channels == "gray":
        if image.ndim == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        x = image.astype(np.float64)[:, :, None]
    else:
        x = image.astype(np.float64)
        if spec.channels == "rgb":
            x = x[:, :, ::-1]
    n = x.shape[2]
    mean = np.broadcast_to(np.asarray(spec.mean, np.float64), (n,))
    std = np.broadcast_to(np.asarray(spec.std, np.float64), (n,))
    x = (x * spec.scale - mean) / std
    x = np.pad(x, ((0, 0), (0, spec.width - x.shape[1]), (0, 0)))  # pad-right: zeros
    return (x.transpose(2, 0, 1) if spec.layout == "nchw" else x)[None]


NORMALIZATIONS = {
    "scale only": {"scale": 1 / 255},
    "one mean and std": {"scale": 1 / 255, "mean": (0.5,), "std": (0.5,)},
    "imagenet": {"scale": 1 / 255, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    "raw pixels": {"scale": 1.0},
    "per-channel offset only": {"scale": 1.0, "mean": (104.0, 117.0, 123.0)},
}


@pytest.mark.parametrize("norm", sorted(NORMALIZATIONS))
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("channels", ["rgb", "bgr", "gray"])
@pytest.mark.parametrize("resize", ["stretch", "letterbox", "crop", "pad-right"])
def test_preprocessing_matches_the_reference(
    norm: str, layout: str, channels: str, resize: str
) -> None:
    kw = dict(NORMALIZATIONS[norm])
    if channels == "gray" and len(kw.get("mean", ())) == 3:
        kw["mean"] = kw["mean"][:1]
    if channels == "gray" and len(kw.get("std", ())) == 3:
        kw["std"] = kw["std"][:1]
    spec = PreprocessSpec(
        width=48, height=40, resize=resize, channels=channels, layout=layout, **kw
    )
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)
    image[:, :, 0] //= 4  # channels that differ, so a swapped order shows
    got = Preprocessor(spec)(image)
    want = _reference(image, spec)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def _paddle_resize_norm_img(
    img: np.ndarray,
    shape: tuple[int, int, int],
    max_wh_ratio: float,
    mean: float | np.ndarray = 0.5,
    std: float | np.ndarray = 0.5,
) -> np.ndarray:
    """PaddleOCR's ``TextRecognizer.resize_norm_img`` (tools/infer/predict_rec.py, as RapidOCR
    copies it), written out from its arithmetic: the input's width ``int(H * max_wh_ratio)``,
    the line ``ceil(H * w / h)`` wide (at most that), BGR, (pixel / 255 - 0.5) / 0.5, zeros to
    the right. ``max_wh_ratio`` is W / H, or a longer line's w / h (a model of dynamic width).
    ``mean`` and ``std`` are its 0.5s, per channel ``[3, 1, 1]`` here for other models."""
    c, height, _ = shape
    width = int(height * max_wh_ratio)
    h, w = img.shape[:2]
    ratio = w / float(h)
    resized_w = width if math.ceil(height * ratio) > width else math.ceil(height * ratio)
    resized = cv2.resize(img, (resized_w, height)).astype("float32")
    resized = resized.transpose((2, 0, 1)) / 255
    resized -= mean
    resized /= std
    padded = np.zeros((c, height, width), dtype=np.float32)
    padded[:, :, 0:resized_w] = resized
    return padded


@pytest.mark.parametrize(
    "frame", [(30, 100), (48, 320), (20, 500), (60, 40), (33, 211), (8, 1000), (500, 3)]
)
@pytest.mark.parametrize("grow", [False, True])
def test_pad_right_feeds_a_line_as_paddleocr_does(frame: tuple[int, int], grow: bool) -> None:
    """``resize = pad-right`` against PaddleOCR's own arithmetic, to float rounding: a short
    line padded, one of the input's aspect filling it, a long one squeezed to the width (a
    model that fixes it) or fed wider in proportion (``grow``: a model of dynamic width, as
    PaddleOCR feeds those), up to MAX_GROWTH times the width; a tall narrow crop one column
    wide at least. The geometry maps the line's pixels back to the frame."""
    spec = PreprocessSpec(width=320, height=48, resize="pad-right", channels="bgr",
                          scale=1 / 255, mean=(0.5,), std=(0.5,))  # fmt: skip
    pre = Preprocessor(spec, grow=grow)
    image = np.random.default_rng(sum(frame)).integers(0, 256, (*frame, 3), dtype=np.uint8)
    h, w = frame
    ratio = min(max(320 / 48, w / h), 320 * MAX_GROWTH / 48) if grow else 320 / 48
    want = _paddle_resize_norm_img(image, (3, 48, 320), ratio)
    got = pre(image)
    assert got.shape == (1, *want.shape)
    np.testing.assert_allclose(got[0], want, rtol=0, atol=2e-6)
    line = min(math.ceil(48 * w / h), want.shape[2])  # how wide the line is in the input
    assert not got[0, :, :, line:].any()  # zeros of the input (grey pixels) to the right
    geo = pre.geometry(h, w)
    x, y = geo.to_source(np.array([line]), np.array([48]))
    np.testing.assert_allclose([x[0], y[0]], [w, h], rtol=1e-9)
    nhwc = Preprocessor(PreprocessSpec(**{**spec.to_dict(), "layout": "nhwc"}), grow=grow)
    np.testing.assert_allclose(nhwc(image)[0].transpose(2, 0, 1), want, atol=2e-6)
    mean, std = (0.4, 0.5, 0.6), (0.3, 0.5, 0.7)  # per channel: NHWC's rows of constants
    for layout in ("nchw", "nhwc"):
        each = PreprocessSpec(**{**spec.to_dict(), "layout": layout, "mean": mean, "std": std})
        got = Preprocessor(each, grow=grow)(image)[0]
        per = _paddle_resize_norm_img(image, (3, 48, 320), ratio, np.array(mean)[:, None, None],
                                      np.array(std)[:, None, None])  # fmt: skip
        got = got if layout == "nchw" else got.transpose(2, 0, 1)
        np.testing.assert_allclose(got, per, rtol=0, atol=4e-6)


def test_pad_right_pads_with_the_pixel_that_scales_to_zero() -> None:
    """An input that takes the pixels as its integers (a quantized TFLite recognizer): the
    width past the line gets the pixel whose scaled value is 0 (128 for (pixel / 255 - 0.5) /
    0.5 as uint8, 0 as int8), per channel; per-channel constants and gray likewise."""
    image = np.random.default_rng(5).integers(0, 256, (16, 24, 3), np.uint8)
    spec = PreprocessSpec(width=64, height=16, resize="pad-right", layout="nhwc",
                          channels="bgr", scale=1 / 255, mean=(0.5,), std=(0.5,))  # fmt: skip
    got = Preprocessor(spec, pixels_as="uint8")(image)
    assert got.shape == (1, 16, 64, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[0, :, :24], image)
    assert (got[0, :, 24:] == 128).all()
    got = Preprocessor(spec, pixels_as="int8")(image)
    np.testing.assert_array_equal(got[0, :, :24], image.astype(np.int16) - 128)
    assert got.dtype == np.int8 and (got[0, :, 24:] == 0).all()
    rgb = PreprocessSpec(width=64, height=16, resize="pad-right", layout="nhwc",
                         scale=1.0, mean=(10.0, 20.0, 30.0))  # fmt: skip
    got = Preprocessor(rgb, pixels_as="uint8")(image)
    np.testing.assert_array_equal(got[0, :, :24], image[:, :, ::-1])
    assert (got[0, :, 24:] == [10, 20, 30]).all()
    gray = PreprocessSpec(width=64, height=16, resize="pad-right", layout="nhwc",
                          channels="gray", scale=1.0, mean=(7.0,))  # fmt: skip
    got = Preprocessor(gray, pixels_as="uint8")(image)
    assert got.shape == (1, 16, 64, 1) and (got[0, :, 24:, 0] == 7).all()
    floats = Preprocessor(rgb)(image)  # the float path: zeros
    assert floats.dtype == np.float32 and not floats[0, :, 24:].any()
    np.testing.assert_allclose(floats[0, 0, 0], image[0, 0, ::-1] - [10.0, 20.0, 30.0])


def test_gray_frames_and_frames_already_at_the_input_size() -> None:
    spec = PreprocessSpec(width=32, height=24, layout="nhwc", mean=(0.1, 0.2, 0.3), std=(0.5,))
    pre = Preprocessor(spec)
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (24, 32), dtype=np.uint8)
    np.testing.assert_allclose(pre(gray), _reference(gray, spec), rtol=1e-5, atol=1e-4)
    # a crop (not contiguous) of a frame already at the input size
    big = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    crop = big[5:29, 10:42]
    np.testing.assert_allclose(pre(crop), _reference(crop, spec), rtol=1e-5, atol=1e-4)


def test_pixels_as_the_quantized_inputs_integers_with_no_float_pass() -> None:
    """A quantized input that takes the pixels: uint8 gets them, int8 gets pixel - 128, in
    NHWC (RGB or gray); an NCHW spec keeps the float path."""
    image = np.random.default_rng(4).integers(0, 256, (6, 8, 3), np.uint8)
    rgb = PreprocessSpec(width=8, height=6, layout="nhwc", channels="rgb")
    got = Preprocessor(rgb, pixels_as="uint8")(image)
    assert got.dtype == np.uint8 and got.shape == (1, 6, 8, 3)
    np.testing.assert_array_equal(got[0], image[:, :, ::-1])
    got = Preprocessor(rgb, pixels_as="int8")(image)
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got[0], image[:, :, ::-1].astype(np.int16) - 128)
    gray = PreprocessSpec(width=8, height=6, layout="nhwc", channels="gray")
    got = Preprocessor(gray, pixels_as="uint8")(image)
    assert got.shape == (1, 6, 8, 1) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[0, :, :, 0], cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
    nchw = PreprocessSpec(width=8, height=6, layout="nchw", channels="rgb")
    assert Preprocessor(nchw, pixels_as="uint8")(image).dtype == np.float32


def test_crop_keeps_the_middle_and_its_geometry_maps_back() -> None:
    """``resize = crop``: a 120x90 (h x w) frame into 48x40 keeps the aspect (90 -> 48 wide,
    120 -> 64 tall) and cuts 12 rows off the top and the bottom; the geometry maps an input
    pixel back to where it came from in the frame."""
    spec = PreprocessSpec(width=48, height=40, resize="crop", layout="nhwc", scale=1.0)
    pre = Preprocessor(spec)
    image = np.zeros((120, 90, 3), np.uint8)
    image[:, :, 1] = np.arange(120, dtype=np.uint8)[:, None]  # green = the row
    out = pre(image)
    assert out.shape == (1, 40, 48, 3)
    g = pre.geometry(120, 90)
    assert (g.scale_x, g.scale_y, g.pad_x, g.pad_y) == (48 / 90, 64 / 120, 0, -12)
    x, y = g.to_source(np.array([24.0]), np.array([0.0, 39.0]))
    assert x[0] == pytest.approx(45.0) and y.tolist() == pytest.approx([22.5, 95.625])
    rows = out[0, [0, 39], 24, 1]  # the green the top and bottom input rows hold
    assert abs(rows[0] - 22.5) <= 2 and abs(rows[1] - 95.6) <= 2


@pytest.mark.parametrize(
    ("frame", "cut"),
    [((30, 50), (53, 32, 10, 0)),  # landscape: 50x30 -> 53x32, 21 over: left int(round(10.5))
     ((480, 640), (42, 32, 5, 0)),  # 640x480 -> 42x32 (torchvision truncates 42.67)
     ((32, 32), (32, 32, 0, 0)),  # already the input size: no resize
     ((7, 3), (32, 74, 0, 21))],  # tiny and tall: enlarged, 42 rows over
)  # fmt: skip
def test_crop_cuts_as_torchvision_does(frame: tuple[int, int], cut: tuple[int, ...]) -> None:
    """Resize(32) + CenterCrop(32) in torchvision's arithmetic: the shorter side exact, the
    longer truncated, the cut at int(round(excess / 2.0)); gray frames and NHWC per-channel
    constants through a cut that is not contiguous."""
    nw, nh, left, top = cut
    rng = np.random.default_rng(2)
    for image in (rng.integers(0, 256, (*frame, 3), dtype=np.uint8),
                  rng.integers(0, 256, frame, dtype=np.uint8)):  # fmt: skip
        spec = PreprocessSpec(width=32, height=32, resize="crop", layout="nhwc",
                              mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7))  # fmt: skip
        pre = Preprocessor(spec)
        g = pre.geometry(*frame)
        assert (g.pad_x, g.pad_y) == (-left, -top)
        assert g.scale_x == pytest.approx(nw / frame[1]) and g.scale_y == pytest.approx(
            nh / frame[0]
        )
        moved = image
        if (nw, nh) != (frame[1], frame[0]):
            how = cv2.INTER_AREA if nw < frame[1] else cv2.INTER_LINEAR
            moved = cv2.resize(image, (nw, nh), interpolation=how)
        cropped = moved[top : top + 32, left : left + 32]
        flat = PreprocessSpec(width=32, height=32, layout="nhwc", mean=spec.mean, std=spec.std)
        np.testing.assert_allclose(pre(image), _reference(np.ascontiguousarray(cropped), flat),
                                   rtol=1e-5, atol=1e-4)  # fmt: skip
