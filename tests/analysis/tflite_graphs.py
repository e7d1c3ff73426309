"""A small ``.tflite`` file written with the flatbuffer schema ai_edge_litert ships (no converter):
CONV_2D -> DEPTHWISE_CONV_2D -> RESHAPE -> FULLY_CONNECTED, and a BATCH_MATMUL of two activations."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def write_tiny_tflite(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Write the model; return its weights by name (for independent counts)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    rng = np.random.default_rng(seed)
    weights = {
        "conv_w": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),  # [O, kh, kw, I]
        "conv_b": rng.standard_normal(8).astype(np.float32),
        "dw_w": rng.standard_normal((1, 3, 3, 8)).astype(np.float32),  # [1, kh, kw, C]
        "dw_b": rng.standard_normal(8).astype(np.float32),
        "fc_w": rng.standard_normal((5, 8)).astype(np.float32),  # [O, K]
        "fc_b": rng.standard_normal(5).astype(np.float32),
        "shape": np.array([36, 8], dtype=np.int32),
    }
    buffers = [s.BufferT()]  # buffer 0 is the empty sentinel
    tensors = []

    def tensor(name: str, shape: tuple[int, ...], dtype: int = s.TensorType.FLOAT32,
               data: np.ndarray | None = None) -> int:
        t = s.TensorT()
        t.name, t.shape, t.type = name, list(shape), dtype
        if data is not None:
            b = s.BufferT()
            b.data = np.frombuffer(data.tobytes(), dtype=np.uint8)
            buffers.append(b)
            t.buffer = len(buffers) - 1
        else:
            t.buffer = 0
        tensors.append(t)
        return len(tensors) - 1

    x = tensor("x", (1, 6, 6, 3))
    conv_w = tensor("conv_w", (8, 3, 3, 3), data=weights["conv_w"])
    conv_b = tensor("conv_b", (8,), data=weights["conv_b"])
    h1 = tensor("conv", (1, 6, 6, 8))
    dw_w = tensor("dw_w", (1, 3, 3, 8), data=weights["dw_w"])
    dw_b = tensor("dw_b", (8,), data=weights["dw_b"])
    h2 = tensor("depthwise", (1, 6, 6, 8))
    shape = tensor("shape", (2,), s.TensorType.INT32, data=weights["shape"])
    flat = tensor("flat", (36, 8))
    fc_w = tensor("fc_w", (5, 8), data=weights["fc_w"])
    fc_b = tensor("fc_b", (5,), data=weights["fc_b"])
    logits = tensor("logits", (36, 5))
    a = tensor("a", (1, 4, 6))
    b = tensor("b", (1, 6, 7))
    ab = tensor("ab", (1, 4, 7))

    codes = []
    for builtin in (s.BuiltinOperator.CONV_2D, s.BuiltinOperator.DEPTHWISE_CONV_2D, s.BuiltinOperator.RESHAPE,
                    s.BuiltinOperator.FULLY_CONNECTED, s.BuiltinOperator.BATCH_MATMUL):
        code = s.OperatorCodeT()
        code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), 1
        codes.append(code)

    def op(index: int, inputs: list[int], outputs: list[int], kind: int = 0, options: object = None) -> object:
        o = s.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = index, inputs, outputs
        if options is not None:
            o.builtinOptionsType, o.builtinOptions = kind, options
        return o

    conv = s.Conv2DOptionsT()
    conv.padding, conv.strideW, conv.strideH, conv.dilationWFactor, conv.dilationHFactor = s.Padding.SAME, 1, 1, 1, 1
    dw = s.DepthwiseConv2DOptionsT()
    dw.padding, dw.strideW, dw.strideH, dw.depthMultiplier = s.Padding.SAME, 1, 1, 1
    dw.dilationWFactor, dw.dilationHFactor = 1, 1
    ops = [
        op(0, [x, conv_w, conv_b], [h1], s.BuiltinOptions.Conv2DOptions, conv),
        op(1, [h1, dw_w, dw_b], [h2], s.BuiltinOptions.DepthwiseConv2DOptions, dw),
        op(2, [h2, shape], [flat]),
        op(3, [flat, fc_w, fc_b], [logits], s.BuiltinOptions.FullyConnectedOptions, s.FullyConnectedOptionsT()),
        op(4, [a, b], [ab], s.BuiltinOptions.BatchMatMulOptions, s.BatchMatMulOptionsT()),
    ]
    graph = s.SubGraphT()
    graph.tensors, graph.operators, graph.inputs, graph.outputs, graph.name = tensors, ops, [x, a, b], [logits, ab], "main"
    model = s.ModelT()
    model.version, model.operatorCodes, model.subgraphs, model.buffers = 3, codes, [graph], buffers
    model.description = "tiny"
    builder = flatbuffers.Builder(4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    Path(path).write_bytes(bytes(builder.Output()))
    return weights
