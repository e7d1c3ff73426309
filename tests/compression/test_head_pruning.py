"""Head pruning of HF BERT attention (prune_channels with head_ratio): whole heads and FFN units are
removed, the hidden width stays, the pruned model exports to ONNX and ORT agrees with torch; the
graph fusions see the pruned head count; fine-tuning distils the pruned embedder back to the original."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from builder.compression._export import export_module
from builder.compression.base import ModelState, StepContext
from builder.compression.channel_pruning import ChannelPruneStep, hf_self_attention_modules
from builder.compression.data import DataSource
from builder.compression.fusion import OptimizeGraphStep, attention_layouts
from builder.compression.training import trim_padding
from builder.errors import UsageError
from builder.loading.types import InputSpec
from compression_helpers import context, torch_state

transformers = pytest.importorskip("transformers")

SEQ = 16
VOCAB = 120
HIDDEN = 64
INPUTS = (InputSpec("input_ids", (1, SEQ), "int64"), InputSpec("attention_mask", (1, SEQ), "int64"))


def tiny_bert_embedder() -> torch.nn.Module:
    """A randomly initialised 2-layer BERT (hidden 64, 4 heads of 16, FFN 128) with MiniLM's pooling."""
    from builder.zoo.minilm import MiniLMEmbedder

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64, attn_implementation="eager",
                                     initializer_range=0.2)  # BERT's 0.02 gives near-identical embeddings for all inputs
    return MiniLMEmbedder(transformers.BertModel(config, add_pooling_layer=False)).eval()


def token_batch(count: int, seed: int) -> dict[str, np.ndarray]:
    """Random token ids, right-padded to SEQ with lengths 4..SEQ (some rows padded, as sentences are)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, SEQ + 1, size=count)
    lengths[0] = SEQ // 2  # at least one padded row
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, VOCAB, size=(count, SEQ)).astype(np.int64) * mask
    return {"input_ids": ids, "attention_mask": mask}


def pruned_bert_onnx(tmp_path: Path, fraction: float) -> tuple[torch.nn.Module, Path]:
    """The tiny BERT with ``fraction`` of its heads and FFN units removed, and its ONNX export."""
    state, _ = ChannelPruneStep(ratio=fraction, head_ratio=fraction, epochs=0).apply(
        torch_state(tiny_bert_embedder(), INPUTS), context(tmp_path))
    path = tmp_path / "pruned.onnx"
    export_module(state.torch_module, INPUTS, path)
    return state.torch_module, path


def embed(module: torch.nn.Module, batch: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"])).numpy()


def test_head_pruning_removes_whole_heads_and_ffn_units_and_keeps_hidden_width(tmp_path: Path) -> None:
    model = tiny_bert_embedder()
    state, record = ChannelPruneStep(ratio=0.5, head_ratio=0.5, epochs=0).apply(torch_state(model, INPUTS),
                                                                                context(tmp_path))
    encoder = state.torch_module.encoder
    for layer in encoder.encoder.layer:
        attention = layer.attention.self
        assert attention.num_attention_heads == 2 and attention.attention_head_size == 16
        assert attention.all_head_size == 32
        for projection in (attention.query, attention.key, attention.value):
            assert tuple(projection.weight.shape) == (32, HIDDEN)  # 2 heads x 16 rows, inputs unchanged
        assert tuple(layer.attention.output.dense.weight.shape) == (HIDDEN, 32)
        assert layer.intermediate.dense.out_features == 64  # FFN 128 -> 64
        assert tuple(layer.output.dense.weight.shape) == (HIDDEN, 64)
        assert layer.output.LayerNorm.normalized_shape == (HIDDEN,)
    assert encoder.embeddings.word_embeddings.embedding_dim == HIDDEN
    assert record.facts["attention_heads"] == {"before": [4, 4], "after": [2, 2], "total": [8, 4]}
    assert record.facts["hidden_kept"] is True
    assert record.facts["params_after"] < record.facts["params_before"]
    assert record.facts["macs_after"] < 0.6 * record.facts["macs_before"]
    assert embed(state.torch_module, token_batch(3, seed=1)).shape == (3, HIDDEN)


def test_head_pruned_bert_exports_and_onnx_runtime_matches_torch(tmp_path: Path) -> None:
    pruned, path = pruned_bert_onnx(tmp_path, 0.25)
    assert attention_layouts(onnx.load(str(path))) == {(3, 48): 6}  # q, k, v of 2 layers: 3 heads of 16
    batch = token_batch(5, seed=2)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, batch)[0], embed(pruned, batch), atol=1e-5)


def test_iterative_head_pruning_lands_on_the_target_count(tmp_path: Path) -> None:
    """Torch-Pruning applies each round's cumulative ratio to the heads left (4 -> 3 -> 1 for 50 %
    in two rounds); the step's schedule corrects that."""
    model = tiny_bert_embedder()
    state, record = ChannelPruneStep(ratio=0.5, prune_heads=True, iterative_steps=2, epochs=0).apply(
        torch_state(model, INPUTS), context(tmp_path))
    assert record.facts["attention_heads"]["after"] == [2, 2]
    assert [a.query.out_features for a in hf_self_attention_modules(state.torch_module)] == [32, 32]


