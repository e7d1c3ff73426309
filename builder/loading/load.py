"""``load_model``: any supported source -> ``LoadedModel`` (always backed by a checked ONNX file)."""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from builder.errors import ModelLoadError, UsageError
from builder.loading.input_shapes import reconcile_with_graph
from builder.loading.normalise import normalise_onnx
from builder.loading.onnx_file import check_onnx, default_opset, graph_inputs, read_onnx
from builder.loading.pytorch_export import DEFAULT_OPSET, export_to_onnx
from builder.loading.torch_sources import is_factory_reference, is_torch_zip, load_factory, load_torchscript
from builder.loading.types import InputSpec, LoadedModel

log = logging.getLogger(__name__)

TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".torchscript", ".ptl")


def load_model(source: str | Path, input_shapes: Sequence[InputSpec] | str | None = None,
               workdir: Path | None = None, opset: int | None = None,
               input_values: Mapping[str, Any] | None = None,
               data_shapes: Mapping[str, tuple[int, ...]] | None = None,
               batch_axes: Mapping[str, int | None] | None = None) -> LoadedModel:
    """Load an ONNX file, a TorchScript file or ``package.module:factory``.

    ``input_shapes`` (``InputSpec``s or ``--input-shape`` text) is required for PyTorch sources and
    gives concrete values for an ONNX file's dynamic dims; dims it leaves open come from
    ``data_shapes`` (the ``--data`` arrays, ``builder.compression.data.data_layout``) when given.
    ``batch_axes`` declares inputs batched on another axis than 0 (``--batch-axis``; see
    ``input_shapes``). PyTorch models are exported to
    ``workdir/<name>.onnx`` (a new temporary directory when None: the caller owns it) and checked
    against PyTorch. ONNX files are normalised into ``workdir`` (``normalise``: weight Constants to
    initializers, opset >= 13, shape inference), checked against the original on generated inputs
    (``input_values`` by input name are used where given). Errors: ModelLoadError /
    UnsupportedOpError / UsageError, each one line.
    """
    from builder.loading.input_shapes import parse_input_shapes, specs_given_names

    named = True
    specs: tuple[InputSpec, ...] | None
    if isinstance(input_shapes, str):
        named = specs_given_names(input_shapes)
        specs = parse_input_shapes(input_shapes)
    else:
        specs = tuple(input_shapes) if input_shapes else None
        if specs is not None:
            named = not (len(specs) == 1 and specs[0].name == "input")
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir():
            raise ModelLoadError(f"{path} is a directory; give an .onnx or TorchScript file or package.module:factory")
        if path.suffix.lower() in TORCHSCRIPT_SUFFIXES or (path.suffix.lower() != ".onnx" and is_torch_zip(path)):
            module = load_torchscript(path)
            return _from_torch(module, text, "torchscript", path.stem, specs, workdir, opset)
        return _from_onnx(path, specs, named, workdir, input_values, data_shapes, batch_axes)
    if is_factory_reference(text) and not text.lower().endswith((".onnx",) + TORCHSCRIPT_SUFFIXES):
        module = load_factory(text)
        module_name, attr = text.split(":", 1)
        last = module_name.rsplit(".", 1)[-1]
        return _from_torch(module, text, "factory", last if last == attr else f"{last}-{attr}", specs, workdir, opset)
    raise ModelLoadError(f"model file {path} not found; give an existing .onnx or TorchScript file or "
                         f"package.module:factory")


def _from_onnx(path: Path, specs: tuple[InputSpec, ...] | None, named: bool, workdir: Path | None,
               input_values: Mapping[str, Any] | None,
               data_shapes: Mapping[str, tuple[int, ...]] | None = None,
               batch_axes: Mapping[str, int | None] | None = None) -> LoadedModel:
    model = read_onnx(path)
    check_onnx(model, path)
    found = graph_inputs(model)
    shapes = dict(data_shapes or {})
    if len(found) == 1 and found[0][0] not in shapes and set(shapes) == {"x"}:  # the single-input 'x' key
        shapes = {found[0][0]: shapes["x"]}
    inputs = reconcile_with_graph(found, specs, named, shapes, batch_axes)
    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="edgefleet-load-"))
    workdir.mkdir(parents=True, exist_ok=True)
    normalised, record = normalise_onnx(path, inputs, workdir, input_values, model=model)
    return LoadedModel(name=path.stem, source=str(path), source_kind="onnx", onnx_path=normalised, inputs=inputs,
                       output_names=tuple(o.name for o in model.graph.output), opset=record.opset_to,
                       normalisation=record)


def _from_torch(module: object, source: str, kind: str, name: str, specs: tuple[InputSpec, ...] | None,
                workdir: Path | None, opset: int | None) -> LoadedModel:
    if not specs:
        raise UsageError(f"a PyTorch model ({source}) needs --input-shape, e.g. 1x3x224x224 or "
                         f"input_ids=1xseq@128:int64,attention_mask=1xseq@128:int64")
    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="edgefleet-load-"))
    onnx_path = workdir / f"{name}.onnx"
    diff = export_to_onnx(module, specs, onnx_path, opset=opset)
    model = read_onnx(onnx_path, load_external_data=False)
    log.info("exported %s to %s (max abs diff vs PyTorch %.3g)", source, onnx_path, diff)
    return LoadedModel(name=name, source=source, source_kind=kind, onnx_path=onnx_path, inputs=tuple(specs),
                       output_names=tuple(o.name for o in model.graph.output), torch_module=module,
                       opset=default_opset(model) or (opset or DEFAULT_OPSET), export_max_abs_diff=diff)
