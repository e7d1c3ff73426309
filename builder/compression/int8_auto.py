"""The best int8 the engine knows for a model on a CPU: step ``int8`` (``--quantize int8``).

The winning recipe depends on what the model is (measured, docs/int8.md):

* **Conv nets** (Conv holds most weights): static QDQ, per-channel int8 weights, uint8 activations,
  first Conv and classifier in float. ``quantize_dynamic`` turns Conv into ConvInteger, ~8x slower
  than float on an EfficientNet-class CNN. A short greedy search then keeps each lever only when it
  measures more faithful at the same speed: calibration (MinMax, Percentile, Entropy), 7-bit weights
  where U8S8 saturates (x86 without VNNI), bias correction, GPTQ rounding of the Conv weights
  (builder.compression.gptq), cross-layer equalisation, the classifier
  in int8, all layers int8 (as faithful and >10% smaller also wins: size is a target too), and last,
  when the result is under ``target_cosine`` / ``target_agreement``, up to ``max_kept`` of the most
  sensitive layers in float.
* **Attention encoders** (Softmax + MatMul): ORT's transformer fusions, activation smoothing,
  per-channel dynamic int8 with uint8 weights for the fused Attention (most faithful) and int8 for
  the other MatMuls (U8S8, the fast kernels), rounded by GPTQ — ``builder/recipes/minilm-int8-fast.toml``.
  Static QDQ collapses such models (MiniLM cosine ~0.4).
* **Dense MatMul nets** without attention: smoothing, per-channel dynamic int8, GPTQ.
* **Recurrent nets** (LSTM/GRU/RNN): per-channel dynamic int8 (ORT's DynamicQuantizeLSTM).

The CPU is the host's (``/proc/cpuinfo``) unless the step is given a target's ``arch`` /
``dot_product`` (``builder build`` passes the profile's). A result under the fidelity floor is kept,
written and flagged with its gap (``on_floor_miss = "keep_best"``), never refused.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional

import numpy as np

from builder.compression.base import (CompressionStep, ModelForm, ModelState, SearchEntry, SearchParam,
                                      SpaceOptions, StepContext, StepOrder, StepRecord)
from builder.compression.cpu_features import Int8Support, int8_support
from builder.errors import CompressionError, DataError

log = logging.getLogger(__name__)

RECURRENT_OPS = ("LSTM", "GRU", "RNN")
WEIGHTED = ("Conv", "MatMul", "Gemm", "Attention")
CNN_CALIBRATIONS = ("minmax", "percentile", "entropy")
SPEED_BAND = 1.10  # a candidate within 10% of the fastest one counts as "at its speed"
CLOSE_AGREEMENT = 0.01  # this close in fidelity, a >10% smaller candidate wins (size is a target too)
CLOSE_COSINE = 0.002
# the sensitive-layers candidate keeps only layers this small in float (size is a target too)
MIXED_MAX_WEIGHT_SHARE = 0.1


@dataclass(frozen=True)
class ModelClass:
    kind: str  # "cnn" | "encoder" | "dense" | "recurrent"
    reason: str


def _weight_sizes(model: Any) -> dict[str, int]:
    sizes = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    sizes[node.output[0]] = int(np.prod(attr.t.dims))
    return sizes


def _all_nodes(graph: Any) -> list[Any]:
    out = []
    for node in graph.node:
        out.append(node)
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                out.extend(_all_nodes(attr.g))
    return out


def detect_model_class(path: Path) -> ModelClass:
    """What kind of network the graph is, from its ops and where its weights live."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    nodes = _all_nodes(model.graph)
    ops = collections.Counter(n.op_type for n in nodes)
    recurrent = [op for op in RECURRENT_OPS if ops[op]]
    if recurrent:
        return ModelClass("recurrent", f"{', '.join(f'{ops[o]} {o}' for o in recurrent)} node(s)")
    sizes = _weight_sizes(model)
    conv = other = 0
    for node in nodes:
        if node.op_type in WEIGHTED and len(node.input) > 1 and node.input[1] in sizes:
            if node.op_type == "Conv":
                conv += sizes[node.input[1]]
            else:
                other += sizes[node.input[1]]
    share = conv / max(conv + other, 1)
    if share > 0.5:
        return ModelClass("cnn", f"Conv holds {share:.0%} of the weights")
    attention = ops["Attention"] + ops["MultiHeadAttention"]
    if attention or (ops["Softmax"] and ops["MatMul"] >= 2):
        what = f"{attention} fused Attention" if attention else f"{ops['Softmax']} Softmax beside {ops['MatMul']} MatMul"
        return ModelClass("encoder", f"attention ({what}), MatMul/Gemm hold {1 - share:.0%} of the weights")
    return ModelClass("dense", f"MatMul/Gemm hold {1 - share:.0%} of the weights, no attention")


