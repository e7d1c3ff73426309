"""The download form of a model file: zstd, level 19 up to 16 MiB, level 9 above.

Pruned (zeros) and clustered (few distinct values) weights barely change the ``.onnx`` file size but
shrink what travels to the device; evaluation reports both, and artifacts ship this form.
Measured here: level 19 on MiniLM's 90 MB ONNX takes ~260 s (threads do not help) and is *larger*
than level 9 (82.61 vs 82.58 MB, 2 s), so big files use level 9 (the same rule as
``builder.targets.pipeline``).
"""
from __future__ import annotations

from pathlib import Path

from builder.atomic_files import atomic_write_bytes

ZSTD_LEVEL = 19
LARGE_FILE_LEVEL = 9
SMALL_PAYLOAD_BYTES = 16 << 20


def level_for(size_bytes: int) -> int:
    """The zstd level the download form uses for a payload of ``size_bytes``."""
    return ZSTD_LEVEL if size_bytes <= SMALL_PAYLOAD_BYTES else LARGE_FILE_LEVEL


def compress_bytes(data: bytes, level: int | None = None) -> bytes:
    """zstd frame of ``data``; ``level`` None picks ``level_for(len(data))``."""
    import zstandard

    return zstandard.ZstdCompressor(level=level if level is not None else level_for(len(data))).compress(data)


def decompress_bytes(data: bytes) -> bytes:
    import zstandard

    # compress() writes the content size into the frame, so a one-shot decompress works.
    return zstandard.ZstdDecompressor().decompress(data)


def download_size(path: Path, level: int | None = None) -> int:
    """Bytes of ``path`` once zstd-compressed (what a device downloads)."""
    return len(compress_bytes(Path(path).read_bytes(), level))


def compress_file(src: Path, dst: Path, level: int | None = None) -> int:
    """Write the zstd download form of ``src`` to ``dst`` atomically; returns its size in bytes."""
    payload = compress_bytes(Path(src).read_bytes(), level)
    atomic_write_bytes(Path(dst), payload)
    return len(payload)


def decompress_file(src: Path, dst: Path) -> int:
    """Restore a model file from its download form, atomically; returns the restored size."""
    payload = decompress_bytes(Path(src).read_bytes())
    atomic_write_bytes(Path(dst), payload)
    return len(payload)
