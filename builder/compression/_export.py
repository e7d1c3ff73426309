"""PyTorch -> ONNX for the engine (between the PyTorch and the ONNX phase, and to evaluate each
PyTorch step). Uses ``builder.loading.export_to_onnx`` when that exists; until then the legacy
exporter (opset 17, one file, dynamic axes from the InputSpecs)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

from builder.errors import ModelLoadError
from builder.loading.types import InputSpec


def example_inputs(inputs: Sequence[InputSpec], sample: dict | None = None) -> tuple[Any, ...]:
    """Tensors for tracing: the given sample where there is one, else ones with each InputSpec's shape."""
    import numpy as np
    import torch

    tensors = []
    for spec in inputs:
        if sample is not None and spec.name in sample:
            tensors.append(torch.from_numpy(np.ascontiguousarray(sample[spec.name])))
        else:
            tensors.append(torch.ones(spec.shape, dtype=getattr(torch, spec.dtype)))
    return tuple(tensors)


def export_module(module: Any, inputs: Sequence[InputSpec], path: Path,
                  output_names: Sequence[str] = ("output",)) -> tuple[str, ...]:
    """Export ``module`` to a single ONNX file at ``path``; returns the graph's output names."""
    import onnx
    import torch

    module = module.eval()
    path = Path(path)
    try:
        from builder.loading import export_to_onnx  # type: ignore[attr-defined]
    except ImportError:
        export_to_onnx = None
    try:
        if export_to_onnx is not None:
            export_to_onnx(module, tuple(inputs), path)
        else:
            dynamic_axes = {spec.name: dict(spec.dynamic_axes) for spec in inputs}
            for name in output_names:
                dynamic_axes[name] = {0: "batch"}
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, example_inputs(inputs), str(path), input_names=[s.name for s in inputs],
                                  output_names=list(output_names), dynamic_axes=dynamic_axes, opset_version=17,
                                  dynamo=False, do_constant_folding=True)
    except Exception as exc:  # exporter failures come in many types
        raise ModelLoadError(f"exporting the compressed PyTorch model to ONNX failed: {exc}") from exc
    graph = onnx.load(str(path), load_external_data=False).graph
    return tuple(out.name for out in graph.output)
