"""PyTorch -> one ONNX file, checked against PyTorch with ONNX Runtime.

Exporter choice (measured with torch 2.13 on the zoo models): the legacy TorchScript exporter
(``dynamo=False``, opset 17) exports the digits CNN, the tiny transformer and MiniLM in 0.1-2 s with
outputs within 2e-7 of PyTorch; the dynamo exporter took 22 s on MiniLM and its tiny-transformer
export failed in ONNX Runtime at batch 3 (a fused SkipLayerNormalization kept a fixed shape). So the
legacy exporter goes first and the dynamo one (``external_data=False``: single file) is the
fallback when the legacy export fails or its file fails the check (the legacy tracer froze the tiny
transformer's sequence length into a Reshape; dynamo, traced at batch >= 2, keeps it dynamic). The fused ``nn.MultiheadAttention`` fast path is switched off during export (the legacy
exporter cannot export ``aten::_transformer_encoder_layer_fwd``).
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

from builder.errors import ModelLoadError, UnsupportedOpError, UsageError
from builder.loading.types import InputSpec

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
TWO_GB = 2 * 1024**3
# Export check: |onnx - torch| must stay within ATOL + RTOL * max|torch| on every output.
ATOL = 1e-4
RTOL = 1e-3


def example_tensors(inputs: Sequence[InputSpec], batch: int | None = None, seed: int = 0) -> tuple[Any, ...]:
    """Deterministic example inputs: normal floats, ones for integer inputs (always valid token ids /
    masks / indices), ``batch`` replacing axis 0 when given."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for spec in inputs:
        shape = list(spec.shape)
        if batch is not None and shape:
            shape[0] = batch
        dtype = getattr(torch, spec.dtype)
        if dtype.is_floating_point:
            tensors.append(torch.randn(shape, generator=gen).to(dtype))
        else:
            tensors.append(torch.ones(shape, dtype=dtype))
    return tuple(tensors)


def flatten_outputs(output: Any) -> list[Any]:
    """Tensors of a forward's result (a tensor, a tuple/list, a dict, or a HuggingFace ModelOutput)."""
    import torch

    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        flat: list[Any] = []
        for item in output:
            flat.extend(flatten_outputs(item))
        return flat
    if output is None:
        return []
    raise ModelLoadError(f"the model returned {type(output).__name__}; return tensors (or tuples/dicts of them)")


def run_module(module: Any, tensors: tuple[Any, ...], inputs: Sequence[InputSpec]) -> list[Any]:
    """Forward pass in inference mode; a failure is reported as a shape problem the user can fix."""
    import torch

    try:
        with torch.no_grad():
            return flatten_outputs(module(*tensors))
    except ModelLoadError:
        raise
    except Exception as exc:  # any forward failure: wrong rank, wrong dtype, wrong size
        shapes = ",".join(f"{s.name}={'x'.join(map(str, s.shape))}:{s.dtype}" for s in inputs)
        raise UsageError(f"the model failed on inputs {shapes} ({_first_line(exc)}); check --input-shape") from exc


def varied_specs(inputs: Sequence[InputSpec]) -> tuple[InputSpec, ...] | None:
    """The same inputs with every dynamic axis changed (batch + 1, named axes x 2): the export check
    runs here too, so an axis the exporter silently froze is caught. None when nothing is dynamic."""
    if not any(spec.dynamic_axes for spec in inputs):
        return None
    varied = []
    for spec in inputs:
        shape = list(spec.shape)
        for axis in spec.dynamic_axes:
            if axis < len(shape):
                shape[axis] = shape[axis] + 1 if axis == 0 else shape[axis] * 2
        varied.append(InputSpec(spec.name, tuple(shape), spec.dtype, dict(spec.dynamic_axes)))
    return tuple(varied)


