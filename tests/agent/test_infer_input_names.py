"""POST /infer takes a LiteRT model's inputs by the model's own (signature) names or by tensor names,
and answers 400 naming the problem, never 500, for a request that does not fit the model."""
from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.agent.conftest import make_artifact


def _post(url: str, inputs: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/infer", data=json.dumps({"inputs": inputs}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _endpoint():
    from agent.active import ActiveModel
    from agent.load import LoadController
    from agent.serve import LocalEndpoint
    from agent.telemetry import FieldStats

    stats = FieldStats()
    active = ActiveModel(stats, LoadController())
    return stats, active, LocalEndpoint(active, port=0).start()


@pytest.mark.litert
@pytest.mark.slow
def test_litert_infer_accepts_signature_or_tensor_names_and_rejects_bad_requests_with_400(tmp_path, signing_key):
    torch = pytest.importorskip("torch")
    litert_torch = pytest.importorskip("litert_torch")
    pytest.importorskip("ai_edge_litert")
    from agent.install import Installer
    from agent.manifest import Target, TensorSpec, load_public_key
    from agent.runtime.litert import LiteRtRuntime
    from builder.artifacts.packaging import package_artifact

    class TwoInputs(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return ((input_ids * attention_mask).sum(-1, keepdim=True) + 0.5 * attention_mask.sum(-1, keepdim=True)).float()

    kwargs = {"input_ids": torch.ones(1, 4, dtype=torch.int64), "attention_mask": torch.ones(1, 4, dtype=torch.int64)}
    path = tmp_path / "model.tflite"
    litert_torch.convert(TwoInputs().eval(), sample_kwargs=kwargs).export(str(path))
    runtime = LiteRtRuntime(path, threads=1)
    tensor_of = {info.name.removeprefix("serving_default_"): info for info in runtime.inputs}
    assert set(tensor_of) == {"input_ids", "attention_mask"}
    assert all(info.name != name for name, info in tensor_of.items())  # the runtime's names are tensor names
    (out,) = runtime.outputs
    ids, mask = np.array([[3, 5, 7, 11]], np.int32), np.array([[1, 1, 0, 1]], np.int32)
    expected = runtime.run({tensor_of["input_ids"].name: ids, tensor_of["attention_mask"].name: mask})[out.name]
    np.testing.assert_allclose(expected, [[3 + 5 + 11 + 1.5]])

    key, pub = signing_key
    np.savez(tmp_path / "sample.npz", **{f"in:{tensor_of['input_ids'].name}": ids,
                                        f"in:{tensor_of['attention_mask'].name}": mask, f"out:{out.name}": expected})
    signature = {"name": "serving_default", "inputs": {info.name: name for name, info in tensor_of.items()},
                 "outputs": [out.name]}
    package_artifact(tmp_path / "art", {"model.tflite": (path, "model"), "sample.npz": (tmp_path / "sample.npz", "sample")},
                     model_name="two", model_version="1",
                     target=Target(profile="android-arm64", runtime="litert", execution_providers=(), precision="fp32",
                                   format="tflite", runtime_options={"signature": signature, "delegates": []}),
                     inputs=[TensorSpec(i.name, (1, 4), "int32") for i in runtime.inputs],
                     outputs=[TensorSpec(out.name, (1, 1), "float32")], private_key=key)
    stats, active, endpoint = _endpoint()
    try:
        active.swap(Installer(tmp_path / "data", load_public_key(pub), threads=1).install(tmp_path / "art"))
        # The application's own names (what the tokenizer gives, int64 from JSON), then the tensor names.
        for names in ({"input_ids": "input_ids", "attention_mask": "attention_mask"},
                      {n: tensor_of[n].name for n in ("input_ids", "attention_mask")}):
            status, answer = _post(endpoint.url, {names["input_ids"]: ids.tolist(), names["attention_mask"]: mask.tolist()})
            assert status == 200, answer
            np.testing.assert_allclose(answer["outputs"][out.name], expected)

        bad = {
            "unknown": ({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "token_type_ids": ids.tolist()},
                        "unknown input 'token_type_ids'"),
            "missing": ({"input_ids": ids.tolist()}, "missing input"),
            "shape": ({"input_ids": [[1, 2, 3]], "attention_mask": mask.tolist()}, "input 'input_ids' has shape [1, 3]"),
            "dtype": ({"input_ids": [[1.5, 2, 3, 4]], "attention_mask": mask.tolist()}, "float64 values, the model expects int32"),
            "twice": ({"input_ids": ids.tolist(), tensor_of["input_ids"].name: ids.tolist(), "attention_mask": mask.tolist()},
                      "given twice"),
            "ragged": ({"input_ids": [[1, 2], [3]], "attention_mask": mask.tolist()}, "not a rectangular array"),
        }
        for case, (inputs, message) in bad.items():
            status, answer = _post(endpoint.url, inputs)
            assert status == 400 and message in answer["error"], (case, status, answer)
        assert "attention_mask" in _post(endpoint.url, {"input_ids": ids.tolist()})[1]["error"]  # names the missing one
        _, requests, errors, _ = stats.take_window()
        assert requests == 2 and errors == 0  # bad requests are the caller's fault, not the model's
    finally:
        endpoint.stop()


def test_onnx_infer_answers_400_for_wrong_shape_dtype_or_name(tmp_path, signing_key):
    from agent.install import Installer
    from agent.manifest import load_public_key

    key, pub = signing_key
    art = make_artifact(tmp_path / "art", key, seed=3)
    shutil.copytree(art, tmp_path / "incoming")
    stats, active, endpoint = _endpoint()
    try:
        active.swap(Installer(tmp_path / "data", load_public_key(pub), threads=1).install(tmp_path / "incoming"))
        x = np.zeros((1, 8)).tolist()
        assert _post(endpoint.url, {"x": x})[0] == 200
        for inputs, message in (({"x": np.zeros((2, 8)).tolist()}, "shape [2, 8]"), ({"x": [[1]]}, "shape [1, 1]"),
                                ({"x": [["a"] * 8]}, "values, the model expects float32"), ({"y": x}, "unknown input 'y'"),
                                ({}, "missing input 'x'")):
            status, answer = _post(endpoint.url, inputs)
            assert status == 400 and message in answer["error"], (inputs, status, answer)
        status, answer = _post(endpoint.url, [1, 2])  # "inputs" is not an object
        assert status == 400 and "inputs" in answer["error"]
        _, requests, errors, _ = stats.take_window()
        assert requests == 1 and errors == 0
    finally:
        endpoint.stop()
