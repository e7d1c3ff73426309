"""The LiteRT backend runs a real .tflite (converted here with litert-torch) like the ONNX one."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.litert, pytest.mark.slow]


def test_litert_backend_matches_torch_and_passes_the_health_check(tmp_path, signing_key):
    torch = pytest.importorskip("torch")
    litert_torch = pytest.importorskip("litert_torch")
    pytest.importorskip("ai_edge_litert")
    from agent.install import Installer
    from agent.manifest import Target, TensorSpec, load_public_key
    from agent.runtime.litert import LiteRtRuntime
    from builder.artifacts.packaging import package_artifact

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()).eval()
    x = torch.randn(1, 8)
    path = tmp_path / "model.tflite"
    litert_torch.convert(module, (x,)).export(str(path))
    runtime = LiteRtRuntime(path, threads=1)
    (inp,), (out,) = runtime.inputs, runtime.outputs
    assert inp.shape == (1, 8) and inp.dtype == "float32"
    got = runtime.run({inp.name: x.numpy()})[out.name]
    np.testing.assert_allclose(got, module(x).detach().numpy(), rtol=1e-5, atol=1e-6)

    key, pub = signing_key
    np.savez(tmp_path / "sample.npz", **{f"in:{inp.name}": x.numpy(), f"out:{out.name}": got})
    package_artifact(tmp_path / "art", {"model.tflite": (path, "model"), "sample.npz": (tmp_path / "sample.npz", "sample")},
                     model_name="tiny", model_version="1",
                     target=Target(profile="android-arm64", runtime="litert", execution_providers=(), precision="fp32",
                                   format="tflite"),
                     inputs=[TensorSpec(inp.name, (1, 8), "float32")], outputs=[TensorSpec(out.name, (1, 4), "float32")],
                     private_key=key)
    loaded = Installer(tmp_path / "data", load_public_key(pub), threads=1).install(tmp_path / "art")
    assert loaded.runtime.backend == "ai_edge_litert" and loaded.health.ok
