"""Image preprocessing, defined once: the converter calibrates with it, the bundle manifest
records it, and the agent applies the same spec to camera frames.

Vectorized with OpenCV and numpy; nothing per pixel in Python. Normalization is folded into one
multiply-add: ``x * (scale / std) - mean / std``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

from edge_agent.common.buffers import BufferPool
from edge_agent.errors import ConfigError, DataError
from edge_agent.model.formats import RESIZE_MODES

CHANNEL_ORDERS = ("rgb", "bgr", "gray")
LAYOUTS = ("nchw", "nhwc")
LETTERBOX_FILL = 114
#: ``resize = pad-right`` on a model of dynamic width: a line is fed at most this many times
#: the width given (``[preprocess] width``) wide; a longer one is squeezed to that
MAX_GROWTH = 8


class DynamicSizeError(ConfigError):
    """The model's image input leaves its height or width dynamic and none was given."""


@dataclass(frozen=True)
class PreprocessSpec:
    """How a raw BGR uint8 image becomes the model's input tensor."""

    width: int
    height: int
    resize: str = "stretch"
    channels: str = "rgb"
    layout: str = "nchw"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise ConfigError(f"preprocess: size {self.width}x{self.height}: must be > 0")
        if self.resize not in RESIZE_MODES:
            raise ConfigError(
                f"preprocess: resize = {self.resize!r}: expected one of {RESIZE_MODES}"
            )
        if self.channels not in CHANNEL_ORDERS:
            raise ConfigError(
                f"preprocess: channels = {self.channels!r}: expected one of {CHANNEL_ORDERS}"
            )
        if self.layout not in LAYOUTS:
            raise ConfigError(f"preprocess: layout = {self.layout!r}: expected one of {LAYOUTS}")
        n = self.num_channels
        for key, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, n):
                raise ConfigError(
                    f"preprocess: {key} = {list(values)}: give "
                    f"{'1 value' if n == 1 else f'1 or {n} values'} for {self.channels} input"
                )
        if any(s == 0 for s in self.std):
            raise ConfigError(f"preprocess: std = {list(self.std)}: values must be non-zero")

    @property
    def num_channels(self) -> int:
        return 1 if self.channels == "gray" else 3

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessSpec:
        known = set(cls.__dataclass_fields__)
        extra = sorted(set(data) - known)
        if extra:
            raise ConfigError(f"preprocess: unknown keys {extra} (known: {sorted(known)})")
        values = dict(data)
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(float(v) for v in values[key])
        return cls(**values)

    @classmethod
    def for_input_shape(cls, shape: Sequence[int | None], **overrides: Any) -> PreprocessSpec:
        """Derive size, layout and channel count from a 4-D model input shape."""
        if len(shape) != 4:
            raise ConfigError(f"image input must be 4-D (N,C,H,W or N,H,W,C), not {list(shape)}")
        layout = overrides.pop("layout", None)
        if layout is None:
            layout = "nchw" if shape[1] in (1, 3) else "nhwc"
        h, w, c = (shape[2], shape[3], shape[1]) if layout == "nchw" else shape[1:4]
        sizes = {"height": h, "width": w}
        for key, fixed in sizes.items():  # the user's size fills a dynamic one, never a fixed
            given = overrides.pop(key, None)
            if given is None:
                continue
            if isinstance(given, bool) or not isinstance(given, int) or given <= 0:
                raise ConfigError(f"preprocess: {key} = {given!r}: must be a whole number > 0")
            if isinstance(fixed, int) and fixed > 0 and fixed != given:
                raise ConfigError(
                    f"preprocess: {key} = {given}: the model's input {list(shape)} fixes it "
                    f"at {fixed}"
                )
            sizes[key] = given
        h, w = sizes["height"], sizes["width"]
        if not isinstance(h, int) or not isinstance(w, int) or h <= 0 or w <= 0:
            raise DynamicSizeError(
                f"cannot derive an image size from the model input shape {list(shape)}: give "
                "the dynamic side in [preprocess] width / height (--width, --height)"
            )
        if c not in (1, 3):
            raise ConfigError(
                f"cannot derive an image size from the model input shape {list(shape)}"
            )
        if c == 1:
            overrides.setdefault("channels", "gray")
        return cls(width=int(w), height=int(h), layout=layout, **overrides)


