"""Graph fusion and folding: steps ``fold`` and ``optimize_graph``.

- ``fold``: BatchNormalization folded into the preceding Conv (numpy, exact up to float rounding),
  then constant folding and simplification with onnxslim. Output is plain ONNX, portable anywhere.
- ``optimize_graph``: ONNX Runtime's offline optimisation (``SessionOptions.optimized_model_filepath``)
  at a PORTABLE level — "basic" or "extended", never "all": ORT_ENABLE_ALL writes CPU-specific NCHWc
  layout ops that failed to load on arm64 (FACTS.md). Optionally first the transformer fusions of
  ``onnxruntime.transformers.optimizer`` (``bert_fusions=True``: Attention, SkipLayerNormalization,
  BiasGelu, EmbedLayerNormalization; com.microsoft contrib ops that every ORT CPU build ships).
  The Attention fusion needs the head count and the q/k/v width: they are read from the graph (the
  q/k/v MatMul widths and the head size in their Reshape), because torch exports reshape to
  ``(-1, head_size)`` which ORT cannot detect, and a head-pruned model no longer has the count a
  recipe names (ORT then silently builds a wrong Attention). A fused graph whose outputs differ is
  redone without the Attention fusion, and the step record says so.
  Every output is checked: it must load, contain no ``com.microsoft.nchwc`` op and match its input.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional

import numpy as np

from builder.compression.base import (CompressionStep, ModelForm, ModelState, SearchEntry, SearchParam,
                                      SpaceOptions, StepContext, StepOrder, StepRecord)
from builder.errors import CompressionError, UsageError

log = logging.getLogger(__name__)

NON_PORTABLE_DOMAINS = ("com.microsoft.nchwc",)
PORTABLE_LEVELS = ("basic", "extended")
GRAPH_REWRITE_ORDER = StepOrder(before=("smooth", "quantize"))  # smoothing and quantization see the rewritten graph


# ---- BatchNorm folding -------------------------------------------------------------------------
def fold_batchnorm(model: Any) -> int:
    """Fold every Conv -> BatchNormalization pair (Conv output used only by the BN) in place.

    W' = W * g / sqrt(v + eps) per output channel, b' = (b - m) * g / sqrt(v + eps) + beta.
    Returns the number of BatchNormalization nodes removed.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    graph_outputs = {out.name for out in graph.output}
    producers = {out: node for node in graph.node for out in node.output}
    removed = []
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        conv = producers.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or consumers.get(bn.input[0], 0) != 1 \
                or bn.input[0] in graph_outputs or conv.input[1] not in inits \
                or not all(name in inits for name in bn.input[1:5]) \
                or (len(conv.input) > 2 and conv.input[2] not in inits):
            continue
        eps = next((attr.f for attr in bn.attribute if attr.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[name]).astype(np.float64) for name in bn.input[1:5])
        weight = numpy_helper.to_array(inits[conv.input[1]])
        bias = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 \
            else np.zeros(weight.shape[0])
        scale = gamma / np.sqrt(var + eps)
        new_weight = (weight.astype(np.float64) * scale.reshape(-1, *([1] * (weight.ndim - 1)))).astype(weight.dtype)
        new_bias = ((bias - mean) * scale + beta).astype(weight.dtype)
        weight_name, bias_name = conv.output[0] + "_folded_W", conv.output[0] + "_folded_B"
        graph.initializer.extend([numpy_helper.from_array(new_weight, weight_name),
                                  numpy_helper.from_array(new_bias, bias_name)])
        conv.input[1] = weight_name
        if len(conv.input) > 2:
            conv.input[2] = bias_name
        else:
            conv.input.append(bias_name)
        conv.output[0] = bn.output[0]
        removed.append(bn)
    for bn in removed:
        graph.node.remove(bn)
    _drop_unused_initializers(model)
    return len(removed)


def _drop_unused_initializers(model: Any) -> None:
    used = {name for node in model.graph.node for name in node.input} | {out.name for out in model.graph.output}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


# ---- checks shared by the graph steps -----------------------------------------------------------
def non_portable_ops(model: Any) -> list[str]:
    """Names (or op types) of nodes in a domain that only some CPUs can run (NCHWc layouts)."""
    return [node.name or node.op_type for node in model.graph.node if node.domain in NON_PORTABLE_DOMAINS]


