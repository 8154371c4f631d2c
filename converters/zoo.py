"""Small reference models built in-tree, with no downloads: the demo, the tests and the
benchmarks use them. Needs the ``torch`` extra (and scikit-learn for the digits data).

- :func:`train_digits_cnn`: a small CNN trained on scikit-learn's bundled 8x8 digits.
- :func:`resnet_style`, :func:`mobilenet_v2_style`: untrained nets with the structure that
  matters to conversion (BatchNorm, residual Adds, depthwise and grouped convs, ReLU6).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class DigitsData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def digits_data(*, seed: int = 0, test_fraction: float = 0.3) -> DigitsData:
    """scikit-learn's 1,797 8x8 digits, scaled to [0, 1], shaped N x 1 x 8 x 8, split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * test_fraction)
    te, tr = idx[:n_test], idx[n_test:]
    return DigitsData(x[tr], y[tr], x[te], y[te])


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the install
        from edge_agent.errors import ConfigError

        raise ConfigError("this needs PyTorch; install the 'torch' extra") from exc
    return torch


def digits_cnn(width: int = 16) -> Any:
    torch = _torch()
    nn = torch.nn
    w = width
    return nn.Sequential(
        nn.Conv2d(1, w, 3, padding=1, bias=False),
        nn.BatchNorm2d(w),
        nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, padding=1, bias=False),
        nn.BatchNorm2d(2 * w),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False),
        nn.BatchNorm2d(4 * w),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * w, 10),
    )


def train_digits_cnn(
    data: DigitsData | None = None, *, epochs: int = 12, seed: int = 0, width: int = 16
) -> tuple[Any, DigitsData]:
    """Train the digits CNN (a few seconds on 2 cores); returns (model in eval mode, data)."""
    torch = _torch()
    data = data or digits_data(seed=seed)
    torch.manual_seed(seed)
    model = digits_cnn(width)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.from_numpy(data.x_train)
    y = torch.from_numpy(data.y_train)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            b = perm[i : i + 64]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[b]), y[b])
            loss.backward()
            opt.step()
    model.eval()
    return model, data


def torch_accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    torch = _torch()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float(np.mean(pred == y) * 100)


def export_onnx(
    model: Any,
    shape: tuple[int, ...],
    *,
    opset: int = 17,
    input_name: str = "input",
    output_name: str = "logits",
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
) -> bytes:
    """Export with torch's TorchScript-based exporter (fast; writes any opset >= 7).
    ``output_names`` names the outputs of a model with several (else ``output_name``)."""
    torch = _torch()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (torch.zeros(*shape),),
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=[input_name],
            output_names=list(output_names or [output_name]),
            dynamic_axes={input_name: {0: "batch"}} if dynamic_batch else None,
            do_constant_folding=True,
        )
    return buf.getvalue()


def _randomize_bn(model: Any, seed: int) -> Any:
    """Give BatchNorms non-trivial statistics, as a trained net has."""
    torch = _torch()
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=g) * 0.2 - 0.1)
    return model.eval()


def resnet_style(*, width: int = 32, classes: int = 10, seed: int = 0) -> Any:
    """A ResNet-style net: stem, three stages of two residual blocks, global pool, linear."""
    torch = _torch()
    nn = torch.nn

    class Block(nn.Module):  # type: ignore[name-defined]
        def __init__(self, c: int) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.b1 = nn.BatchNorm2d(c)
            self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.b2 = nn.BatchNorm2d(c)

        def forward(self, x: Any) -> Any:
            y = torch.relu(self.b1(self.c1(x)))
            return torch.relu(x + self.b2(self.c2(y)))

    def down(cin: int, cout: int) -> Any:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
        )

    w = width
    torch.manual_seed(seed)
    model = nn.Sequential(
        down(3, w),
        Block(w),
        Block(w),
        down(w, 2 * w),
        Block(2 * w),
        Block(2 * w),
        down(2 * w, 4 * w),
        Block(4 * w),
        Block(4 * w),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * w, classes),
    )
    return _randomize_bn(model, seed)