def first_and_last_weighted(path: Path) -> list[str]:
    """Names of the first Conv/Gemm/MatMul with a constant weight and of the last one (the stem and
    the classifier: the layers int8 hurts most on CNNs, FACTS measured 79% -> 87% top-1 keeping them)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    sizes = _weight_sizes(model)
    names = [n.name for n in model.graph.node
             if n.op_type in WEIGHTED and n.name and len(n.input) > 1 and n.input[1] in sizes]
    return list(dict.fromkeys([names[0], names[-1]])) if names else []


@dataclass(frozen=True)
class Candidate:
    label: str
    equalize: bool
    quantize: dict[str, Any]


@dataclass(frozen=True)
class Int8Step(CompressionStep):
    """int8 by model class and CPU (see the module docstring); records the choice and why."""

    name: ClassVar[str] = "int8"
    form: ClassVar[ModelForm] = ModelForm.ONNX
    # it brings its own graph steps (fold / transformer fusions, smoothing) and picks its own settings
    order: ClassVar[StepOrder] = StepOrder(last=True, replaces=("fold", "optimize_graph", "smooth", "quantize"))
    arch: Optional[str] = None  # the target CPU; None = this host
    dot_product: Optional[bool] = None
    min_cosine: float = 0.9  # the fidelity floor (below it the best result is kept and flagged)
    min_agreement: float = 0.8
    calibrations: tuple[str, ...] = CNN_CALIBRATIONS
    # CNNs under this fidelity (on the calibration data) get a last candidate that keeps up to
    # max_kept of the most sensitive layers in float; it wins only within the speed band. Measured on
    # EfficientNet-Lite0 (VNNI): 4 layers kept lifted held-out top-1 88.5% -> 90.6%.
    target_cosine: float = 0.999
    target_agreement: float = 0.98
    max_kept: int = 4
    check_latency: bool = True
    threads: int = 1
    eval_samples: int = 128
    calibration_samples: int = 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "calibrations", tuple(self.calibrations))

    def requires_data(self) -> bool:
        return False  # encoders and recurrent nets have a data-free variant; a CNN says so when it runs

    @classmethod
    def search_params(cls, options: SpaceOptions) -> tuple[SearchParam, ...]:
        # one of the quantization modes, ahead of quantize's own (which declares the rest)
        return (SearchParam("quant_mode", (cls.name,)),) if options.usable("quantize") else ()

    @classmethod
    def search_entries(cls, values: Mapping[str, Any], options: SpaceOptions) -> tuple[SearchEntry, ...]:
        if values.get("quant_mode", "none") != cls.name:
            return ()
        # op formats for the profile's CPU; no sensitivity pass inside a trial (minutes on a real CNN,
        # and the search varies keep_float itself through quantize's own parameters)
        return (SearchEntry({**dict(options.target_cpu or {}), "max_kept": 0}),)

    # -- main ---------------------------------------------------------------------------------------
    def apply(self, state: ModelState, ctx: StepContext) -> tuple[ModelState, StepRecord]:
        if state.onnx_path is None:
            raise CompressionError("int8 needs an ONNX model; the engine exports before graph steps")
        cpu = int8_support(self.arch, self.dot_product)
        kind = detect_model_class(Path(state.onnx_path))
        has_data = ctx.calibration_batches is not None
        if kind.kind == "cnn":
            if not has_data:
                raise DataError("int8 for a Conv net is static QDQ int8 and needs calibration data; pass --data "
                                "(or --quantize int8-dynamic, slow on Conv: ConvInteger)")
            new_state, chosen, records, candidates = self._cnn(state, ctx, cpu, kind)
        else:
            new_state, chosen, records, candidates = self._matmul(state, ctx, cpu, kind, has_data)
        final = records[-1]
        choice = f"int8 recipe '{chosen}' for a {kind.kind} ({kind.reason}; CPU {cpu.description})"
        log.info("%s", choice)
        warnings = [w for r in records for w in r.warnings]
        facts: dict[str, Any] = {
            "choice": choice, "model_class": kind.kind, "class_reason": kind.reason, "cpu_int8": cpu.description,
            "recipe": chosen, "candidates": candidates,
            "steps": [{"step": r.step, "facts": dict(r.facts)} for r in records],
        }
        for key in ("mode", "cosine_mean", "cosine_min", "agreement", "latency_ratio", "kept_float", "floor_missed"):
            if key in final.facts:
                facts[key] = final.facts[key]
        return new_state, StepRecord(step=self.name, params=dataclasses.asdict(self), facts=facts,
                                     warnings=tuple(dict.fromkeys(warnings)))

    # -- by class -----------------------------------------------------------------------------------
    def _sub(self, ctx: StepContext, label: str) -> StepContext:
        workdir = Path(ctx.workdir) / label
        workdir.mkdir(parents=True, exist_ok=True)
        return dataclasses.replace(ctx, workdir=workdir)

    def _quantize_step(self, ctx: StepContext, **params: Any) -> Any:
        from builder.compression.quantization import QuantizeStep

        return QuantizeStep(min_cosine=self.min_cosine, min_agreement=self.min_agreement, on_floor_miss="keep_best",
                            check_latency=self.check_latency, threads=self.threads, eval_samples=self.eval_samples,
                            calibration_samples=self.calibration_samples,
                            calibration_cache_dir=str(Path(ctx.workdir) / "ranges"), **params)

    def _matmul(self, state: ModelState, ctx: StepContext, cpu: Int8Support, kind: ModelClass, has_data: bool
                ) -> tuple[ModelState, str, list[StepRecord], list[dict[str, Any]]]:
        from builder.compression.fusion import OptimizeGraphStep
        from builder.compression.smoothing import SmoothStep

        records: list[StepRecord] = []
        parts = []
        if kind.kind == "encoder":
            try:
                state, record = OptimizeGraphStep(level="basic", bert_fusions=True).apply(state, self._sub(ctx, "fuse"))
                records.append(record)
                parts.append("transformer fusions")
            except CompressionError as exc:  # a graph ORT's fuser does not know: quantize it unfused
                log.warning("int8: transformer fusions skipped (%s)", exc)
        params: dict[str, Any] = {"mode": "dynamic", "per_channel": True}
        if kind.kind != "recurrent":
            # int8 weights run U8S8, ORT's fast int8 GEMM (17% faster than U8U8 on AVX2, bench/RESULTS.md).
            # Where U8S8 saturates (x86 without VNNI) uint8 weights keep the fused QAttention faithful;
            # with VNNI / dot-product nothing saturates, and U8U8 Attention has no VNNI kernel.
            params.update(weight_type="int8", weight_types={"Attention": "uint8"} if cpu.u8s8_saturates else {})
        if has_data and kind.kind != "recurrent":
            state, record = SmoothStep(alpha=0.85).apply(state, self._sub(ctx, "smooth"))
            records.append(record)
            parts.append("smoothing 0.85")
            params["weight_rounding"] = "gptq"
        state, record = self._quantize_step(ctx, **params).apply(state, self._sub(ctx, "quantize"))
        records.append(record)
        parts.append("per-channel dynamic int8" + (" (Attention uint8, MatMul int8)" if params.get("weight_types") else "")
                     + (" + GPTQ" if params.get("weight_rounding") == "gptq" else ""))
        label = " + ".join(parts)
        return state, label, records, [_candidate_row(label, record)]

    def _cnn(self, state: ModelState, ctx: StepContext, cpu: Int8Support, kind: ModelClass
             ) -> tuple[ModelState, str, list[StepRecord], list[dict[str, Any]]]:
        from builder.compression.equalization import EqualizeStep
        from builder.compression.fusion import FoldStep

        folded, fold_record = FoldStep().apply(state, self._sub(ctx, "fold"))
        equalized: Optional[tuple[ModelState, StepRecord]] = None
        assert folded.onnx_path is not None  # FoldStep writes its result
        ends = first_and_last_weighted(Path(folded.onnx_path))
        base = {"mode": "static", "per_channel": True, "activation_type": "uint8", "weight_type": "int8",
                "calibration": self.calibrations[0] if self.calibrations else "minmax", "keep_float": tuple(ends)}
        tried: list[dict[str, Any]] = []
        results: dict[str, tuple[ModelState, StepRecord, Candidate]] = {}
        speeds = SpeedBook()

        def run(candidate: Candidate) -> tuple[ModelState, StepRecord]:
            nonlocal equalized
            source = folded
            if candidate.equalize:
                if equalized is None:
                    equalized = EqualizeStep().apply(folded, self._sub(ctx, "equalize"))
                source = equalized[0]
            out_state, record = self._quantize_step(ctx, **candidate.quantize).apply(
                source, self._sub(ctx, f"q{len(tried):02d}"))
            results[candidate.label] = (out_state, record, candidate)
            speeds.add(out_state, float(record.facts.get("latency_ratio", 1.0)))
            tried.append(_candidate_row(candidate.label, record))
            log.info("int8 candidate %s: agreement %.3f, cosine %.4f, latency x%.2f", candidate.label,
                     record.facts.get("agreement", 0), record.facts.get("cosine_mean", 0),
                     record.facts.get("latency_ratio", 1))
            return out_state, record

        # one sample's worth of agreement is noise, not a difference (64 calibration photos: 1.6 points)
        one_sample = 1.0 / max(1, _sample_count(ctx, self.eval_samples))
        best = Candidate(f"static QDQ per-channel u8/s8, {base['calibration']}, first+last float", False, base)
        run(best)

        def consider(candidate: Candidate) -> None:
            nonlocal best
            run(candidate)
            challenger, incumbent = results[candidate.label], results[best.label]
            if _wins(challenger, incumbent, ctx.task, speeds.fastest(), one_sample,
                     (speeds.ratio(challenger[0]), speeds.ratio(incumbent[0]))):
                best = candidate

        for calibration in self.calibrations[1:]:
            consider(dataclasses.replace(best, label=best.label.replace(best.quantize["calibration"], calibration),
                                         quantize={**best.quantize, "calibration": calibration}))
        if cpu.u8s8_saturates:  # ORT's two remedies for VPMADDUBSW's 16-bit saturation (docs/int8.md)
            consider(Candidate(best.label + ", 7-bit weights (no VNNI)", best.equalize,
                               {**best.quantize, "reduce_range": True}))
            consider(Candidate(best.label.replace("u8/s8", "u8/u8") + " (no VNNI)", best.equalize,
                               {**best.quantize, "weight_type": "uint8", "reduce_range": False}))
        consider(Candidate(best.label + ", bias correction", best.equalize, {**best.quantize, "bias_correction": True}))
        # rounding chosen for each layer's outputs on the calibration data (GPTQ on Conv, depthwise included)
        consider(Candidate(best.label + ", GPTQ rounding", best.equalize, {**best.quantize, "weight_rounding": "gptq"}))
        consider(Candidate("equalised, " + best.label, True, best.quantize))
        if len(ends) == 2:  # the classifier in int8 too: a large Gemm is most of a small CNN's size
            consider(Candidate(best.label.replace(", first+last float", ", first float"), best.equalize,
                               {**best.quantize, "keep_float": tuple(ends[:1])}))
        if ends:
            consider(Candidate(re.sub(r", first(\+last)? float", ", all int8", best.label), best.equalize,
                               {**best.quantize, "keep_float": ()}))
        facts = results[best.label][1].facts
        if self.max_kept and (facts.get("cosine_mean", 0) < self.target_cosine
                              or facts.get("agreement", 0) < self.target_agreement):
            # the sensitivity search: the few layers whose float copy brings the most fidelity back
            consider(Candidate(best.label + f", up to {self.max_kept} sensitive layers float", best.equalize,
                               {**best.quantize, "target_cosine": self.target_cosine,
                                "target_agreement": self.target_agreement, "max_kept": self.max_kept,
                                "mixed_max_weight_share": MIXED_MAX_WEIGHT_SHARE}))
        out_state, record, chosen = results[best.label]
        pre = [fold_record] + ([equalized[1]] if chosen.equalize and equalized is not None else [])
        return out_state, chosen.label, pre + [record], tried


class SpeedBook:
    """Latency ratios by graph: candidates that differ only in weight values (bias correction, GPTQ,
    calibration ranges) run the same kernels at the same speed, so their measurements are pooled and
    their median compared. On a shared machine one lucky measurement of an identical graph read
    x0.41 beside x0.50-0.57 for the others and pushed every later candidate out of the speed band."""

    def __init__(self) -> None:
        self._ratios: dict[tuple[Any, ...], list[float]] = {}

    @staticmethod
    def signature(state: ModelState) -> tuple[Any, ...]:
        """Op types in order and the integer weights' element types: what decides the kernels."""
        import onnx

        model = onnx.load(str(state.onnx_path), load_external_data=False)
        dtypes = collections.Counter(i.data_type for i in model.graph.initializer if i.name.endswith("_quantized"))
        return tuple(n.op_type for n in model.graph.node), tuple(sorted(dtypes.items()))

    def add(self, state: ModelState, ratio: float) -> None:
        self._ratios.setdefault(self.signature(state), []).append(ratio)

    def ratio(self, state: ModelState) -> float:
        return float(np.median(self._ratios.get(self.signature(state), [1.0])))

    def fastest(self) -> float:
        return min(float(np.median(r)) for r in self._ratios.values())


