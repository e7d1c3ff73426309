"""LiteRT (TFLite) target for Android, and Raspberry Pi as an alternative to ONNX Runtime.

Converts a PyTorch module with ``litert-torch`` (no TensorFlow needed) and quantizes the float
``.tflite`` with ``ai-edge-quantizer``: fp16 = fp16 weights (float casting), int8 = int8 weights
with dynamic int8 activations (inputs/outputs stay float, so the agent feeds the same arrays).
An ONNX-only model is first turned into a PyTorch module by ``onnx_to_torch`` (onnx2torch on the
graph frozen to the sample shapes); a node that cannot convert raises ``LiteRtConversionError``
naming it, and ``profile_build`` takes the profile's fallback runtime. Verification runs each file
in ``ai-edge-litert``'s interpreter (tflite-runtime 2.14 rejects newer op versions, see
docs/android.md) against the ONNX model's outputs.
"""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from agent.manifest import TensorSpec
from builder.errors import TargetError
from builder.execution.timing import median_run_ms
from builder.targets.base import (
    CompiledPayloads,
    OutputCheck,
    PayloadFile,
    Tolerance,
    UnsupportedOp,
    VerificationReport,
    compare_outputs,
    count_ops,
    predictions_of,
)
from builder.targets.onnx_to_torch import (
    TFLITE_UNSUPPORTED,
    LiteRtConversionError,
    UnconvertibleOp,
    constant_propagation_for_export,
    node_of_failure,
    onnx_to_torch,
)

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e '.[convert-litert]'"
SIGNATURE = "serving_default"


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TargetError(f"the LiteRT converter is not installed ({module} missing); {INSTALL_HINT}") from exc


class _NamedInputs:
    """Factory for a module whose keyword arguments are the model's input names, so the .tflite
    signature takes the same names as the ONNX model (positional args would become args_0...)."""

    @staticmethod
    def wrap(module: Any, names: Sequence[str]) -> Any:
        import torch

        class NamedInputs(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = module
                self.names = list(names)

            def forward(self, **kwargs: Any) -> Any:
                return self.inner(*[kwargs[n] for n in self.names])

        return NamedInputs().eval()


def interpreter(path: Path, threads: int = 1) -> Any:
    mod = _require("ai_edge_litert.interpreter")
    try:
        return mod.Interpreter(model_path=str(path), num_threads=threads)
    except Exception as exc:  # the interpreter raises ValueError/RuntimeError for bad flatbuffers
        raise TargetError(f"LiteRT cannot load {Path(path).name}: {str(exc).splitlines()[0]}") from exc


def run_tflite(path: Path, samples: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Run a .tflite's default signature one sample at a time; inputs cast to its dtypes."""
    it = interpreter(path)
    runner = it.get_signature_runner(SIGNATURE)
    details = runner.get_input_details()
    out_order = it.get_signature_list()[SIGNATURE]["outputs"]
    results = []
    for sample in samples:
        feed = {k: np.asarray(sample[k]).astype(details[k]["dtype"]) for k in details}
        try:
            got = runner(**feed)
        except Exception as exc:
            raise TargetError(f"LiteRT failed to run {Path(path).name}: {str(exc).splitlines()[0]}") from exc
        results.append({k: np.asarray(got[k]) for k in out_order})
    return results


def tflite_io_specs(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], dict[str, str]]:
    """Inputs and outputs under their *tensor* names (what ``get_input_details`` reports and the
    agent's LiteRT backend feeds by), in signature order, plus tensor name -> signature name."""
    it = interpreter(path)
    runner = it.get_signature_runner(SIGNATURE)
    sig = it.get_signature_list()[SIGNATURE]
    ins, outs = runner.get_input_details(), runner.get_output_details()

    def spec(d: Mapping[str, Any]) -> TensorSpec:
        return TensorSpec(name=str(d["name"]), shape=tuple(int(x) for x in d["shape"]), dtype=np.dtype(d["dtype"]).name)

    inputs = tuple(spec(ins[n]) for n in sig["inputs"])
    outputs = tuple(spec(outs[n]) for n in sig["outputs"])
    return inputs, outputs, {str(ins[n]["name"]): n for n in sig["inputs"]}


class LiteRtTarget:
    """fp32 / fp16 / int8 ``.tflite`` from the PyTorch module."""

    name: ClassVar[str] = "litert"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "int8")
    formats: ClassVar[tuple[str, ...]] = ("tflite",)

    def check_ops(self, onnx_model: Any, precision: str = "fp32") -> list[UnsupportedOp]:
        found = []
        for (domain, op), n in sorted(count_ops(onnx_model).items()):
            if domain not in ("", "ai.onnx"):
                found.append(UnsupportedOp(op, domain, n, f"'{domain}' ops have no TFLite builtin",
                                           "build for the onnxruntime runtime"))
            elif op in TFLITE_UNSUPPORTED:
                found.append(UnsupportedOp(op, domain, n, "no TFLite builtin op",
                                           "build for the onnxruntime runtime (or replace the op in the PyTorch model)"))
            elif precision == "int8" and op in ("QuantizeLinear", "DequantizeLinear"):
                found.append(UnsupportedOp(op, domain, n, "an ONNX-quantized graph cannot be re-converted",
                                           "give the float PyTorch model; ai-edge-quantizer quantizes the .tflite"))
        return found

    def compile(self, model_onnx_path: Path, inputs: Sequence[TensorSpec], precision: str,
                options: Mapping[str, Any], workdir: Path) -> CompiledPayloads:
        if precision not in self.precisions:
            raise TargetError(f"LiteRT target builds {', '.join(self.precisions)}, not '{precision}'")
        litert_torch = _require("litert_torch")
        _require("ai_edge_litert.interpreter")
        import torch

        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        example = _example_arrays(inputs, options.get("example_inputs") or {})
        module = options.get("torch_module")
        source = "PyTorch"
        names = [s.name for s in inputs]
        op_types: Mapping[str, str] = {}
        if module is None:  # an ONNX-only model: onnx2torch first (raises LiteRtConversionError naming the node)
            module, names, op_types = onnx_to_torch(Path(model_onnx_path), example)
            source = "ONNX via onnx2torch"
        kwargs = {n: torch.from_numpy(np.ascontiguousarray(example[n])) for n in names}
        float_path = workdir / "model_fp32.tflite"
        try:
            with constant_propagation_for_export() if op_types else contextlib.nullcontext():
                edge = litert_torch.convert(_NamedInputs.wrap(module, names), sample_kwargs=kwargs)
            edge.export(str(float_path))
        except Exception as exc:
            if op_types:
                node = node_of_failure(exc, module, op_types)
                raise LiteRtConversionError(node or UnconvertibleOp("?", "?", "", f"litert-torch: {_first_line(exc)}")) from exc
            raise TargetError(f"litert-torch could not convert the model: {_first_line(exc)}; "
                              "build for the onnxruntime runtime instead") from exc
        out = workdir / "model.tflite"
        notes = [f"converted from {source} with litert-torch {getattr(litert_torch, '__version__', '?')}"]
        if precision == "fp32":
            float_path.replace(out)
        else:
            quantize_tflite(float_path, out, precision)
            notes.append("fp16 weights (ai-edge-quantizer float casting)" if precision == "fp16"
                         else "int8 weights, dynamic int8 activations, float inputs/outputs (ai-edge-quantizer dynamic_wi8_afp32)")
        model_inputs, model_outputs, sources = tflite_io_specs(out)
        delegates = tuple(options.get("delegates", ()))
        signature = {"name": SIGNATURE, "inputs": {t: s for t, s in sources.items()},
                     "outputs": [o.name for o in model_outputs]}
        return CompiledPayloads(self.name, "tflite", precision, (PayloadFile("model.tflite", out, "model"),),
                                model_inputs, model_outputs, delegates,
                                {"signature": signature, "delegates": list(delegates)}, (), tuple(notes), sources)

    def verify(self, payloads: CompiledPayloads, sample_inputs: Sequence[Mapping[str, np.ndarray]],
               reference_outputs: Sequence[Mapping[str, np.ndarray]], tolerance: Tolerance) -> VerificationReport:
        names = list(reference_outputs[0].keys()) if reference_outputs else []
        checks: list[OutputCheck] = []
        f = payloads.model_file
        outputs = run_tflite(f.path, sample_inputs)
        checks.append(compare_outputs(f.name, outputs, reference_outputs, tolerance, names))
        latency = time_tflite(f.path, sample_inputs[0]) if sample_inputs else None
        return VerificationReport(self.name, payloads.precision, tolerance, tuple(checks),
                                  f"{f.name} ran in ai-edge-litert's interpreter (XNNPACK, 1 thread) on the host",
                                  len(sample_inputs), latency, predictions_of(outputs))


