"""Model loading: ONNX files, TorchScript files, and ``package.module:factory`` PyTorch models.

Public API (implemented in this package's modules):
- ``parse_input_shapes(text) -> tuple[InputSpec, ...]``: ``"1x3x224x224"`` or
  ``"input_ids=1x128:int64,attention_mask=1x128:int64"``.
- ``load_model(source, input_shapes=None, workdir=None, opset=None) -> LoadedModel``.
- ``export_to_onnx(module, inputs, path, opset=None) -> float``: single-file ONNX with a dynamic batch
  axis, checked against PyTorch; returns the max abs difference.
"""
from builder.loading.types import InputSpec, LoadedModel

__all__ = ["InputSpec", "LoadedModel"]