def sample_feed(session: Any, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for a session; symbolic dims become ``batch`` (first) or 1, ints are small."""
    rng = np.random.default_rng(seed)
    feed = {}
    for graph_input in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else (batch if i == 0 else 1)
                 for i, d in enumerate(graph_input.shape)]
        if "int" in graph_input.type:
            feed[graph_input.name] = rng.integers(0, 2, size=shape).astype(np.int64 if "64" in graph_input.type else np.int32)
        else:
            feed[graph_input.name] = rng.random(shape, dtype=np.float32)
    return feed


def check_same_outputs(reference: Path, candidate: Path, batches: list[dict[str, np.ndarray]] | None,
                       rtol: float = 1e-3, atol: float = 1e-4) -> float:
    """Run both models on the same inputs; raise CompressionError when outputs differ beyond tolerance.

    Returns the largest absolute difference seen."""
    from builder.execution.sessions import make_session

    ref_session, cand_session = make_session(reference, 1), make_session(candidate, 1)
    feeds = batches or [sample_feed(ref_session)]
    worst = 0.0
    for feed in feeds:
        ref_out = ref_session.run(None, feed)
        cand_out = cand_session.run(None, {k: v for k, v in feed.items()
                                           if k in {i.name for i in cand_session.get_inputs()}})
        for a, b in zip(ref_out, cand_out):
            if a.shape != b.shape:
                raise CompressionError(f"graph optimisation changed an output shape {a.shape} -> {b.shape}; "
                                       "report this model, and drop the step from the recipe")
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            worst = max(worst, float(diff.max(initial=0.0)))
            if not np.all(diff <= atol + rtol * np.abs(a)):
                raise CompressionError(f"graph optimisation changed the outputs (max abs diff {worst:.3g}); "
                                       "drop the step from the recipe")
    return worst


def _first_batches(ctx: StepContext, limit: int = 2) -> list[dict[str, np.ndarray]] | None:
    if ctx.calibration_batches is None:
        return None
    out = []
    for batch in ctx.calibration_batches():
        out.append(batch)
        if len(out) >= limit:
            break
    return out or None


def _ops(model: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# ---- steps --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FoldStep(CompressionStep):
    """BatchNorm folding + constant folding + onnxslim simplification; outputs unchanged (checked)."""

    name: ClassVar[str] = "fold"
    form: ClassVar[ModelForm] = ModelForm.ONNX
    order: ClassVar[StepOrder] = GRAPH_REWRITE_ORDER
    simplify: bool = True  # run onnxslim after BN folding

    @classmethod
    def search_params(cls, options: SpaceOptions) -> tuple[SearchParam, ...]:
        # one graph rewrite or none: optimize_graph offers its own under the same name
        return (SearchParam("graph", ("none", "fold"), start="fold"),)

    @classmethod
    def search_entries(cls, values: Mapping[str, Any], options: SpaceOptions) -> tuple[SearchEntry, ...]:
        return (SearchEntry(),) if values.get("graph", "none") == "fold" else ()

    @classmethod
    def search_fallback(cls, options: SpaceOptions) -> Optional[SearchEntry]:
        return SearchEntry()  # nothing switched on: fold alone (lossless, often faster)

    def apply(self, state: ModelState, ctx: StepContext) -> tuple[ModelState, StepRecord]:
        import onnx

        if state.onnx_path is None:
            raise CompressionError("fold needs an ONNX model; the engine should export before graph steps")
        model = onnx.load(str(state.onnx_path))
        before = _ops(model)
        folded = fold_batchnorm(model)
        warnings: list[str] = []
        if self.simplify:
            try:
                import onnxslim

                model = onnxslim.slim(model)
            except Exception as exc:  # noqa: BLE001 - onnxslim is optional polish; keep the BN-folded graph
                warnings.append(f"onnxslim failed, kept the BN-folded graph: {exc}")
                log.warning("onnxslim failed: %s", exc)
        out = ctx.workdir / "model.onnx"
        _save(model, out)
        max_diff = check_same_outputs(state.onnx_path, out, _first_batches(ctx), rtol=1e-4, atol=1e-5)
        after = _ops(model)
        facts = {"batchnorm_folded": folded, "nodes_before": sum(before.values()), "nodes_after": sum(after.values()),
                 "batchnorm_left": after.get("BatchNormalization", 0), "max_abs_diff": max_diff}
        return dataclasses.replace(state, onnx_path=out), StepRecord(
            step=self.name, params=dataclasses.asdict(self), facts=facts, warnings=tuple(warnings))


@dataclass(frozen=True)
class OptimizeGraphStep(CompressionStep):
    """ONNX Runtime offline graph optimisation at a portable level (+ optional BERT fusions)."""

    name: ClassVar[str] = "optimize_graph"
    form: ClassVar[ModelForm] = ModelForm.ONNX
    order: ClassVar[StepOrder] = GRAPH_REWRITE_ORDER
    level: str = "extended"  # "basic" | "extended"; "all" is refused (NCHWc ops do not load on arm64)
    bert_fusions: bool = False  # onnxruntime.transformers.optimizer, model_type bert
    num_heads: int = 0  # 0 = let the optimizer detect it
    hidden_size: int = 0

    def __post_init__(self) -> None:
        if self.level not in PORTABLE_LEVELS:
            raise UsageError(f"optimize_graph level {self.level!r} is not portable; use one of "
                             f"{', '.join(PORTABLE_LEVELS)} ('all' writes x86-only NCHWc ops)")

    @classmethod
    def search_params(cls, options: SpaceOptions) -> tuple[SearchParam, ...]:
        # the transformer fusions (attention, LayerNorm, GELU), for models with MatMuls
        return (SearchParam("graph", ("none", "transformer"), start="transformer"),) if options.has_matmul else ()

    @classmethod
    def search_entries(cls, values: Mapping[str, Any], options: SpaceOptions) -> tuple[SearchEntry, ...]:
        if values.get("graph", "none") != "transformer":
            return ()
        return (SearchEntry({"level": "basic", "bert_fusions": True}),)  # heads/hidden detected from the graph

    def apply(self, state: ModelState, ctx: StepContext) -> tuple[ModelState, StepRecord]:
        import onnx

        if state.onnx_path is None:
            raise CompressionError("optimize_graph needs an ONNX model")
        source = Path(state.onnx_path)
        facts: dict[str, Any] = {"level": self.level}
        warnings: list[str] = []
        if self.bert_fusions:
            fused = ctx.workdir / "fused.onnx"
            fusion_facts, fusion_warnings = self._fuse(source, fused, _first_batches(ctx))
            facts.update(fusion_facts)
            warnings += fusion_warnings
            source = fused
        out = ctx.workdir / "model.onnx"
        ort_optimize(source, out, self.level)
        model = onnx.load(str(out), load_external_data=False)
        bad = non_portable_ops(model)
        if bad:
            raise CompressionError(f"optimised graph contains device-specific NCHWc ops ({bad[:3]}); "
                                   "use level = 'basic'")
        max_diff = check_same_outputs(state.onnx_path, out, _first_batches(ctx))
        facts.update(nodes_after=len(model.graph.node), max_abs_diff=max_diff,
                     domains=sorted({node.domain or "ai.onnx" for node in model.graph.node}))
        return dataclasses.replace(state, onnx_path=out), StepRecord(
            step=self.name, params=dataclasses.asdict(self), facts=facts, warnings=tuple(warnings))

    def _fuse(self, source: Path, fused: Path,
              batches: list[dict[str, np.ndarray]] | None) -> tuple[dict[str, Any], list[str]]:
        """BERT fusions with the attention geometry read from the graph; without the Attention
        fusion when that changed the outputs. Returns facts and warnings for the step record."""
        import onnx

        layouts = attention_layouts(onnx.load(str(source), load_external_data=False))
        num_heads, hidden_size, warnings = choose_attention_geometry(self.num_heads, self.hidden_size, layouts)
        facts: dict[str, Any] = {"attention": {"num_heads": num_heads, "hidden_size": hidden_size,
                                               "blocks": sum(layouts.values()) // 3,
                                               "layouts": {f"{h}x{w // h}": n // 3 for (h, w), n in layouts.items()}}}
        fused_ops = bert_fuse(source, fused, num_heads, hidden_size)
        if fused_ops.get("Attention"):
            try:
                check_same_outputs(source, fused, batches)
            except CompressionError as exc:
                fused_ops = bert_fuse(source, fused, num_heads, hidden_size, attention=False)
                warnings.append(f"the Attention fusion (num_heads={num_heads}, hidden_size={hidden_size}) changed "
                                f"the outputs ({exc}); fused without Attention")
        fused_attention = fused_ops.get("Attention", 0)
        if layouts and fused_attention < facts["attention"]["blocks"]:
            warnings.append(f"{facts['attention']['blocks'] - fused_attention} of {facts['attention']['blocks']} "
                            "attention blocks were not fused into Attention ops (they run as MatMul/Softmax)")
        facts["fused_ops"] = fused_ops
        return facts, warnings


def ort_optimize(source: Path, out: Path, level: str = "extended") -> None:
    """Write ORT's optimised graph of ``source`` to ``out`` at a portable level."""
    from builder.execution.sessions import open_session

    if level not in ("basic", "extended"):
        raise UsageError(f"optimisation level {level!r} is not portable; use basic or extended")
    try:
        open_session(source, threads=1, level=level, optimized_path=out)
    except Exception as exc:  # ORT raises its own types
        raise CompressionError(f"ONNX Runtime could not optimise {source}: {exc}") from exc


def attention_layouts(model: Any) -> collections.Counter[tuple[int, int]]:
    """``(num_heads, width) -> count`` of the attention projections in an exported transformer: a
    Reshape to ``(batch, seq, heads or -1, head_size)`` of ``MatMul(x, W) [+ bias]`` with W an
    initializer of ``width`` columns (three per attention block: q, k, v). Empty when none is found."""
    from onnx import numpy_helper

    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    inits = {init.name: init for init in graph.initializer}

    def constant(name: str) -> np.ndarray | None:
        if name in inits:
            return numpy_helper.to_array(inits[name])
        node = producers.get(name)
        if node is not None and node.op_type == "Constant":
            value = next((attr.t for attr in node.attribute if attr.name == "value"), None)
            return numpy_helper.to_array(value) if value is not None else None
        return None

    def target_shape(reshape: Any) -> list[int | None] | None:
        value = constant(reshape.input[1])
        if value is not None:
            return [int(v) for v in value.reshape(-1)]
        concat = producers.get(reshape.input[1])
        if concat is None or concat.op_type != "Concat":
            return None
        parts = [constant(name) for name in concat.input]
        return [int(p.reshape(-1)[0]) if p is not None and p.size == 1 else None for p in parts]

    def projection_width(name: str) -> int | None:
        node = producers.get(name)
        if node is not None and node.op_type == "Add":
            node = next((producers[i] for i in node.input if i in producers and producers[i].op_type == "MatMul"), None)
        if node is None or node.op_type != "MatMul" or len(node.input) < 2:
            return None
        weight = inits.get(node.input[1])
        return int(weight.dims[1]) if weight is not None and len(weight.dims) == 2 else None

    layouts: collections.Counter[tuple[int, int]] = collections.Counter()
    for node in graph.node:
        if node.op_type != "Reshape":
            continue
        shape = target_shape(node)
        if shape is None or len(shape) != 4 or shape[3] is None or shape[3] <= 0 or shape[2] is None:
            continue
        width = projection_width(node.input[0])
        if width is None or width % shape[3]:
            continue
        heads = width // shape[3]
        if shape[2] in (-1, heads):
            layouts[(heads, width)] += 1
    return layouts


def choose_attention_geometry(num_heads: int, hidden_size: int, layouts: collections.Counter[tuple[int, int]]
                              ) -> tuple[int, int, list[str]]:
    """The ``num_heads`` / ``hidden_size`` (q/k/v width) to hand ORT's fusion: the graph's own most
    common layout; the recipe's values only where the graph shows none. Returns warnings too."""
    if not layouts:
        return num_heads, hidden_size, []
    (heads, width), _ = layouts.most_common(1)[0]
    warnings = []
    if num_heads and (num_heads, hidden_size or num_heads * (width // heads)) != (heads, width):
        warnings.append(f"num_heads = {num_heads}, hidden_size = {hidden_size} do not match the model's attention "
                        f"({heads} heads, q/k/v width {width}; pruned heads?): used the model's")
    if len(layouts) > 1:
        warnings.append(f"attention blocks differ in head count ({sorted(layouts)}); ORT's fusion takes one, "
                        f"only blocks with {heads} heads are fused")
    return heads, width, warnings


class _DropLogMessages(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def bert_fuse(source: Path, out: Path, num_heads: int = 0, hidden_size: int = 0,
              attention: bool = True) -> dict[str, int]:
    """Transformer fusions (python-only, opt_level 0 so nothing CPU-specific); returns fused-op counts.
    ``hidden_size`` is the q/k/v width (``num_heads * head_size``), which head pruning makes smaller
    than the model's hidden size."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_attention = attention
    # ORT warns when the q/k/v width differs from their input width, which is right after head pruning.
    # Its modules log under their bare names (it puts its folder on sys.path) or their package names.
    quiet = _DropLogMessages("Input hidden size")
    attention_logs = [logging.getLogger(name) for name in ("fusion_attention", "onnxruntime.transformers.fusion_attention")]
    for attention_log in attention_logs:
        attention_log.addFilter(quiet)
    try:
        optimized = optimize_model(str(source), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                                   optimization_options=options, opt_level=0)
    except Exception as exc:  # the optimizer raises many types on unexpected graphs
        raise CompressionError(f"BERT fusions failed on {source}: {exc}; set bert_fusions = false") from exc
    finally:
        for attention_log in attention_logs:
            attention_log.removeFilter(quiet)
    optimized.save_model_to_file(str(out))
    return {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}


def _save(model: Any, path: Path) -> None:
    import onnx

    path = Path(path)
    tmp = path.with_suffix(".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(path)
