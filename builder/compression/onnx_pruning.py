"""Magnitude pruning of an ONNX model's weights (``type = "prune_onnx"``), for ONNX-only models.

No training is possible, so this zeroes the smallest-magnitude entries of the float weight
initializers of Conv, Gemm and MatMul nodes in one shot (per tensor, or globally with
``scope = "global"``). Zeros do not make ONNX Runtime faster, but they shrink the zstd download
form; the evaluation after the step shows what it cost in fidelity.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np

from builder.compression._torch_layers import check_fraction
from builder.compression.base import (CompressionStep, ModelForm, ModelState, SearchEntry, SearchParam,
                                      SpaceOptions, StepContext, StepOrder, StepRecord)
from builder.errors import CompressionError, UsageError

WEIGHT_INPUTS = {"Conv": (1,), "Gemm": (0, 1), "MatMul": (0, 1), "ConvTranspose": (1,)}


@dataclass(frozen=True)
class OnnxPruneStep(CompressionStep):
    name: ClassVar[str] = "prune_onnx"
    form: ClassVar[ModelForm] = ModelForm.ONNX
    order: ClassVar[StepOrder] = StepOrder(before=("fold", "optimize_graph", "smooth", "quantize", "int8"))

    sparsity: float = 0.5
    scope: str = "tensor"  # "tensor" | "global"
    min_size: int = 256  # smaller initializers (biases, tiny kernels) stay dense

    def __post_init__(self) -> None:
        check_fraction("sparsity", self.sparsity, low_open=True)
        if self.scope not in ("tensor", "global"):
            raise UsageError(f"scope must be 'tensor' or 'global', got {self.scope!r}")

    @classmethod
    def search_params(cls, options: SpaceOptions) -> tuple[SearchParam, ...]:
        if options.torch_available:  # a PyTorch model prunes with prune (same parameter names)
            return ()
        return (SearchParam("use_prune", (False, True)), SearchParam("sparsity", (0.3, 0.5, 0.7)))

    @classmethod
    def search_entries(cls, values: Mapping[str, Any], options: SpaceOptions) -> tuple[SearchEntry, ...]:
        if options.torch_available or not values.get("use_prune"):
            return ()
        return (SearchEntry({"sparsity": float(values["sparsity"])}),)

    def apply(self, state: ModelState, ctx: StepContext) -> tuple[ModelState, StepRecord]:
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(state.onnx_path))
        inits = {init.name: init for init in model.graph.initializer}
        names: list[str] = []
        for node in model.graph.node:
            for index in WEIGHT_INPUTS.get(node.op_type, ()):
                if index < len(node.input) and node.input[index] in inits and node.input[index] not in names:
                    names.append(node.input[index])
        arrays = {n: numpy_helper.to_array(inits[n]) for n in names}
        arrays = {n: a for n, a in arrays.items() if a.dtype.kind == "f" and a.size >= self.min_size}
        if not arrays:
            raise CompressionError("prune_onnx: no float Conv/Gemm/MatMul weight initializers to prune "
                                   f"(min_size {self.min_size}); is the model already quantized?")
        if self.scope == "global":
            everything = np.concatenate([np.abs(a).reshape(-1) for a in arrays.values()])
            threshold = np.partition(everything, int(self.sparsity * everything.size))[int(self.sparsity * everything.size)]
            thresholds = {n: threshold for n in arrays}
        else:
            thresholds = {n: np.partition(np.abs(a).reshape(-1), int(self.sparsity * a.size))[int(self.sparsity * a.size)]
                          for n, a in arrays.items()}
        layer_sparsity: dict[str, float] = {}
        for name, array in arrays.items():
            pruned = np.where(np.abs(array) < thresholds[name], np.zeros_like(array), array)
            inits[name].CopyFrom(numpy_helper.from_array(pruned, name))
            layer_sparsity[name] = round(float((pruned == 0).mean()), 4)
        out = ctx.workdir / "pruned.onnx"
        onnx.save(model, str(out))
        zeros = sum(layer_sparsity[n] * arrays[n].size for n in arrays)
        facts: dict[str, Any] = {"sparsity": round(zeros / sum(a.size for a in arrays.values()), 4),
                                 "tensor_sparsity": layer_sparsity, "pruned_tensors": len(arrays)}
        return dataclasses.replace(state, onnx_path=out), StepRecord(self.name, dataclasses.asdict(self), facts)