def export_to_onnx(module: Any, inputs: Sequence[InputSpec], path: Path, opset: int | None = None,
                   example: tuple[Any, ...] | None = None) -> float:
    """Export ``module`` to a single ONNX file at ``path`` and check it against PyTorch.

    Axes named in each ``InputSpec.dynamic_axes`` stay symbolic (axis 0 = batch). The check runs
    ONNX Runtime at the given shapes and at shapes with every dynamic axis changed; an exporter whose
    file fails it (e.g. a sequence length frozen into a Reshape) is not used. The file is written
    under a temporary name next to ``path`` and moved into place only after the check passes. Returns
    the max abs difference to PyTorch. Raises UnsupportedOpError / ModelLoadError / UsageError.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    inputs = tuple(inputs)
    tensors = example if example is not None else example_tensors(inputs)
    reference = run_module(module, tensors, inputs)
    if not reference:
        raise ModelLoadError("the model returned no tensors; it must return at least one output")
    other_specs = varied_specs(inputs)
    other_tensors = example_tensors(other_specs, seed=1) if other_specs else None
    other_reference = run_module(module, other_tensors, other_specs) if other_specs and other_tensors is not None else None
    output_names = ["output"] if len(reference) == 1 else [f"output_{i}" for i in range(len(reference))]
    batch = inputs[0].shape[0] if inputs and inputs[0].shape else None
    dynamic_axes: dict[str, dict[int, str]] = {spec.name: dict(spec.dynamic_axes) for spec in inputs}
    if any(spec.dynamic_axes.get(0) == "batch" for spec in inputs):
        for name, out in zip(output_names, reference):
            if out.dim() > 0 and out.shape[0] == batch:
                dynamic_axes[name] = {0: "batch"}
    big = _parameter_bytes(module) > TWO_GB
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.onnx")
    failures: dict[str, BaseException] = {}
    try:
        for exporter in ("torchscript", "dynamo"):
            # dynamo specialises dims of size 1, so it traces at the varied shapes (all dynamic dims >= 2)
            trace_with = other_tensors if exporter == "dynamo" and other_tensors is not None else tensors
            try:
                _export(exporter, module, trace_with, inputs, output_names, dynamic_axes, tmp, opset or DEFAULT_OPSET, big)
                diff = verify_export(module, tmp, inputs, tensors, reference)
                if other_specs is not None and other_tensors is not None:
                    diff = max(diff, verify_export(module, tmp, other_specs, other_tensors, other_reference))
            except (UsageError, UnsupportedOpError):
                raise
            except Exception as exc:  # the exporters raise many types; a failed check is ModelLoadError
                log.info("%s exporter: %s", exporter, _first_line(exc))
                failures[exporter] = exc
                continue
            log.info("exported %s with the %s exporter", path.name, exporter)
            os.replace(tmp, path)
            return diff
    finally:
        if tmp.exists():
            tmp.unlink()
    raise _export_error(failures)


def _export_error(failures: dict[str, BaseException]) -> Exception:
    import torch

    legacy = failures.get("torchscript")
    if isinstance(legacy, torch.onnx.errors.UnsupportedOperatorError):
        return UnsupportedOpError(f"the model uses an operator ONNX export does not support ({_first_line(legacy)}); "
                                  f"rewrite that part or export it to ONNX yourself")
    reason = legacy if legacy is not None else next(iter(failures.values()))
    if isinstance(reason, ModelLoadError):
        return ModelLoadError(f"{reason} (both exporters tried); fix the model or drop a dynamic axis from --input-shape")
    return ModelLoadError(f"exporting the model to ONNX failed: {_first_line(reason)}")


def _export(exporter: str, module: Any, tensors: tuple[Any, ...], inputs: Sequence[InputSpec], output_names: list[str],
            dynamic_axes: dict[str, dict[int, str]], path: Path, opset: int, big: bool) -> None:
    import torch

    names = [spec.name for spec in inputs]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    onnx_logger = logging.getLogger("torch.onnx")  # dynamo's "torchvision is not installed" warnings
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "torchscript":
                torch.onnx.export(module, tensors, str(path), input_names=names, output_names=output_names,
                                  dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False,
                                  do_constant_folding=True)
            else:
                torch.onnx.export(module, tensors, str(path), input_names=names, output_names=output_names,
                                  dynamic_axes=dynamic_axes, opset_version=max(opset, 18), dynamo=True,
                                  external_data=big, verbose=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        onnx_logger.setLevel(level)


def verify_export(module: Any, onnx_path: Path, inputs: Sequence[InputSpec], tensors: tuple[Any, ...],
                  reference: list[Any] | None = None) -> float:
    """Run the ONNX file with ONNX Runtime on ``tensors``; raise ModelLoadError if it differs from PyTorch."""
    import numpy as np

    from builder.execution.sessions import open_session

    if reference is None:
        reference = run_module(module, tensors, inputs)
    try:  # log severity 4: a failing run is reported below as one line, not as ORT's log
        session = open_session(onnx_path, threads=1, log_severity=4)
        feed_names = [i.name for i in session.get_inputs()]
        feed = {name: t.detach().cpu().numpy() for name, t in zip([s.name for s in inputs], tensors) if name in feed_names}
        outputs = session.run(None, feed)
    except Exception as exc:  # onnxruntime raises its own pybind types
        raise ModelLoadError(f"the exported ONNX model does not run in ONNX Runtime ({_first_line(exc)})") from exc
    worst = 0.0
    for index, (got, want) in enumerate(zip(outputs, reference)):
        want_np = want.detach().float().cpu().numpy() if want.is_floating_point() else want.cpu().numpy()
        got = np.asarray(got)
        if got.shape != want_np.shape:
            raise ModelLoadError(f"the exported model's output {index} has shape {got.shape}, PyTorch gives "
                                 f"{want_np.shape}; the export is wrong (dynamic axes?)")
        if want_np.size == 0:
            continue
        diff = float(np.max(np.abs(got.astype(np.float64) - want_np.astype(np.float64))))
        scale = float(np.max(np.abs(want_np.astype(np.float64))))
        if not np.isfinite(diff) or diff > ATOL + RTOL * scale:
            raise ModelLoadError(f"the exported ONNX model differs from PyTorch on output {index} "
                                 f"(max abs diff {diff:.3g}, output scale {scale:.3g}); the export is not faithful")
        worst = max(worst, diff)
    return worst


def _parameter_bytes(module: Any) -> int:
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        total += tensor.numel() * tensor.element_size()
    return total


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
