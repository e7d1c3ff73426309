"""--input-shape parsing and reconciliation with an ONNX graph's inputs."""
from __future__ import annotations

import pytest

from builder.errors import UsageError
from builder.loading import InputSpec, parse_input_shapes
from builder.loading.input_shapes import reconcile_with_graph


def test_single_unnamed_shape_gets_dynamic_batch():
    (spec,) = parse_input_shapes("1x3x8x8")
    assert spec == InputSpec("input", (1, 3, 8, 8), "float32", {0: "batch"})


def test_named_inputs_with_dtypes_and_named_dynamic_axes():
    ids, mask = parse_input_shapes("input_ids=2xseq@128:int64, attention_mask=2xseq@128:int64")
    assert (ids.name, ids.shape, ids.dtype, ids.dynamic_axes) == ("input_ids", (2, 128), "int64", {0: "batch", 1: "seq"})
    assert mask.dynamic_axes == {0: "batch", 1: "seq"}


def test_axis_names_may_contain_x():
    (spec,) = parse_input_shapes("x=1xmax_len@16x64")
    assert spec.shape == (1, 16, 64) and spec.dynamic_axes == {0: "batch", 1: "max_len"}


@pytest.mark.parametrize("text", ["", "1x", "ax3", "a=1x2,1x3", "x=1x2:float", "0x3", "a=1x2,a=1x2"])
def test_bad_text_is_a_usage_error_with_an_example(text):
    with pytest.raises(UsageError) as info:
        parse_input_shapes(text)
    assert "--input-shape" in str(info.value) and "\n" not in str(info.value)


def test_dynamic_dims_resolve_from_shared_symbols_and_batch_defaults_to_one():
    graph = [("ids", ("batch", "seq"), "int64"), ("mask", ("batch", "seq"), "int64")]
    specs = reconcile_with_graph(graph, parse_input_shapes("ids=3x40:int64"), named=True)
    assert [s.shape for s in specs] == [(3, 40), (3, 40)]
    assert specs[1].dynamic_axes == {0: "batch", 1: "seq"}
    only_batch = reconcile_with_graph([("x", ("N", 3, 8, 8), "float32")], None, named=False)
    assert only_batch[0].shape == (1, 3, 8, 8)


def test_missing_or_contradicting_shapes_are_usage_errors():
    graph = [("x", ("batch", "seq", 64), "float32")]
    with pytest.raises(UsageError, match="dynamic dims"):
        reconcile_with_graph(graph, None, named=False)
    with pytest.raises(UsageError, match="fixes it at 64"):
        reconcile_with_graph(graph, parse_input_shapes("1x16x32"), named=False)
    with pytest.raises(UsageError, match="expects 3"):
        reconcile_with_graph(graph, parse_input_shapes("1x16"), named=False)
    with pytest.raises(UsageError, match="model's inputs are x"):
        reconcile_with_graph(graph, parse_input_shapes("y=1x16x64"), named=True)
    two = [("a", (1, 2), "float32"), ("b", (1, 2), "float32")]
    with pytest.raises(UsageError, match="name each"):
        reconcile_with_graph(two, parse_input_shapes("1x2"), named=False)
