"""PyTorch -> ONNX for the engine (between the PyTorch and the ONNX phase, and to evaluate each
PyTorch step), through ``builder.loading.export_to_onnx`` (one file, dynamic axes from the InputSpecs,
checked against PyTorch)."""
from __future__ import annotations

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
    """Export ``module`` to a single ONNX file at ``path``; returns the graph's output names.

    ``output_names`` is not used: ``export_to_onnx`` names the outputs ``output`` / ``output_<i>``."""
    import onnx

    from builder.loading import export_to_onnx

    module = module.eval()
    path = Path(path)
    try:
        export_to_onnx(module, tuple(inputs), path)
    except Exception as exc:  # exporter failures come in many types
        raise ModelLoadError(f"exporting the compressed PyTorch model to ONNX failed: {exc}") from exc
    graph = onnx.load(str(path), load_external_data=False).graph
    return tuple(out.name for out in graph.output)