def test_without_head_ratio_heads_stay_and_only_ffn_units_go(tmp_path: Path) -> None:
    model = tiny_bert_embedder()
    state, record = ChannelPruneStep(ratio=0.5, epochs=0).apply(torch_state(model, INPUTS), context(tmp_path))
    assert record.facts["attention_heads"]["after"] == [4, 4]
    layer = state.torch_module.encoder.encoder.layer[0]
    assert layer.attention.self.query.out_features == HIDDEN and layer.intermediate.dense.out_features == 64


def test_fine_tuning_distils_the_pruned_embedder_towards_the_original(tmp_path: Path) -> None:
    teacher = tiny_bert_embedder()
    train = DataSource.from_arrays(token_batch(256, seed=3), None, INPUTS, "tokens")
    held_out = token_batch(64, seed=4)
    cosine = {}
    for epochs in (0, 3):
        ctx = context(tmp_path, train=train, teacher=teacher, task="embed")
        step = ChannelPruneStep(ratio=0.5, head_ratio=0.5, importance="magnitude", epochs=epochs, lr=1e-3)
        state, record = step.apply(torch_state(copy.deepcopy(teacher), INPUTS), ctx)
        cosine[epochs] = float((embed(state.torch_module, held_out) * embed(teacher, held_out)).sum(axis=1).mean())
    assert record.facts["fine_tune"][0]["last_loss"] < record.facts["fine_tune"][0]["first_loss"]
    assert 1 - cosine[3] < 0.7 * (1 - cosine[0])  # distance to the original's embeddings down by 30 %+


def test_trim_padding_cuts_shared_padding_and_keeps_embeddings() -> None:
    model = tiny_bert_embedder()
    batch = token_batch(4, seed=5)
    batch["attention_mask"][:, 12:] = 0
    batch["input_ids"][:, 12:] = 0
    trimmed = trim_padding(batch)
    assert trimmed["input_ids"].shape == (4, 12) and trimmed["attention_mask"].shape == (4, 12)
    np.testing.assert_allclose(embed(model, trimmed), embed(model, batch), atol=1e-6)
    image = {"x": np.zeros((2, 3), np.float32)}
    assert trim_padding(image) is image  # no attention mask: untouched


