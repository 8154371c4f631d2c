"""The TensorFlow side of the TFLite benchmark, run with a Python that has tensorflow and tf2onnx
(``make bench`` makes ``.venv-tf`` for it; the project itself never needs TensorFlow).

Builds a Keras MobileNetV2 (224 x 224, width 1.0, 1,000 classes and logits out, untrained weights with
non-trivial BatchNorm statistics), then writes into OUT_DIR:

- ``tf-fp32.tflite``: ``TFLiteConverter``'s float model;
- ``tf-fp16.tflite``: ``TFLiteConverter``'s float16-weight model (``Optimize.DEFAULT`` with
  ``supported_types = [tf.float16]``: fp16 constants behind DEQUANTIZE, float32 compute and I/O),
  the form mobile SDKs ship float models in;
- ``tf-int8.tflite``: ``TFLiteConverter``'s full-integer model (``TFLITE_BUILTINS_INT8``, a
  representative dataset of the calibration samples, float input and output);
- ``model.onnx``: the same model exported by tf2onnx with an NCHW input (``inputs_as_nchw``);
- ``calibration.npz``: the calibration samples, ``x`` NCHW for our converter and ``x_nhwc``;
- ``tf.json``: versions and the conversion times.

Usage: python benchmarks/tf_reference.py OUT_DIR [--samples N] [--size 224]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np


def main() -> int:
    import tensorflow as tf
    import tf2onnx

    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tf.keras.utils.set_random_seed(0)
    size = args.size
    model = tf.keras.applications.MobileNetV2(
        input_shape=(size, size, 3),
        weights=None,
        classes=1000,
        alpha=1.0,
        classifier_activation=None,  # logits: a softmax over 1,000 untrained classes is flat
    )
    rng = np.random.default_rng(0)
    for layer in model.layers:  # BatchNorm statistics as a trained net has them
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            c = layer.get_weights()[0].shape[0]
            layer.set_weights(
                [
                    (rng.random(c) + 0.5).astype(np.float32),
                    (rng.random(c) * 0.2 - 0.1).astype(np.float32),
                    (rng.random(c) * 0.4 - 0.2).astype(np.float32),
                    (rng.random(c) + 0.5).astype(np.float32),
                ]
            )
    x = rng.random((args.samples, size, size, 3), dtype=np.float32) * 2 - 1
    np.savez(args.out / "calibration.npz", x=x.transpose(0, 3, 1, 2).copy(), x_nhwc=x)

    spec = tf.TensorSpec((1, size, size, 3), tf.float32, name="input")
    fn = tf.function(lambda t: model(t, training=False), input_signature=[spec])
    times = {}

    t0 = time.perf_counter()
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    (args.out / "tf-fp32.tflite").write_bytes(conv.convert())
    times["tf_fp32_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.target_spec.supported_types = [tf.float16]
    (args.out / "tf-fp16.tflite").write_bytes(conv.convert())
    times["tf_fp16_s"] = time.perf_counter() - t0

    def representative() -> object:
        for i in range(len(x)):
            yield [x[i : i + 1]]

    t0 = time.perf_counter()
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    (args.out / "tf-int8.tflite").write_bytes(conv.convert())
    times["tf_int8_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    onnx_model, _ = tf2onnx.convert.from_function(
        fn, input_signature=[spec], opset=17, inputs_as_nchw=["input"]
    )
    (args.out / "model.onnx").write_bytes(onnx_model.SerializeToString())
    times["tf2onnx_s"] = time.perf_counter() - t0
    info = {
        "tensorflow": tf.__version__,
        "tf2onnx": tf2onnx.__version__,
        "keras_model": f"MobileNetV2 {size}x{size}, alpha 1.0, 1000 classes",
        "params": int(model.count_params()),
        "samples": len(x),
        **{k: round(v, 2) for k, v in times.items()},
    }
    (args.out / "tf.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