def mobilenet_v2_style(
    *, width_mult: float = 1.0, classes: int = 1000, seed: int = 0, grouped: bool = False
) -> Any:
    """MobileNetV2's real layout (inverted residuals: 1x1 expand, 3x3 depthwise, 1x1 project,
    ReLU6, residual Adds; 3.5 M parameters at width 1.0 and 1,000 classes). ``grouped`` adds one
    grouped (non-depthwise) 3x3 conv after the stem."""
    torch = _torch()
    nn = torch.nn

    def ch(c: int) -> int:
        return max(8, int(c * width_mult + 4) // 8 * 8)

    class Inverted(nn.Module):  # type: ignore[name-defined]
        def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
            super().__init__()
            hid = cin * expand
            self.use_res = stride == 1 and cin == cout
            layers: list[Any] = []
            if expand != 1:
                layers += [nn.Conv2d(cin, hid, 1, bias=False), nn.BatchNorm2d(hid), nn.ReLU6()]
            layers += [
                nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False),
                nn.BatchNorm2d(hid),
                nn.ReLU6(),
                nn.Conv2d(hid, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
            ]
            self.body = nn.Sequential(*layers)

        def forward(self, x: Any) -> Any:
            y = self.body(x)
            return x + y if self.use_res else y

    torch.manual_seed(seed)
    cin = ch(32)
    layers: list[Any] = [nn.Conv2d(3, cin, 3, 2, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6()]
    if grouped:
        layers += [
            nn.Conv2d(cin, cin, 3, 1, 1, groups=4, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU6(),
        ]
    for t, c, n, s in (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ):
        for i in range(n):
            layers.append(Inverted(cin, ch(c), s if i == 0 else 1, t))
            cin = ch(c)
    last = max(1280, ch(1280))
    layers += [
        nn.Conv2d(cin, last, 1, bias=False),
        nn.BatchNorm2d(last),
        nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(last, classes),
    ]
    return _randomize_bn(nn.Sequential(*layers), seed)


def se_hardswish_cnn(*, width: int = 16, classes: int = 10, seed: int = 0) -> Any:
    """A MobileNetV3-like CNN: HardSwish, squeeze-excitation (global pool, two 1x1 convs,
    HardSigmoid, a channel-wise Mul) and a depthwise conv."""
    torch = _torch()
    nn = torch.nn

    class SE(nn.Module):  # type: ignore[name-defined]
        def __init__(self, c: int) -> None:
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc1 = nn.Conv2d(c, max(c // 4, 4), 1)
            self.fc2 = nn.Conv2d(max(c // 4, 4), c, 1)

        def forward(self, x: Any) -> Any:
            s = nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(self.pool(x)))))
            return x * s

    w = width
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.Hardswish(),
        nn.Conv2d(w, w, 3, 1, 1, groups=w, bias=False), nn.BatchNorm2d(w), nn.Hardswish(),
        SE(w),
        nn.Conv2d(w, 2 * w, 1, bias=False), nn.BatchNorm2d(2 * w), nn.Hardswish(),
        nn.Conv2d(2 * w, 2 * w, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * w), nn.Hardswish(),
        SE(2 * w),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, classes),
    )  # fmt: skip
    return _randomize_bn(model, seed)


def tiny_unet(*, width: int = 8, classes: int = 3, seed: int = 0) -> Any:
    """A two-level UNet: strided-conv downsampling, bilinear and nearest Resize up, skip
    Concats, a per-pixel class map."""
    torch = _torch()
    nn = torch.nn

    def block(cin: int, cout: int, stride: int = 1) -> Any:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
        )

    class UNet(nn.Module):  # type: ignore[name-defined]
        def __init__(self, w: int) -> None:
            super().__init__()
            self.e1, self.e2, self.e3 = block(3, w), block(w, 2 * w, 2), block(2 * w, 4 * w, 2)
            self.d2, self.d1 = block(6 * w, 2 * w), block(3 * w, w)
            self.head = nn.Conv2d(w, classes, 1)

        def forward(self, x: Any) -> Any:
            f = nn.functional
            a = self.e1(x)
            b = self.e2(a)
            c = self.e3(b)
            up = f.interpolate(c, scale_factor=2, mode="bilinear", align_corners=False)
            d = self.d2(torch.cat([up, b], 1))
            up = f.interpolate(d, scale_factor=2, mode="nearest")
            return self.head(self.d1(torch.cat([up, a], 1)))

    torch.manual_seed(seed)
    return _randomize_bn(UNet(width), seed)


def conv1d_sensor(*, channels: int = 6, window: int = 64, classes: int = 5, seed: int = 0) -> Any:
    """A 1-D conv net over a sensor window (N, channels, window): Conv1d, BatchNorm, ReLU,
    MaxPool1d, global average, linear (an IMU activity classifier's shape)."""
    torch = _torch()
    nn = torch.nn
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv1d(channels, 16, 5, padding=2, bias=False), nn.BatchNorm1d(16), nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(16, 32, 3, padding=1, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, classes),
    )  # fmt: skip
    return _randomize_bn(model, seed)