def test_attention_fusion_uses_the_pruned_head_count_not_the_recipe_one(tmp_path: Path) -> None:
    """A recipe written for the unpruned model (4 heads, width 64) must not build wrong Attention ops."""
    _, source = pruned_bert_onnx(tmp_path, 0.5)
    batch = token_batch(4, seed=6)
    workdir = tmp_path / "fuse"
    workdir.mkdir()
    ctx = StepContext(workdir=workdir, calibration_batches=lambda: iter([batch]))
    fused, record = OptimizeGraphStep(level="basic", bert_fusions=True, num_heads=4, hidden_size=HIDDEN).apply(
        ModelState(INPUTS, ("output",), onnx_path=source), ctx)
    assert record.facts["attention"]["num_heads"] == 2 and record.facts["attention"]["hidden_size"] == 32
    assert record.facts["fused_ops"].get("Attention") == 2
    assert any("do not match" in warning for warning in record.warnings)
    expected = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, batch)[0]
    got = ort.InferenceSession(str(fused.onnx_path), providers=["CPUExecutionProvider"]).run(None, batch)[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_head_ratio_parameters_are_checked() -> None:
    assert ChannelPruneStep(ratio=0.3, prune_heads=True).head_fraction == 0.3  # the old switch still works
    assert ChannelPruneStep(ratio=0.3, head_ratio=0.5).head_fraction == 0.5
    assert ChannelPruneStep(ratio=0.3).head_fraction == 0.0
    with pytest.raises(UsageError, match="head_ratio"):
        ChannelPruneStep(head_ratio=1.0)
    with pytest.raises(UsageError, match="prune_heads"):
        ChannelPruneStep(prune_heads=True, head_ratio=0.0)


def test_half_width_student_of_a_bert_keeps_its_embedding_size(tmp_path: Path) -> None:
    """distill(width=0.5) builds its student with the same head-aware pruning: half the heads and
    FFN units, the output width unchanged (an embedding must stay comparable with the teacher's)."""
    from builder.compression.distillation import narrower

    student = narrower(tiny_bert_embedder(), 0.5, INPUTS)
    assert [a.num_attention_heads for a in hf_self_attention_modules(student)] == [2, 2]
    assert embed(student, token_batch(2, seed=7)).shape == (2, HIDDEN)


def test_activation_importance_removes_a_constant_unit_without_changing_outputs(tmp_path: Path) -> None:
    """A unit whose output never moves carries no information: activation importance removes it
    first, and its constant contribution is folded into the next layer's bias (outputs unchanged)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).eval()
    with torch.no_grad():
        model[0].weight[4] = 0.0
        model[0].bias[4] = 2.0  # unit 4 outputs tanh(2) whatever the input
    inputs = (InputSpec("x", (1, 3)),)
    x = np.random.default_rng(0).standard_normal((64, 3)).astype(np.float32)
    before = model(torch.from_numpy(x)).detach().numpy()
    ctx = context(tmp_path, calibration=DataSource.from_arrays({"x": x}, None, inputs, "x"))
    state, record = ChannelPruneStep(ratio=1 / 6, importance="activation", epochs=0).apply(
        torch_state(model, inputs), ctx)
    assert state.torch_module[0].out_features == 5 and record.facts["bias_compensated"] == 1
    np.testing.assert_allclose(state.torch_module(torch.from_numpy(x)).detach().numpy(), before, atol=1e-5)


def test_activation_importance_keeps_a_pruned_bert_closer_than_magnitude(tmp_path: Path) -> None:
    teacher = tiny_bert_embedder()
    calibration = DataSource.from_arrays(token_batch(64, seed=8), None, INPUTS, "tokens")
    held_out = token_batch(64, seed=9)
    distance = {}
    for importance in ("magnitude", "activation"):
        state, record = ChannelPruneStep(ratio=0.5, head_ratio=0.5, importance=importance, epochs=0).apply(
            torch_state(copy.deepcopy(teacher), INPUTS), context(tmp_path, calibration=calibration))
        distance[importance] = 1 - float((embed(state.torch_module, held_out) * embed(teacher, held_out)).sum(1).mean())
    assert record.facts["importance"] == "activation" and record.facts["bias_compensated"] > 0
    assert distance["activation"] < 0.8 * distance["magnitude"]


def test_channel_pruning_after_lowrank_on_attention_is_refused_clearly(tmp_path: Path) -> None:
    """lowrank factorises q/k/v into two Linears; pruning through them used to cut across heads and
    leave a model whose forward failed ("shape '[1, 128, -1, 32]' is invalid") deep in a search trial."""
    from builder.compression.lowrank import LowRankStep
    from builder.errors import CompressionError

    factorised, record = LowRankStep(energy=0.8).apply(torch_state(tiny_bert_embedder(), INPUTS), context(tmp_path / "l"))
    attention = factorised.torch_module.encoder.encoder.layer[0].attention.self
    assert not isinstance(attention.query, torch.nn.Linear)  # the precondition: lowrank did factorise q/k/v
    with pytest.raises(CompressionError, match="put prune_channels before lowrank"):
        ChannelPruneStep(ratio=0.25, head_ratio=0.25, epochs=0).apply(factorised, context(tmp_path / "p"))