@dataclass(frozen=True)
class Geometry:
    """Where a source image landed in the model input: input = source * scale + pad (per axis).
    Postprocessing inverts it to put boxes back in source pixels."""

    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float

    def to_source(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (x - self.pad_x) / self.scale_x, (y - self.pad_y) / self.scale_y


class Preprocessor:
    """Applies a PreprocessSpec; constants are computed once, not per frame."""

    def geometry(self, height: int, width: int) -> Geometry:
        """The transform this preprocessor applies to a ``height`` x ``width`` image."""
        spec = self.spec
        if spec.resize == "letterbox":
            r = min(spec.width / width, spec.height / height)
            nw, nh = max(1, round(width * r)), max(1, round(height * r))
            return Geometry(
                nw / width, nh / height, (spec.width - nw) // 2, (spec.height - nh) // 2
            )
        if spec.resize == "crop":  # the pad is negative: the part cut off before
            nw, nh = _cover(width, height, spec.width, spec.height)
            left, top = _crop_offsets(nw, nh, spec.width, spec.height)
            return Geometry(nw / width, nh / height, -left, -top)
        if spec.resize == "pad-right":
            nw, _ = self._fit_height(width, height)
            return Geometry(nw / width, spec.height / height, 0.0, 0.0)
        return Geometry(spec.width / width, spec.height / height, 0.0, 0.0)

    def __init__(
        self, spec: PreprocessSpec, *, pixels_as: str | None = None, grow: bool = False
    ) -> None:
        """``pixels_as`` ("uint8" or "int8"): the model's input is quantized so that its
        integers are the pixels themselves (uint8: the pixel; int8: the pixel - 128, the
        scaling the spec gives): an NHWC input gets them so, with no float pass (and none back
        to integers in the runtime): 1.2 ms less a frame at 320x320 on the 2-core Xeon.

        ``grow`` (``resize = pad-right``, a model whose input width is dynamic): a line longer
        than the spec's width is fed wider, in proportion (up to :data:`MAX_GROWTH` times the
        width, squeezed beyond), as PaddleOCR feeds its recognizers; otherwise it is squeezed
        to the width."""
        if pixels_as not in (None, "uint8", "int8"):
            raise ValueError(f"pixels_as = {pixels_as!r}: expected uint8 or int8")
        self.spec = spec
        self.grow = grow and spec.resize == "pad-right"
        self.pixels_as = pixels_as if spec.layout == "nhwc" else None
        #: the output tensors, reused once nobody holds them (a 256x256 input is 0.8 MB a frame)
        self._outputs = BufferPool()
        n = spec.num_channels
        std = np.broadcast_to(np.asarray(spec.std, np.float32), (n,))
        mean = np.broadcast_to(np.asarray(spec.mean, np.float32), (n,))
        self._mul = (np.float32(spec.scale) / std).astype(np.float32)
        self._add = (-mean / std).astype(np.float32)
        self._order = (2, 1, 0) if spec.channels == "rgb" else (0, 1, 2)  # planes of BGR
        #: one scale and one offset for every channel (the usual 1/255, no mean): scalars
        self._uniform = bool(
            np.all(self._mul == self._mul[0]) and np.all(self._add == self._add[0])
        )
        #: the offsets, None when they are all 0 (nothing to add)
        self._offsets = self._add if np.any(self._add) else None
        #: NHWC with per-channel constants: them as rows of the output's width (channels
        #: interleaved), for one long inner loop a row
        widest = spec.width * (MAX_GROWTH if self.grow else 1)  # the widest input fed
        offsets = self._offsets
        self._rows = (
            np.tile(self._mul, widest),
            None if offsets is None else np.tile(offsets, widest),
        )
        #: ``pad-right`` fed the pixels as integers: the pixel (per channel, in the output's
        #: order) whose scaled value is 0, what the rest of the width is padded with
        zero = np.broadcast_to(np.asarray(spec.mean, np.float64) / spec.scale, (n,))
        self._pad_pixels = np.clip(np.rint(zero), 0, 255).astype(np.uint8)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """BGR (or gray) uint8 HxW[xC] image -> float32 batch of one, in the spec's layout
        (with :attr:`pixels_as`, an NHWC batch of that integer type)."""
        spec = self.spec
        if image is None or image.ndim not in (2, 3) or image.size == 0:
            raise DataError(f"not an image: shape {getattr(image, 'shape', None)}")
        width = spec.width  # of the output: the image fills it, or its left (pad-right)
        if spec.resize == "letterbox":
            image = letterbox(image, spec.width, spec.height)
        elif spec.resize == "crop":
            image = center_crop(image, spec.width, spec.height)
        elif spec.resize == "pad-right":
            w, width = self._fit_height(image.shape[1], image.shape[0])
            image = cv2.resize(image, (w, spec.height), interpolation=cv2.INTER_LINEAR)
        elif image.shape[1] != spec.width or image.shape[0] != spec.height:
            image = cv2.resize(image, (spec.width, spec.height), interpolation=cv2.INTER_LINEAR)
        h, w = spec.height, image.shape[1]
        if spec.channels == "gray":
            if image.ndim == 3:
                image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
            if self.pixels_as is not None:
                return self._pixels(image, (1, h, width, 1))
            out = self._outputs.take((h, width), np.float32)
            _scale_into(image, out[:, :w], self._mul[0], self._offset(0))
            if w < width:
                out[:, w:] = 0.0
            return out[None, None] if spec.layout == "nchw" else out[None, :, :, None]
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        if spec.layout == "nhwc":
            if spec.channels == "rgb":
                image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
            if self.pixels_as is not None:
                return self._pixels(image, (1, h, width, 3))
            out = self._outputs.take((1, h, width, 3), np.float32)
            if w < width:
                out[0, :, w:] = 0.0
            if self._uniform:
                _scale_into(image, out[0, :, :w], self._mul[0], self._offset(0))
                return out
            # Per-channel constants as rows as wide as the image (channels interleaved): numpy
            # then runs one long inner loop a row, not one of 3 elements a pixel (~10x slower).
            mul, add = self._rows  # as wide as the widest input (grow: MAX_GROWTH x the width)
            n = w * 3
            _scale_into(
                image.reshape(h, n),
                out[0].reshape(h, width * 3)[:, :n],
                mul[:n],
                None if add is None else add[:n],
            )
            return out
        # NCHW: split the planes and scale each straight into its place in the output; 3-4x
        # faster than converting, normalizing and transposing the interleaved image.
        planes = cv2.split(image)  # B, G, R
        out = self._outputs.take((1, 3, h, width), np.float32)
        for c, src in enumerate(self._order):
            _scale_into(planes[src], out[0, c, :, :w], self._mul[c], self._offset(c))
        if w < width:
            out[0, :, :, w:] = 0.0
        return out

    def _fit_height(self, width: int, height: int) -> tuple[int, int]:
        """``pad-right``: the width a ``width`` x ``height`` image is resized to, and the
        input's width it is padded to, in PaddleOCR's arithmetic (``resize_norm_img``: the
        input's width ``int(H * max(W / H, w / h))`` when it grows, else W; the image's
        ``ceil(H * w / h)``, at most that), floats as theirs."""
        spec = self.spec
        out = spec.width
        ratio = width / float(height)
        if self.grow:
            grown = int(spec.height * max(spec.width / spec.height, ratio))
            out = min(max(grown, spec.width), MAX_GROWTH * spec.width)
        resized = math.ceil(spec.height * ratio)
        return max(1, min(resized, out)), out

    def _pixels(self, image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """The pixels as the quantized input's integers (:attr:`pixels_as`); the width past
        the image's (``pad-right``) the pixel whose scaled value is 0."""
        out = self._outputs.take(shape, np.uint8)
        w = image.shape[1]
        src = image.reshape((shape[1], w, shape[3]))
        pad = self._pad_pixels[: shape[3]]
        if self.pixels_as == "uint8":
            np.copyto(out[0, :, :w], src)
        else:  # the pixel - 128, as two's complement: one pass
            np.bitwise_xor(src, np.uint8(128), out=out[0, :, :w])
            pad = pad ^ np.uint8(128)
        if w < shape[2]:
            out[0, :, w:] = pad
        return out if self.pixels_as == "uint8" else out.view(np.int8)

    def _offset(self, channel: int) -> np.float32 | None:
        return None if self._offsets is None else self._offsets[channel]


def _scale_into(src: np.ndarray, out: np.ndarray, mul: Any, add: Any | None) -> None:
    """``out = src * mul + add`` in float32, converting ``src`` (uint8) on the way in: one pass
    and no temporary array (``astype`` then ``*=`` and ``+=`` walk the image three times)."""
    np.multiply(src, mul, out=out, casting="unsafe")
    if add is not None:
        np.add(out, add, out=out)


def _cover(w: int, h: int, width: int, height: int) -> tuple[int, int]:
    """The size a ``w`` x ``h`` image is resized to so that it covers ``width`` x ``height``
    with its aspect kept, in torchvision's arithmetic (``Resize(size)``: the side that binds
    exact, the other truncated)."""
    if width * h >= height * w:  # the width binds
        return width, max(height, int(h * width / w))
    return max(width, int(w * height / h)), height


def _crop_offsets(nw: int, nh: int, width: int, height: int) -> tuple[int, int]:
    """Where ``CenterCrop`` cuts (left, top): torchvision's ``int(round(excess / 2.0))``."""
    return round((nw - width) / 2.0), round((nh - height) / 2.0)  # half to even, as theirs


def center_crop(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize keeping the aspect ratio so that the image covers the input, then cut its middle
    (torchvision's ``Resize`` + ``CenterCrop``, as classifiers are evaluated; shrinking uses
    area interpolation, close to their antialiased bilinear)."""
    h, w = image.shape[:2]
    nw, nh = _cover(w, h, width, height)
    if (nw, nh) != (w, h):
        how = cv2.INTER_AREA if nw < w else cv2.INTER_LINEAR  # area when shrinking
        image = cv2.resize(image, (nw, nh), interpolation=how)
    left, top = _crop_offsets(nw, nh, width, height)
    return image[top : top + height, left : left + width]


def letterbox(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize keeping the aspect ratio, padding the rest with grey (the YOLO convention)."""
    h, w = image.shape[:2]
    r = min(width / w, height / h)
    nw, nh = max(1, round(w * r)), max(1, round(h * r))
    resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    top, left = (height - nh) // 2, (width - nw) // 2
    return cv2.copyMakeBorder(
        resized,
        top,
        height - nh - top,
        left,
        width - nw - left,
        cv2.BORDER_CONSTANT,
        value=(LETTERBOX_FILL,) * (1 if image.ndim == 2 else image.shape[2]),
    )
