"""Quantization through ``onnxruntime.quantization``: step ``quantize``.

Modes: ``dynamic`` (int8 weights, activations quantized at run time), ``static`` (QDQ int8 with
calibration: MinMax, Entropy or Percentile), ``fp16`` (float16 weights and compute, float32 inputs and
outputs kept), ``auto`` (static QDQ first for Conv-heavy models, dynamic first for MatMul-heavy ones).

Every result is measured against the step's input before it is accepted, because two traps were
measured on this machine (FACTS.md): static QDQ on a MiniLM-class transformer collapses embedding
cosine to ~0.4, and ``quantize_dynamic`` on an EfficientNet-class CNN (Conv -> ConvInteger) runs ~8x
SLOWER than float. A result under the fidelity floor (``min_cosine`` / ``min_agreement``) or slower
than the input (``max_latency_ratio``) is refused with CompressionError in an explicit mode; ``auto``
falls back to the next mode and records why.

Accuracy-aware mixed precision: with ``target_cosine`` / ``target_agreement`` set, per-node
sensitivity is measured (quantize everything but one weighted node, see how much fidelity comes back)
and the most sensitive nodes are kept in float, one at a time, until the target holds or
``max_kept`` nodes are kept. The kept nodes and the ranking are in the StepRecord facts.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, Optional, Sequence

import numpy as np

from builder.compression.base import (CompressionStep, ModelForm, ModelState, SearchEntry, SearchParam,
                                      SpaceOptions, StepContext, StepOrder, StepRecord)
from builder.errors import CompressionError, DataError, UsageError
from builder.loading.types import InputSpec

log = logging.getLogger(__name__)

MODES = ("dynamic", "static", "fp16", "auto")
CALIBRATIONS = ("minmax", "entropy", "percentile")
INT8_TYPES = ("uint8", "int8")
WEIGHT_ROUNDINGS = ("nearest", "gptq")
WEIGHTED_OPS = ("Conv", "MatMul", "Gemm", "Attention")
FLOOR_MISS = ("refuse", "keep_best")
# The search's grid (builder.search.space): "none" leaves the model in float.
SEARCH_MODES = ("none", "dynamic", "static", "fp16")
# int8 weight storage and rounding: uint8 (asymmetric per column) suits smoothed, skewed weights;
# GPTQ re-rounds them against the calibration data (builder.compression.gptq).
SEARCH_WEIGHT_FORMATS = ("int8", "uint8", "uint8+gptq")
# MatMul models, dynamic mode: uint8 only for the fused attention, int8 (the faster U8S8 kernels
# without VNNI) for the other MatMuls. MiniLM: 1.36x fp32 vs 1.24x for all-uint8, NN 95.0% vs 96.3%.
MIXED_WEIGHTS = "attention-uint8+gptq"
KEEP_FLOAT_TARGET_COSINE = 0.9999
SMOOTH_MUL_SUFFIX = "_smooth_mul"  # builder.compression.smoothing names its Mul nodes so


# ---- data helpers --------------------------------------------------------------------------------
def limit_samples(batches: Iterable[dict[str, np.ndarray]], max_samples: int) -> list[dict[str, np.ndarray]]:
    """The first ``max_samples`` samples of ``batches`` (last batch cut to fit)."""
    out, count = [], 0
    for batch in batches:
        size = len(next(iter(batch.values())))
        take = min(size, max_samples - count)
        if take <= 0:
            break
        out.append({k: np.ascontiguousarray(v[:take]) for k, v in batch.items()})
        count += take
    return out


def synthetic_batches(inputs: Sequence[InputSpec], samples: int = 16, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Stand-in inputs when no data was given: uniform [0, 1) floats, ones for integer inputs."""
    rng = np.random.default_rng(seed)
    batch: dict[str, np.ndarray] = {}
    for spec in inputs:
        shape = (samples,) + tuple(spec.shape[1:])
        if np.issubdtype(np.dtype(spec.dtype), np.integer):
            batch[spec.name] = np.ones(shape, dtype=spec.dtype)
        else:
            batch[spec.name] = rng.random(shape).astype(spec.dtype)
    return [batch]


