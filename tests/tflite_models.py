"""Tiny real .tflite models written with the flatbuffer schema that ships inside ai-edge-litert
(no TensorFlow): a float fully-connected layer, and the same with int8 input and output
(DEQUANTIZE -> FULLY_CONNECTED -> QUANTIZE), to exercise the runtime's quantized I/O; and an
image model with a quantized input, as mobile SDKs and Coral ship them, that outputs the mean
of what it was fed (to see the preprocessing through the model's own eyes)."""

from __future__ import annotations

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as S


def _tensor(
    name: str, shape: list[int], buf: int, ttype: int, q: tuple[float, int] | None = None
) -> S.TensorT:
    t = S.TensorT()
    t.name, t.shape, t.buffer, t.type = name.encode(), shape, buf, ttype
    if q is not None:
        qp = S.QuantizationParametersT()
        qp.scale, qp.zeroPoint = [q[0]], [q[1]]
        t.quantization = qp
    return t


def _opcode(code: int) -> S.OperatorCodeT:
    oc = S.OperatorCodeT()
    oc.builtinCode = code
    oc.deprecatedBuiltinCode = min(code, 127)
    oc.version = 1
    return oc


def _op(
    opcode: int, inputs: list[int], outputs: list[int], options: tuple[int, object] | None = None
) -> S.OperatorT:
    op = S.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = opcode, inputs, outputs
    if options is not None:
        op.builtinOptionsType, op.builtinOptions = options
    return op


def fully_connected(
    w: np.ndarray,
    b: np.ndarray,
    *,
    int8_io: tuple[tuple[float, int], tuple[float, int]] | None = None,
) -> bytes:
    """y = x @ w.T + b for x [1, in]; with ``int8_io=((in_scale, in_zp), (out_scale, out_zp))``
    the model's input and output are int8."""
    f32, i8 = S.TensorType.FLOAT32, S.TensorType.INT8
    n_out, n_in = w.shape
    model = S.ModelT()
    model.version, model.description = 3, b"edge-inference test model"
    buffers = [S.BufferT() for _ in range(8)]
    buffers[2].data = list(np.ascontiguousarray(w, np.float32).tobytes())
    buffers[3].data = list(np.ascontiguousarray(b, np.float32).tobytes())
    model.buffers = buffers
    sg = S.SubGraphT()
    sg.name = b"main"
    fc_options = (S.BuiltinOptions.FullyConnectedOptions, S.FullyConnectedOptionsT())
    tensors = [
        _tensor("x", [1, n_in], 1, f32),
        _tensor("w", [n_out, n_in], 2, f32),
        _tensor("b", [n_out], 3, f32),
        _tensor("y", [1, n_out], 4, f32),
    ]
    if int8_io is None:
        model.operatorCodes = [_opcode(S.BuiltinOperator.FULLY_CONNECTED)]
        sg.operators = [_op(0, [0, 1, 2], [3], fc_options)]
        sg.inputs, sg.outputs = [0], [3]
    else:
        (in_s, in_z), (out_s, out_z) = int8_io
        tensors += [
            _tensor("x_int8", [1, n_in], 5, i8, (in_s, in_z)),
            _tensor("y_int8", [1, n_out], 6, i8, (out_s, out_z)),
        ]
        model.operatorCodes = [
            _opcode(S.BuiltinOperator.DEQUANTIZE),
            _opcode(S.BuiltinOperator.FULLY_CONNECTED),
            _opcode(S.BuiltinOperator.QUANTIZE),
        ]
        sg.operators = [_op(0, [4], [0]), _op(1, [0, 1, 2], [3], fc_options), _op(2, [3], [5])]
        sg.inputs, sg.outputs = [4], [5]
    sg.tensors = tensors
    model.subgraphs = [sg]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def pixel_mean(
    size: int, dtype: str, q: tuple[float, int] | None, *, dynamic_width: bool = False
) -> bytes:
    """Input [1, size, size, 3] of ``dtype`` (uint8 or int8) quantized with ``q`` = (scale,
    zero point) -> DEQUANTIZE -> MEAN over the image -> float32 [1, 3]: what the model made of
    its input, channel by channel. ``q`` None: a plain integer input and a CAST instead (as an
    export that takes uint8 and casts it inside); ``dtype`` float32: the MEAN alone.
    ``dynamic_width``: the width is -1 in the tensors' shape signature, as a converter writes
    a dynamic axis (the interpreter is allocated at ``size``, and resized to what it is fed)."""
    f32, i32 = S.TensorType.FLOAT32, S.TensorType.INT32
    qtype = {"uint8": S.TensorType.UINT8, "int8": S.TensorType.INT8, "float32": f32}[dtype]
    model = S.ModelT()
    model.version, model.description = 3, b"edge-inference test model"
    buffers = [S.BufferT() for _ in range(5)]
    buffers[3].data = list(np.array([1, 2], np.int32).tobytes())
    model.buffers = buffers
    sg = S.SubGraphT()
    sg.name = b"main"
    sg.tensors = [
        _tensor("image", [1, size, size, 3], 1, qtype, q),
        _tensor("image_float", [1, size, size, 3], 2, f32),
        _tensor("axes", [2], 3, i32),
        _tensor("mean", [1, 3], 4, f32),
    ]
    first = S.BuiltinOperator.DEQUANTIZE if q is not None else S.BuiltinOperator.CAST
    model.operatorCodes = [_opcode(first), _opcode(S.BuiltinOperator.MEAN)]
    reducer = S.ReducerOptionsT()
    reducer.keepDims = False
    sg.operators = [
        _op(0, [0], [1]),
        _op(1, [1, 2], [3], (S.BuiltinOptions.ReducerOptions, reducer)),
    ]
    if dtype == "float32":  # a float input: the MEAN of it as it is
        sg.operators = [_op(1, [0, 2], [3], (S.BuiltinOptions.ReducerOptions, reducer))]
    sg.inputs, sg.outputs = [0], [3]
    if dynamic_width:
        for t in sg.tensors[:2]:
            t.shapeSignature = [1, size, -1, 3]
    model.subgraphs = [sg]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
