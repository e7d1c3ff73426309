"""Open and validate an ONNX file: readable, well-formed, every operator known.

Validation is static (onnx's checker plus the operator schemas) so fp16 or int8 models that the CPU
build of ONNX Runtime cannot run still load for analysis; PyTorch exports are run separately.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from builder.errors import ModelLoadError, UnsupportedOpError

log = logging.getLogger(__name__)

# Operator domains ONNX Runtime implements beyond the standard ones (contrib ops of the CPU/CUDA builds).
RUNTIME_DOMAINS = ("com.microsoft", "com.microsoft.nchwc", "com.microsoft.experimental", "ai.onnx.contrib")
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "ai.onnx.training", "ai.onnx.preview.training")


def read_onnx(path: Path, load_external_data: bool = True) -> Any:
    """``onnx.load`` with one-line errors: missing file, not a model, empty graph."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file {path} not found; check the path")
    if not path.is_file():
        raise ModelLoadError(f"{path} is not a file; give an .onnx or TorchScript file or package.module:factory")
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except DecodeError as exc:
        raise ModelLoadError(f"{path} is not an ONNX model (protobuf parse failed); give an .onnx or TorchScript "
                             f"file or package.module:factory") from exc
    except (OSError, ValueError, RuntimeError) as exc:  # missing external data, truncated file
        raise ModelLoadError(f"{path} could not be read as ONNX ({_first_line(exc)}); re-export the model") from exc
    if not model.HasField("graph") or len(model.graph.node) == 0 or model.ir_version == 0:
        raise ModelLoadError(f"{path} is not an ONNX model (no graph or IR version); give a real .onnx file")
    return model


def check_onnx(model: Any, path: Path) -> None:
    """Structural check plus operator check; raises ModelLoadError / UnsupportedOpError with one line."""
    import onnx

    unknown = unknown_ops(model)
    if unknown:
        op, node = unknown[0]
        raise UnsupportedOpError(f"{path}: operator '{op}' (node '{node}') is not a known ONNX or ONNX Runtime "
                                 f"operator; replace it or export the model with standard ops")
    try:
        if model.ByteSize() < 2_000_000_000:
            onnx.checker.check_model(model)
        else:
            onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ModelLoadError(f"{path} is not a valid ONNX model: {_first_line(exc)}; re-export it") from exc


def unknown_ops(model: Any) -> list[tuple[str, str]]:
    """``(op, node name)`` for every node whose operator no schema or runtime domain knows."""
    import onnx.defs

    functions = {(f.domain, f.name) for f in model.functions}
    opsets = {imp.domain: imp.version for imp in model.opset_import}
    unknown = []
    for node in model.graph.node:
        domain = node.domain or ""
        if (domain, node.op_type) in functions or domain in RUNTIME_DOMAINS:
            continue
        if domain in STANDARD_DOMAINS:
            version = opsets.get(domain, opsets.get("ai.onnx" if domain == "" else domain, 1))
            try:
                onnx.defs.get_schema(node.op_type, max_inclusive_version=version, domain=domain)
                continue
            except onnx.defs.SchemaError:
                pass
        unknown.append((f"{domain + '::' if domain else ''}{node.op_type}", node.name or "?"))
    return unknown


def graph_inputs(model: Any) -> list[tuple[str, tuple[int | str | None, ...], str]]:
    """``(name, dims, numpy dtype)`` of the real inputs (initializers listed as inputs are skipped).
    Dims are ints when fixed, the symbol string when named, None when unknown."""
    from onnx import helper

    initializers = {init.name for init in model.graph.initializer}
    result = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dims: list[int | str | None] = []
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value > 0:
                dims.append(int(dim.dim_value))
            elif dim.HasField("dim_param"):
                dims.append(dim.dim_param)
            else:
                dims.append(None)
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name if tensor_type.elem_type else "float32"
        result.append((value.name, tuple(dims), dtype))
    return result


def default_opset(model: Any) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