def _example_arrays(inputs: Sequence[TensorSpec], example: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One sample per input, from the verification samples or zeros of the static shape."""
    arrays = {}
    for spec in inputs:
        if spec.name in example:
            arrays[spec.name] = np.asarray(example[spec.name])
        else:
            shape = tuple(d if isinstance(d, int) else 1 for d in spec.shape)
            arrays[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return arrays


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def quantize_tflite(float_path: Path, out: Path, precision: str) -> None:
    quantizer = _require("ai_edge_quantizer.quantizer")
    recipe = _require("ai_edge_quantizer.recipe")
    qtyping = _require("ai_edge_quantizer.qtyping")
    algorithms = _require("ai_edge_quantizer.algorithm_manager")
    try:
        # its per-op tqdm bars (params generation, transformations) write to sys.stderr on bigger models
        with contextlib.redirect_stderr(io.StringIO()):
            result = _quantized(quantizer, recipe, qtyping, algorithms, float_path, precision)
    except Exception as exc:
        raise TargetError(f"ai-edge-quantizer failed ({precision}): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(bytes(result.quantized_model))
    tmp.replace(out)


def _quantized(quantizer: Any, recipe: Any, qtyping: Any, algorithms: Any, float_path: Path, precision: str) -> Any:
    if precision == "fp16":
        q = quantizer.Quantizer(str(float_path))
        q.add_weight_only_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED, num_bits=16,
                                 algorithm_key=algorithms.AlgorithmName.FLOAT_CASTING)
    else:
        q = quantizer.Quantizer(str(float_path), recipe.dynamic_wi8_afp32())
    return q.quantize(enable_progress_report=False)


def time_tflite(path: Path, sample: Mapping[str, np.ndarray], runs: int = 20) -> float:
    it = interpreter(path)
    runner = it.get_signature_runner(SIGNATURE)
    details = runner.get_input_details()
    feed = {k: np.asarray(sample[k]).astype(details[k]["dtype"]) for k in details}
    return median_run_ms(lambda: runner(**feed), runs)
