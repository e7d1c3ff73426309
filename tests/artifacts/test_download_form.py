"""The zstd download form: lossless round trip; zeros and repeated values really shrink it."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from builder.artifacts.download import compress_file, decompress_file, download_size


def test_round_trip_is_lossless_and_zeros_compress(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    dense = rng.standard_normal(50_000).astype(np.float32)
    sparse = dense.copy()
    sparse[rng.random(dense.size) < 0.8] = 0.0
    (tmp_path / "dense.bin").write_bytes(dense.tobytes())
    (tmp_path / "sparse.bin").write_bytes(sparse.tobytes())
    assert download_size(tmp_path / "sparse.bin") < 0.5 * download_size(tmp_path / "dense.bin")
    size = compress_file(tmp_path / "sparse.bin", tmp_path / "sparse.zst")
    assert size == (tmp_path / "sparse.zst").stat().st_size
    decompress_file(tmp_path / "sparse.zst", tmp_path / "restored.bin")
    assert (tmp_path / "restored.bin").read_bytes() == sparse.tobytes()
    assert not list(tmp_path.glob(".*.tmp"))


def test_large_payloads_use_a_faster_level() -> None:
    from builder.artifacts.download import SMALL_PAYLOAD_BYTES, level_for

    assert level_for(1000) == 19
    assert level_for(SMALL_PAYLOAD_BYTES + 1) == 9


def test_what_the_chunk_server_sends_is_what_the_build_reports(tmp_path: Path, monkeypatch) -> None:
    """One policy: the chunk server's stream of a payload is byte for byte the download form whose
    size the pipeline (``download_bytes``) and the compression report (``download_size``) give."""
    from builder.artifacts.download import compress_payload, decompress_bytes, download_bytes
    from builder.fleet.transport.chunk_server import ChunkServer

    rng = np.random.default_rng(1)
    weights = rng.standard_normal(40_000).astype(np.float32)
    weights[rng.random(weights.size) < 0.6] = 0.0
    model, aux = tmp_path / "model.onnx", tmp_path / "labels.txt"
    model.write_bytes(weights.tobytes())
    aux.write_bytes(b"cat\ndog\n" * 50)

    class Payload:
        def __init__(self, name: str) -> None:
            self.name = name

    class Manifest:
        payloads = (Payload("model.onnx"), Payload("labels.txt"))

    import builder.fleet.transport.chunk_server as chunk_server

    monkeypatch.setattr(chunk_server, "read_manifest", lambda directory: Manifest())
    server = ChunkServer(None, lambda aid: tmp_path)
    sent = [server.compressed("a" * 64, name).data for name in ("model.onnx", "labels.txt")]
    assert sent == [compress_payload(model), compress_payload(aux)]
    assert decompress_bytes(sent[0]) == model.read_bytes()
    total, level = download_bytes([model, aux])
    assert total == sum(len(s) for s in sent) and level == 19
    assert download_size(model) == len(sent[0])
