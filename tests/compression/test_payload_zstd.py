"""The zstd download form: lossless round trip; zeros and repeated values really shrink it."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from builder.compression.payload import compress_file, decompress_file, download_size


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
    from builder.compression.payload import SMALL_PAYLOAD_BYTES, level_for

    assert level_for(1000) == 19
    assert level_for(SMALL_PAYLOAD_BYTES + 1) == 9
