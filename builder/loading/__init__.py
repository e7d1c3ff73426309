"""Model loading: ONNX files, TorchScript files, and ``package.module:factory`` PyTorch models.

Public API:
- ``parse_input_shapes(text) -> tuple[InputSpec, ...]``: ``"1x3x224x224"`` or
  ``"input_ids=1xseq@128:int64,attention_mask=1xseq@128:int64"`` (``NAME@N`` keeps an axis dynamic;
  axis 0 is always the dynamic ``batch`` axis unless named).
- ``load_model(source, input_shapes=None, workdir=None, opset=None, input_values=None) -> LoadedModel``;
  ONNX files are normalised into ``workdir`` (``normalise.normalise_onnx``: weight Constants to
  initializers, opset >= 13, shape inference, checked against the original); ``.normalisation``
  says what was done.
- ``export_to_onnx(module, inputs, path, opset=None) -> float``: single-file ONNX with a dynamic batch
  axis, checked against PyTorch with ONNX Runtime; returns the max abs difference.
"""
from builder.loading.input_shapes import parse_input_shapes
from builder.loading.load import load_model
from builder.loading.pytorch_export import export_to_onnx, verify_export
from builder.loading.types import InputSpec, LoadedModel

__all__ = ["InputSpec", "LoadedModel", "export_to_onnx", "load_model", "parse_input_shapes", "verify_export"]