def uniform_batches(batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The same samples in batches of one size (the gcd of the sizes given).

    ORT's Entropy and Percentile calibrators stack every batch's outputs into one array and fail
    ("inhomogeneous shape") when the last batch is shorter than the others.
    """
    import math

    sizes = [len(next(iter(b.values()))) for b in batches if b]
    if len(set(sizes)) <= 1:
        return batches
    size = math.gcd(*sizes)
    return [{k: v[start:start + size] for k, v in batch.items()}
            for batch, count in zip(batches, sizes) for start in range(0, count, size)]


# ORT's Entropy/Percentile calibrators keep every intermediate tensor of every calibration sample in
# memory before building histograms, then copy them while merging (~3x). A 30-minute MiniLM search
# was OOM-killed at 22 GB by one such trial (static, percentile, 256 samples). The samples are capped
# so that this stays within a share of the memory available.
HISTOGRAM_MEMORY_SHARE = 0.25
HISTOGRAM_COPIES = 3


def activation_bytes_per_sample(source: Path, batch: dict[str, np.ndarray]) -> Optional[int]:
    """Bytes of every node output for one sample (what a histogram calibrator stores per sample);
    None when it cannot be measured (e.g. a model over protobuf's 2 GB limit)."""
    import onnx

    from builder.execution.sessions import session_with_outputs

    try:
        model = onnx.load(str(source))
        session = session_with_outputs(model, [name for node in model.graph.node for name in node.output])
        names = {i.name for i in session.get_inputs()}
        return int(sum(o.nbytes for o in session.run(None, {k: v[:1] for k, v in batch.items() if k in names})
                       if isinstance(o, np.ndarray)))
    except Exception as exc:  # noqa: BLE001 - an estimate; without it the samples stay as given
        log.info("could not measure activation memory per sample (%s)", exc)
        return None


def fit_histogram_memory(source: Path, batches: list[dict[str, np.ndarray]],
                         available_bytes: Optional[int] = None) -> list[dict[str, np.ndarray]]:
    """``batches`` cut to the samples whose activations a histogram calibrator can hold in memory."""
    import psutil

    if not batches:
        return batches
    per_sample = activation_bytes_per_sample(source, batches[0])
    if not per_sample:
        return batches
    available = psutil.virtual_memory().available if available_bytes is None else available_bytes
    fits = max(1, int(available * HISTOGRAM_MEMORY_SHARE / (per_sample * HISTOGRAM_COPIES)))
    total = sum(len(next(iter(b.values()))) for b in batches)
    if total <= fits:
        return batches
    log.warning("histogram calibration: %d of %d samples (%.0f MB of activations each, %.1f GB available)",
                fits, total, per_sample / 1e6, available / 1e9)
    return limit_samples(batches, fits)


class BatchReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over in-memory batches (made uniform)."""

    def __init__(self, batches: list[dict[str, np.ndarray]], input_names: set[str]) -> None:
        from onnxruntime.quantization import CalibrationDataReader

        class _Reader(CalibrationDataReader):  # the base class is abstract; subclass it lazily
            def __init__(inner) -> None:
                inner._iter = iter([{k: v for k, v in b.items() if k in input_names} for b in uniform_batches(batches)])

            def get_next(inner) -> Optional[dict[str, np.ndarray]]:
                return next(inner._iter, None)

        self.reader = _Reader()


# ---- measuring -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Measurement:
    cosine_mean: float
    cosine_min: float
    agreement: float
    latency_ratio: float  # candidate median / input median, interleaved, batch 1

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 5) for k, v in dataclasses.asdict(self).items()}


def run_model(path: Path, batches: list[dict[str, np.ndarray]], threads: int = 1) -> np.ndarray:
    from builder.execution.sessions import run_onnx

    return run_onnx(path, batches, threads=threads)


def fidelity(reference: np.ndarray, path: Path, batches: list[dict[str, np.ndarray]], task: str) -> tuple[float, float, float]:
    """(cosine mean, cosine min, agreement) of the model at ``path`` against ``reference``."""
    from builder.compression.evaluate import output_fidelity

    candidate = run_model(path, batches)
    fid = output_fidelity(reference, candidate.astype(np.float32), task)  # the task's own score (task_metrics)
    agreement = fid.agreement if fid.agreement == fid.agreement else 1.0  # NaN (too few samples) -> no signal
    return fid.cosine_mean, fid.cosine_min, agreement


def latency_ratio(baseline: Path, candidate: Path, feed: dict[str, np.ndarray], threads: int = 1,
                  rounds: int = 15, min_round_s: float = 0.05) -> float:
    """Candidate latency / baseline latency at batch 1, from short interleaved rounds (see paired_ratio)."""
    from builder.execution.timing import paired_ratio

    return paired_ratio(baseline, candidate, feed, threads, rounds, min_round_s)


# ---- quantizers ------------------------------------------------------------------------------------
def preprocess(source: Path, out: Path) -> tuple[Path, Optional[str]]:
    """ORT's quantization pre-processing (symbolic shape inference + basic optimisation); falls back
    to the input (with the reason, logged as a warning) when it cannot handle the graph.

    It runs inside a scratch folder next to ``out``: on failure ORT's symbolic shape inference
    writes ``sym_shape_infer_temp.onnx`` and its external data into the current directory.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from builder.loading.scratch import scratch_cwd

    source, out = Path(source).resolve(), Path(out).resolve()
    reasons = []
    # Symbolic shape inference fails on many exported graphs (Paddle OCR models): then ONNX shape
    # inference + ORT's basic optimisation still run, and only the symbolic shapes are lost.
    for skip_symbolic in (False, True):
        try:
            with scratch_cwd(out.parent, prefix="quant-pre-process-"):
                quant_pre_process(str(source), str(out), skip_symbolic_shape=skip_symbolic)
        except Exception as exc:  # noqa: BLE001 - pre-processing is an optimisation, not a requirement
            reasons.append(str(exc).splitlines()[0][:160] if str(exc).strip() else type(exc).__name__)
            continue
        if not skip_symbolic:
            return out, None
        log.warning("quant_pre_process: symbolic shape inference failed (%s); pre-processed with ONNX shape "
                    "inference instead", reasons[0])
        return out, f"pre-processing without symbolic shape inference ({reasons[0]})"
    lost = _preprocess_losses(source)
    log.warning("quant_pre_process failed (%s); quantizing the model as it is, without %s", reasons[-1], lost)
    return source, f"pre-processing skipped ({reasons[-1]}): quantized without {lost}"


def _preprocess_losses(source: Path) -> str:
    """What quantizing without ORT's pre-processing gives up, for the warning."""
    import onnx

    model = onnx.load(str(source), load_external_data=False)
    opset = next((imp.version for imp in model.opset_import if imp.domain in ("", "ai.onnx")), 0)
    lost = "shape information and ORT's basic graph fusions (e.g. Conv+BatchNorm) before quantization"
    if opset < 13:
        lost += f"; per-channel scales need opset >= 13 and this graph is opset {opset}"
    return lost


def _quant_type(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    return {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[name]


def quantize_to(mode: str, source: Path, out: Path, *, per_channel: bool, exclude: Sequence[str],
                calibration: str = "minmax", activation_type: str = "uint8", weight_type: str = "int8",
                calibration_batches: Optional[list[dict[str, np.ndarray]]] = None,
                op_types: Sequence[str] = (), weight_types: Optional[dict[str, str]] = None,
                reduce_range: bool = False, calibration_cache: Optional[Path] = None) -> Path:
    """Write ``source`` quantized in ``mode`` to ``out``; library errors become CompressionError.

    ``weight_types`` (dynamic only) overrides ``weight_type`` per op type, e.g. ``{"Attention": "uint8"}``.
    ``reduce_range``: 7-bit weights, ORT's remedy for U8S8 saturation on x86 without VNNI.
    ``calibration_cache`` (static): a file for ORT's activation ranges; when it exists the ranges are
    read from it instead of calibrating again (ranges do not depend on the weight format, the rounding
    or the nodes kept in float, so the candidates of one search share them).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_dynamic, quantize_static

    # DefaultTensorType: contrib ops (Attention, SkipLayerNormalization) defeat ONNX type inference.
    extra: dict[str, Any] = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    try:
        if mode == "dynamic" and weight_types:
            _dynamic_by_weight_type(source, out, per_channel, weight_type, weight_types, exclude, op_types, extra,
                                    reduce_range)
        elif mode == "dynamic":
            quantize_dynamic(str(source), str(out), per_channel=per_channel, weight_type=_quant_type(weight_type),
                             reduce_range=reduce_range,
                             nodes_to_exclude=list(exclude), op_types_to_quantize=list(op_types) or None,
                             extra_options=extra)
        elif mode == "static":
            if not calibration_batches:
                raise DataError("static quantization needs calibration data; pass --data or use mode = 'dynamic'")
            from builder.execution.sessions import open_session

            names = {i.name for i in open_session(source, threads=0, log_severity=2).get_inputs()}
            # A smoothing Mul's input is the unsmoothed activation: quantizing it would undo smoothing.
            exclude = [*exclude, *(node.name for node in onnx.load(str(source), load_external_data=False).graph.node
                                   if node.name.endswith(SMOOTH_MUL_SUFFIX))]
            method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                      "percentile": CalibrationMethod.Percentile}[calibration]
            if calibration == "percentile":
                extra["CalibPercentile"] = 99.99
            cache: dict[str, Any] = {}
            if calibration_cache is not None:
                import inspect

                if "calibration_cache_path" in inspect.signature(quantize_static).parameters:  # ORT >= 1.23
                    cache["calibration_cache_path"] = str(calibration_cache)
            quantize_static(str(source), str(out), BatchReader(calibration_batches, names).reader,
                            quant_format=QuantFormat.QDQ, per_channel=per_channel, reduce_range=reduce_range,
                            activation_type=_quant_type(activation_type), weight_type=_quant_type(weight_type),
                            nodes_to_exclude=list(exclude), op_types_to_quantize=list(op_types) or None,
                            calibrate_method=method, extra_options=extra, **cache)
        elif mode == "fp16":
            from builder.targets.fp16_safety import convert_to_fp16

            # ranges measured on the calibration data, overflowing nodes kept in float, unique names, sorted
            conversion = convert_to_fp16(onnx.load(str(source)), calibration_batches or None,
                                         node_block_list=list(exclude))
            if conversion.note():
                log.warning("%s", conversion.note())
            onnx.save(conversion.model, str(out))
        else:  # pragma: no cover - validated in __post_init__
            raise UsageError(f"unknown quantize mode {mode!r}")
    except (DataError, UsageError):
        raise
    except Exception as exc:  # onnxruntime.quantization raises many library types
        raise CompressionError(f"{mode} quantization failed: {exc}") from exc
    return out


def _dynamic_by_weight_type(source: Path, out: Path, per_channel: bool, weight_type: str,
                            weight_types: dict[str, str], exclude: Sequence[str], op_types: Sequence[str],
                            extra: dict[str, Any], reduce_range: bool = False) -> None:
    """``quantize_dynamic`` once per weight type, each pass on its own op types.

    ORT takes one weight type per call, but the best storage differs by kernel: on AVX2 without
    VNNI the fused QAttention loses least accuracy with uint8 weights while MatMulInteger with uint8
    weights runs the U8U8 kernels, 17% slower than U8S8 (measured on MiniLM, bench/RESULTS.md).
    A pass turns its ops into quantized ones (QAttention, MatMulInteger), which later passes leave alone.
    """
    import tempfile

    from onnxruntime.quantization import quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    groups: dict[str, list[str]] = {}
    for op in list(op_types) or list(IntegerOpsRegistry):
        groups.setdefault(weight_types.get(op, weight_type), []).append(op)
    current = Path(source)
    with tempfile.TemporaryDirectory(dir=Path(out).parent, prefix=".weight-types-") as tmp:
        for index, (wtype, ops) in enumerate(sorted(groups.items())):
            target = Path(out) if index == len(groups) - 1 else Path(tmp) / f"pass{index}.onnx"
            quantize_dynamic(str(current), str(target), per_channel=per_channel, weight_type=_quant_type(wtype),
                             reduce_range=reduce_range, nodes_to_exclude=list(exclude), op_types_to_quantize=ops, extra_options=dict(extra))
            current = target


def weighted_nodes(path: Path, max_weight_share: float = 1.0) -> list[str]:
    """Names of nodes with a constant weight (the candidates for keeping in float), leaving out those
    whose weight is more than ``max_weight_share`` of all the weighted nodes' weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    sizes = {init.name: int(np.prod(init.dims)) for init in model.graph.initializer}
    nodes = [(node.name, sizes[node.input[1]]) for node in model.graph.node
             if node.op_type in WEIGHTED_OPS and node.name and len(node.input) > 1 and node.input[1] in sizes]
    total = sum(size for _, size in nodes) or 1
    return [name for name, size in nodes if size <= max_weight_share * total]


def constants_as_initializers(path: Path, out: Path) -> Optional[tuple[Path, int]]:
    """The model at ``path`` with its top-level ``Constant`` tensors turned into initializers, written to
    ``out`` (None when there are none). Exporters such as Paddle's keep weights in Constant nodes;
    ORT's quantizers and the float-node search only see initializers as weights."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    constants = [n for n in model.graph.node if n.op_type == "Constant" and len(n.output) == 1
                 and any(a.name == "value" for a in n.attribute)]
    if not constants:
        return None
    for node in constants:
        tensor = next(a.t for a in node.attribute if a.name == "value")
        array = numpy_helper.to_array(tensor)
        model.graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
        model.graph.node.remove(node)
    onnx.save(model, str(out))
    return out, len(constants)


def _better(a: Measurement, b: Measurement, task: str) -> bool:
    """Is ``a`` more faithful than ``b`` (agreement first for classifiers, cosine for embeddings)?"""
    key = (lambda m: (m.cosine_mean, m.agreement)) if task == "embed" else (lambda m: (m.agreement, m.cosine_mean))
    return key(a) > key(b)


def conv_weight_share(path: Path) -> float:
    """Fraction of weight parameters in Conv nodes (decides static-first vs dynamic-first in auto)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    sizes = {init.name: int(np.prod(init.dims)) for init in model.graph.initializer}
    conv = other = 0
    for node in model.graph.node:
        if node.op_type in WEIGHTED_OPS and len(node.input) > 1 and node.input[1] in sizes:
            if node.op_type == "Conv":
                conv += sizes[node.input[1]]
            else:
                other += sizes[node.input[1]]
    return conv / max(conv + other, 1)


# ---- the step ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizeStep(CompressionStep):
    """int8 (dynamic / static QDQ) or fp16, measured against its input, optionally mixed precision."""

    name: ClassVar[str] = "quantize"
    form: ClassVar[ModelForm] = ModelForm.ONNX
    order: ClassVar[StepOrder] = StepOrder(last=True)  # every other step works on float weights
    mode: str = "dynamic"
    per_channel: bool = True
    calibration: str = "minmax"
    activation_type: str = "uint8"  # static only; uint8 measured better on CNNs (FACTS.md)
    weight_type: str = "int8"
    # per op type, dynamic mode only: {Attention = "uint8"} keeps weight_type for every other op
    weight_types: dict[str, str] = dataclasses.field(default_factory=dict)
    keep_float: tuple[str, ...] = ()  # node names always kept in float
    target_cosine: Optional[float] = None  # mixed-precision budget; None = no sensitivity search
    target_agreement: Optional[float] = None
    max_kept: int = 8
    # mixed precision only considers nodes holding at most this share of the weights: a float copy
    # of a CNN's 1280x1000 classifier alone took EfficientNet-Lite0 from 27% to 48% of the fp32 size
    mixed_max_weight_share: float = 1.0
    min_cosine: float = 0.9  # below this the result is a fidelity collapse and is refused
    min_agreement: float = 0.8
    max_latency_ratio: float = 1.15  # int8 slower than input x this is refused (noise margin)
    check_latency: bool = True
    latency_confirmations: int = 2  # re-measurements before a slowdown is believed (shared machines are noisy)
    preprocess: bool = True
    calibration_samples: int = 256
    eval_samples: int = 128
    op_types: tuple[str, ...] = ()  # restrict the op types quantized; empty = ORT's defaults
    threads: int = 1
    # "gptq": int8 weights rounded to minimise each layer's output error on the calibration data
    # (builder.compression.gptq) instead of each weight to its nearest level; same graph and speed.
    weight_rounding: str = "nearest"
    gptq_damp: float = 0.01
    # 7-bit weights: ORT's remedy for U8S8 saturation (VPMADDUBSW) on x86 without VNNI
    reduce_range: bool = False
    # static only: per-channel mean output error of each int8 layer on the calibration data taken out
    # of its bias (builder.compression.bias_correction)
    bias_correction: bool = False
    # "keep_best": a result under the fidelity floor is kept (the most faithful one), with the gap in
    # the step's warnings, instead of refused; the evaluation flags it
    on_floor_miss: str = "refuse"
    # a folder where static activation ranges are cached per (model, calibration, op types): the int8
    # step's candidates share them instead of calibrating again (minutes per histogram calibration)
    calibration_cache_dir: Optional[str] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep_float", tuple(self.keep_float))
        object.__setattr__(self, "op_types", tuple(self.op_types))
        if self.mode not in MODES:
            raise UsageError(f"quantize mode {self.mode!r} is unknown; use one of {', '.join(MODES)}")
        if self.calibration not in CALIBRATIONS:
            raise UsageError(f"calibration {self.calibration!r} is unknown; use one of {', '.join(CALIBRATIONS)}")
        if self.activation_type not in INT8_TYPES or self.weight_type not in INT8_TYPES:
            raise UsageError("activation_type and weight_type must be 'uint8' or 'int8'")
        object.__setattr__(self, "weight_types", dict(self.weight_types))
        if any(t not in INT8_TYPES for t in self.weight_types.values()):
            raise UsageError("weight_types maps op types to 'uint8' or 'int8', e.g. {Attention = \"uint8\"}")
        if self.weight_types and self.mode not in ("dynamic", "auto"):
            raise UsageError(f"weight_types applies to mode 'dynamic' (ORT's static QDQ takes one weight_type); "
                             f"use weight_type with mode {self.mode!r}")
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            raise UsageError(f"weight_rounding {self.weight_rounding!r} is unknown; use one of "
                             f"{', '.join(WEIGHT_ROUNDINGS)}")
        if self.weight_rounding == "gptq" and self.mode == "fp16":
            raise UsageError("weight_rounding = 'gptq' rounds int8 weights; use it with mode 'dynamic' or 'static'")
        if self.on_floor_miss not in FLOOR_MISS:
            raise UsageError(f"on_floor_miss {self.on_floor_miss!r} is unknown; use one of {', '.join(FLOOR_MISS)}")
        if not 0.0 < self.mixed_max_weight_share <= 1.0:
            raise UsageError(f"mixed_max_weight_share must be in (0, 1], got {self.mixed_max_weight_share}")
        if not 0.0 < self.gptq_damp < 1.0:
            raise UsageError(f"gptq_damp must be in (0, 1), got {self.gptq_damp}")
        if self.max_kept < 0 or self.eval_samples < 2 or self.calibration_samples < 1 or self.latency_confirmations < 0:
            raise UsageError("max_kept and latency_confirmations must be >= 0, eval_samples >= 2, "
                             "calibration_samples >= 1")

    def requires_data(self) -> bool:
        return (self.mode == "static" or self.bias_correction or self.target_cosine is not None or self.target_agreement is not None
                or self.weight_rounding == "gptq")

    # -- search -------------------------------------------------------------------------------------
    @classmethod
    def search_params(cls, options: SpaceOptions) -> tuple[SearchParam, ...]:
        weights = SEARCH_WEIGHT_FORMATS + ((MIXED_WEIGHTS,) if options.has_matmul else ())
        return (SearchParam("quant_mode", SEARCH_MODES), SearchParam("calibration", CALIBRATIONS),
                SearchParam("per_channel", (True, False)), SearchParam("keep_float", options.keep_float_counts),
                SearchParam("weights", weights))

    @classmethod
    def search_entries(cls, values: Mapping[str, Any], options: SpaceOptions) -> tuple[SearchEntry, ...]:
        mode = values.get("quant_mode", "none")
        if mode == "fp16":
            return (SearchEntry({"mode": "fp16"}),)
        if mode not in ("dynamic", "static"):
            return ()
        params: dict[str, Any] = {"mode": mode, "per_channel": bool(values.get("per_channel", True))}
        weights = str(values.get("weights", "int8"))
        if weights == MIXED_WEIGHTS:  # static QDQ takes one weight type: int8 there
            if mode == "dynamic":
                params["weight_types"] = {"Attention": "uint8"}
        elif weights != "int8":  # the step's defaults (int8, nearest) stay implicit: same cache key as before
            params["weight_type"] = "uint8"
        if weights.endswith("+gptq"):
            params["weight_rounding"] = "gptq"
        if mode == "static":
            params["calibration"] = str(values.get("calibration", "minmax"))
        if int(values.get("keep_float", 0)) > 0:
            # The engine keeps the most sensitive weighted nodes in float, one at a time, until the
            # target holds or max_kept are kept: a near-perfect target makes the count the knob.
            params["max_kept"] = int(values["keep_float"])
            params["target_cosine"] = KEEP_FLOAT_TARGET_COSINE
        return (SearchEntry(params),)

    @classmethod
    def search_starting_points(cls, base: Mapping[str, Any], choices: Mapping[str, tuple[Any, ...]],
                               options: SpaceOptions) -> list[dict[str, Any]]:
        """One point per mode at the recommended settings, the rest of ``base`` off (see
        ``builder.search.space.starting_points`` for why and what was measured)."""
        matmul = options.has_matmul
        modes = list(choices.get("quant_mode", ()))
        if options.conv_heavy and "int8" in modes:
            modes.remove("dynamic")  # ConvInteger: ~8x slower than float on an EfficientNet-class CNN
        points = []
        for mode in modes:
            point = dict(base, quant_mode=mode)
            if mode in ("dynamic", "static"):
                point.update(per_channel=True, keep_float=0, calibration="minmax")
                if matmul and "use_smooth" in choices:  # smoothing 0.85 with uint8 weights rounded by GPTQ
                    point.update(use_smooth=True, smooth_alpha=0.85)
                if matmul and "weights" in choices:
                    point["weights"] = "uint8+gptq"
            points.append(point)
            if mode == "dynamic" and matmul and MIXED_WEIGHTS in choices.get("weights", ()):
                points.append(dict(point, weights=MIXED_WEIGHTS))  # the faster of the two measured formats
        return points

    # -- main ---------------------------------------------------------------------------------------
    def apply(self, state: ModelState, ctx: StepContext) -> tuple[ModelState, StepRecord]:
        if state.onnx_path is None:
            raise CompressionError("quantize needs an ONNX model; the engine exports before graph steps")
        if state.precision != "fp32":
            raise UsageError(f"the model is already {state.precision}; quantize once, as the last graph step")
        workdir = Path(ctx.workdir)
        if self.calibration_cache_dir is None and self.mode in ("static", "auto"):
            # calibrate once per step: the mixed-precision search quantizes again for every probe, and a
            # histogram calibration of a real CNN takes minutes (an optimize trial ran > 9 min without)
            return dataclasses.replace(self, calibration_cache_dir=str(workdir / "ranges")).apply(state, ctx)
        source = Path(state.onnx_path)
        warnings: list[str] = []
        facts: dict[str, Any] = {}

        off_axis = [f"{s.name} ({'not batched' if s.batch_axis is None else f'axis {s.batch_axis}'})"
                    for s in state.inputs if s.batch_axis != 0]
        if off_axis and ctx.calibration_batches is not None:  # the readers below slice samples on axis 0
            raise UsageError(f"quantize cannot calibrate inputs batched on another axis than 0 yet: {', '.join(off_axis)}; "
                             "build fp32/fp16, or export the model with every input batched on axis 0")
        if ctx.calibration_batches is not None:
            calib = limit_samples(ctx.calibration_batches(), self.calibration_samples)
            evals = limit_samples(ctx.calibration_batches(), self.eval_samples)
        else:
            if self.requires_data():
                raise DataError(f"quantize mode {self.mode!r} with a fidelity target needs calibration data; "
                                "pass --data")
            calib, evals = [], synthetic_batches(state.inputs)
            warnings.append("no data: fidelity checked on synthetic inputs only")

        prepared = source
        if self.preprocess and self.mode != "fp16":
            prepared, why = preprocess(source, workdir / "preprocessed.onnx")
            if why:
                warnings.append(why)
        converted = constants_as_initializers(prepared, workdir / "initializers.onnx")
        if converted is not None:
            prepared, count = converted
            facts["constants_to_initializers"] = count
        reference = run_model(source, evals)
        task = ctx.task
        feed = {k: v[:1] for k, v in evals[0].items()}

        if self.mode == "auto":
            share = conv_weight_share(prepared)
            order = ["static", "dynamic"] if share > 0.5 else ["dynamic", "static"]
            if not calib:
                order = [m for m in order if m != "static"]
            facts["conv_weight_share"] = round(share, 3)
        else:
            order = [self.mode]

        hessians = None
        if self.weight_rounding == "gptq" and any(m != "fp16" for m in order):
            from builder.compression.gptq import Hessians

            hessians = Hessians(prepared, calib)
        if "static" in order and self.calibration in ("entropy", "percentile") and calib:
            # Once per step, not per quantize call: mixed precision quantizes again for every probe.
            calib = fit_histogram_memory(prepared, calib)
        rejected: list[dict[str, Any]] = []
        best_miss: Optional[tuple[Measurement, Path, str, list[str], Any, Optional[list[dict[str, Any]]]]] = None
        for mode in order:
            out = workdir / f"{mode}.onnx"
            rounding = self._quantize(mode, prepared, out, self.keep_float, calib, hessians, source)
            measured = self._measure(source, out, reference, evals, feed, task, mode)
            kept = list(self.keep_float)
            ranking: Optional[list[dict[str, Any]]] = None
            problem = self._trap(measured, mode)
            # The sensitivity search starts from the all-int8 result even when that misses the floor:
            # keeping a few nodes in float is exactly what can lift it back over.
            if self._short_of_target(measured) and not self._slow(measured, mode):
                out, measured, kept, ranking, mixed_rounding = self._mixed_precision(
                    mode, workdir, prepared, source, reference, evals, calib, feed, task, measured, hessians)
                rounding = mixed_rounding or rounding
                problem = self._trap(measured, mode)
            if problem:
                rejected.append({"mode": mode, "reason": problem, **measured.as_dict()})
                if self.on_floor_miss == "keep_best":
                    # never slower than the input without saying so: a slow result is kept only when
                    # nothing faster came, and its warning says how slow
                    rank = (self._slow(measured, mode), best_miss is not None and self._slow(best_miss[0], best_miss[2]))
                    if best_miss is None or rank[0] < rank[1] or (rank[0] == rank[1]
                                                                  and _better(measured, best_miss[0], task)):
                        kept_out = workdir / f"{mode}-best-miss.onnx"
                        out.replace(kept_out)
                        best_miss = (measured, kept_out, mode, kept, rounding, ranking)
                    continue
                if self.mode != "auto":
                    raise CompressionError(f"{mode} quantization refused: {problem}; "
                                           f"{self._advice(mode)}")
                log.warning("auto quantization: %s rejected (%s)", mode, problem)
                continue
            return self._accept(state, mode, out, workdir, measured, kept, rounding, ranking, rejected, facts,
                                warnings)
        if best_miss is not None:
            measured, out, mode, kept, rounding, ranking = best_miss
            gap = self._floor_gap(measured)
            if gap:
                warnings.append(f"fidelity floor missed, best result kept: {gap}")
                facts["floor_missed"] = gap
            if self._slow(measured, mode):
                warnings.append(f"{mode} int8 runs {measured.latency_ratio:.2f}x the input's latency on this CPU; "
                                "kept because no faster int8 result came (check_latency measures the host)")
                facts["slower_than_input"] = round(measured.latency_ratio, 3)
            return self._accept(state, mode, out, workdir, measured, kept, rounding, ranking, rejected, facts,
                                warnings)
        reasons = "; ".join(f"{r['mode']}: {r['reason']}" for r in rejected)
        raise CompressionError(f"no quantization mode gave an acceptable model ({reasons}); "
                               "keep the model in float or keep sensitive nodes with keep_float")

    def _accept(self, state: ModelState, mode: str, out: Path, workdir: Path, measured: Measurement,
                kept: list[str], rounding: Any, ranking: Optional[list[dict[str, Any]]],
                rejected: list[dict[str, Any]], facts: dict[str, Any], warnings: list[str]
                ) -> tuple[ModelState, StepRecord]:
        if ranking is not None:
            facts["sensitivity"] = ranking
            if self._short_of_target(measured):
                if not ranking:
                    warnings.append("fidelity target not reached and no node can be kept in float: no weighted "
                                    f"node ({', '.join(WEIGHTED_OPS)}) has a constant weight in this graph")
                else:
                    warnings.append(f"fidelity target not reached with {len(kept)} nodes kept in float "
                                    f"(cosine {measured.cosine_mean:.4f}, agreement {measured.agreement:.3f}); "
                                    + ("raise max_kept or lower the target" if len(ranking) > self.max_kept
                                       else "every candidate node was tried; lower the target"))
        if mode == "fp16" and measured.latency_ratio > 1.0:
            warnings.append(f"fp16 runs {measured.latency_ratio:.2f}x the input's latency on this CPU "
                            "(expected: CPUs without fp16 units gain size, not speed)")
        final = workdir / "model.onnx"
        out.replace(final)
        facts.update(mode=mode, kept_float=kept, rejected=rejected, **measured.as_dict())
        if rounding is not None:
            facts.update(rounding.as_facts() if hasattr(rounding, "as_facts") else rounding)
        precision = "fp16" if mode == "fp16" else ("mixed" if kept else "int8")
        return dataclasses.replace(state, onnx_path=final, precision=precision), StepRecord(
            step=self.name, params=dataclasses.asdict(self), facts=facts, warnings=tuple(warnings))

    def _floor_gap(self, measured: Measurement) -> str:
        """One line: which floor was missed and by how much."""
        parts = []
        if measured.cosine_mean < self.min_cosine:
            parts.append(f"cosine {measured.cosine_mean:.4f} < {self.min_cosine:g} "
                         f"(gap {self.min_cosine - measured.cosine_mean:.4f})")
        if measured.agreement < self.min_agreement:
            parts.append(f"agreement {measured.agreement:.3f} < {self.min_agreement:g} "
                         f"(gap {self.min_agreement - measured.agreement:.3f})")
        return "; ".join(parts)

    def _slow(self, measured: Measurement, mode: str) -> bool:
        return mode != "fp16" and self.check_latency and measured.latency_ratio > self.max_latency_ratio

    # -- pieces --------------------------------------------------------------------------------------
    def _quantize(self, mode: str, prepared: Path, out: Path, exclude: Sequence[str],
                  calib: list[dict[str, np.ndarray]], hessians: Any = None, float_path: Optional[Path] = None) -> Any:
        """``quantize_to`` with this step's settings, then GPTQ rounding when ``hessians`` are given and
        bias correction (static only) when ``float_path`` is given and the step asks for it."""
        quantize_to(mode, prepared, out, per_channel=self.per_channel, exclude=exclude,
                    calibration=self.calibration, activation_type=self.activation_type,
                    weight_type=self.weight_type, calibration_batches=calib, op_types=self.op_types,
                    weight_types=self.weight_types if mode == "dynamic" else None, reduce_range=self.reduce_range,
                    calibration_cache=self._range_cache(prepared) if mode == "static" else None)
        facts: dict[str, Any] = {}
        if hessians is not None and mode != "fp16":
            from builder.compression.gptq import round_weights

            facts.update(round_weights(out, hessians, self.gptq_damp).as_facts())
        if self.bias_correction and mode == "static" and float_path is not None and calib:
            from builder.compression.bias_correction import correct_biases

            facts.update(correct_biases(prepared, out, calib).as_facts())
        return facts or None

    def _range_cache(self, prepared: Path) -> Optional[Path]:
        if self.calibration_cache_dir is None:
            return None
        import hashlib

        digest = hashlib.sha256(Path(prepared).read_bytes())
        digest.update(f"|{self.calibration}|{sorted(self.op_types)}|{self.activation_type}".encode())
        folder = Path(self.calibration_cache_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"ranges-{digest.hexdigest()[:16]}.json"

    def _measure(self, source: Path, out: Path, reference: np.ndarray, evals: list[dict[str, np.ndarray]],
                 feed: dict[str, np.ndarray], task: str, mode: str) -> Measurement:
        cos_mean, cos_min, agreement = fidelity(reference, out, evals, task)
        ratio = 1.0
        if self.check_latency:
            ratio = latency_ratio(source, out, feed, threads=self.threads)
            for _ in range(self.latency_confirmations):
                if ratio <= self.max_latency_ratio:
                    break
                # Noise only ever needs one lucky measurement to pass; a real slowdown (ConvInteger
                # at 5x) fails every one. Refusing takes every measurement agreeing.
                again = latency_ratio(source, out, feed, threads=self.threads)
                log.info("%s quantization read %.2fx the input's latency; measured again: %.2fx", mode, ratio, again)
                ratio = min(ratio, again)
        return Measurement(cos_mean, cos_min, agreement, ratio)

    def _trap(self, measured: Measurement, mode: str) -> Optional[str]:
        if measured.cosine_mean < self.min_cosine or measured.agreement < self.min_agreement:
            return (f"fidelity collapse (cosine {measured.cosine_mean:.3f} < {self.min_cosine} or "
                    f"agreement {measured.agreement:.3f} < {self.min_agreement})")
        if mode != "fp16" and self.check_latency and measured.latency_ratio > self.max_latency_ratio:
            return f"{measured.latency_ratio:.2f}x slower than the input model"
        return None

    @staticmethod
    def _advice(mode: str) -> str:
        if mode == "static":
            return "try mode = 'dynamic' (transformers), smoothing first, or keep_float for the sensitive nodes"
        if mode == "dynamic":
            return "try mode = 'static' with --data (Conv nets run ConvInteger slowly) or keep_float"
        return "keep the model in float32"

    def _short_of_target(self, measured: Measurement) -> bool:
        return ((self.target_cosine is not None and measured.cosine_mean < self.target_cosine)
                or (self.target_agreement is not None and measured.agreement < self.target_agreement))

    def _mixed_precision(self, mode: str, workdir: Path, prepared: Path, source: Path, reference: np.ndarray,
                         evals: list[dict[str, np.ndarray]], calib: list[dict[str, np.ndarray]],
                         feed: dict[str, np.ndarray], task: str, measured: Measurement, hessians: Any = None
                         ) -> tuple[Path, Measurement, list[str], list[dict[str, Any]], Any]:
        """Keep the most sensitive weighted nodes in float until the target holds (or max_kept).

        The sensitivity probes use nearest rounding (GPTQ for each of dozens of probes would cost
        minutes and rarely changes the ranking); each accepted candidate gets the step's rounding.
        """
        candidates = [n for n in weighted_nodes(prepared, self.mixed_max_weight_share) if n not in self.keep_float]
        probe = workdir / "probe.onnx"
        ranking: list[dict[str, Any]] = []
        for node in candidates:  # sensitivity: how much fidelity comes back when only this node stays float
            self._quantize(mode, prepared, probe, [*self.keep_float, node], calib)
            cos_mean, _, agreement = fidelity(reference, probe, evals, task)
            ranking.append({"node": node, "cosine_gain": round(cos_mean - measured.cosine_mean, 6),
                            "agreement_gain": round(agreement - measured.agreement, 4)})
        ranking.sort(key=lambda r: (r["cosine_gain"], r["agreement_gain"]), reverse=True)
        kept = list(self.keep_float)
        best_out, best, rounding = workdir / f"{mode}.onnx", measured, None
        for entry in ranking[: self.max_kept]:
            kept.append(entry["node"])
            out = workdir / f"{mode}_keep{len(kept)}.onnx"
            rounding = self._quantize(mode, prepared, out, kept, calib, hessians, source)
            best_out, best = out, self._measure(source, out, reference, evals, feed, task, mode)
            if not self._short_of_target(best):
                break
        return best_out, best, kept, ranking, rounding