def _candidate_row(label: str, record: StepRecord) -> dict[str, Any]:
    facts = record.facts
    return {"recipe": label, **{k: facts.get(k) for k in ("agreement", "cosine_mean", "latency_ratio")},
            "floor_missed": facts.get("floor_missed")}


def _sample_count(ctx: StepContext, cap: int) -> int:
    """How many samples the candidates are judged on (the quantize step's ``eval_samples`` cap)."""
    count = 0
    if ctx.calibration_batches is not None:
        for batch in ctx.calibration_batches():
            count += len(next(iter(batch.values())))
            if count >= cap:
                return cap
    return count


def _wins(challenger: tuple[ModelState, StepRecord, Candidate], incumbent: tuple[ModelState, StepRecord, Candidate],
          task: str, fastest_ratio: float, one_sample: float = 0.0,
          ratios: Optional[tuple[float, float]] = None) -> bool:
    """More faithful and within ``SPEED_BAND`` of the fastest candidate so far (or faster than the
    incumbent when that one is out of the band); as faithful (agreement within ``CLOSE_AGREEMENT``
    or one sample, whichever is more; cosine within ``CLOSE_COSINE``) and >10% smaller also wins."""
    c, i = challenger[1].facts, incumbent[1].facts
    limit = fastest_ratio * SPEED_BAND
    c_ratio, i_ratio = ratios or (float(c.get("latency_ratio", 1.0)), float(i.get("latency_ratio", 1.0)))
    if c_ratio > limit:
        return False
    if i_ratio > limit:
        return True
    close = (abs(c.get("agreement", 0) - i.get("agreement", 0)) <= max(CLOSE_AGREEMENT, one_sample) + 1e-9
             and abs(c.get("cosine_mean", 0) - i.get("cosine_mean", 0)) <= CLOSE_COSINE)
    if close and _size(challenger[0]) < 0.9 * _size(incumbent[0]):
        return True
    key = (lambda f: (f.get("cosine_mean", 0), f.get("agreement", 0))) if task == "embed" else \
        (lambda f: (round(f.get("agreement", 0), 3), f.get("cosine_mean", 0)))
    return key(c) > key(i)


def _size(state: ModelState) -> int:
    return Path(state.onnx_path).stat().st_size if state.onnx_path else 0
