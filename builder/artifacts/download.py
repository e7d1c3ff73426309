"""The download form of a payload: the one zstd policy for what the chunk server sends and for the
download size that ``compress``/``optimize`` minimise and ``build`` records (``download_bytes``).

Each payload file is one zstd frame (content size written, so the agent can decompress it as a
stream or in one go) at level 19 up to 4 MiB and level 9 above. Pruned (zeros) and clustered (few
distinct values) weights barely change the ``.onnx`` file size but shrink what travels to the
device. Measured here: level 19 on MiniLM's 90 MB ONNX takes ~260 s and is *larger* than level 9
(82.61 vs 82.58 MB, 2 s), so big files use level 9; and the chunk server compresses on the first
request, where level 19 on an 8 MiB file took 8.8 s on a loaded 2-core host (the agent re-requests
a chunk after 10 s), so the bound is 4 MiB. Compression runs on every core (``threads=-1``;
zstd's multi-threaded output does not depend on the number of cores).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from builder.atomic_files import atomic_write_bytes

ZSTD_LEVEL = 19
LARGE_FILE_LEVEL = 9
SMALL_PAYLOAD_BYTES = 4 << 20


def level_for(size_bytes: int) -> int:
    """The zstd level the download form uses for a payload of ``size_bytes``."""
    return ZSTD_LEVEL if size_bytes <= SMALL_PAYLOAD_BYTES else LARGE_FILE_LEVEL


def compress_bytes(data: bytes, level: int | None = None) -> bytes:
    """The download form of ``data``; ``level`` None picks ``level_for(len(data))``."""
    import zstandard

    chosen = level if level is not None else level_for(len(data))
    return zstandard.ZstdCompressor(level=chosen, threads=-1, write_content_size=True).compress(data)


def compress_payload(path: Path, level: int | None = None) -> bytes:
    """The download form of the file at ``path`` (what the chunk server sends)."""
    return compress_bytes(Path(path).read_bytes(), level)


def decompress_bytes(data: bytes) -> bytes:
    import zstandard

    # the frame carries its content size, so a one-shot decompress works.
    return zstandard.ZstdDecompressor().decompress(data)


def download_size(path: Path, level: int | None = None) -> int:
    """Bytes of ``path`` in its download form (what a device downloads)."""
    return len(compress_payload(path, level))


def download_bytes(paths: Sequence[Path]) -> tuple[int, int]:
    """(download bytes of all ``paths``, the zstd level of the largest one): what an artifact costs."""
    sizes = [Path(p).stat().st_size for p in paths]
    return sum(download_size(p) for p in paths), level_for(max(sizes, default=0))


def compress_file(src: Path, dst: Path, level: int | None = None) -> int:
    """Write the download form of ``src`` to ``dst`` atomically; returns its size in bytes."""
    payload = compress_payload(src, level)
    atomic_write_bytes(Path(dst), payload)
    return len(payload)


def decompress_file(src: Path, dst: Path) -> int:
    """Restore a model file from its download form, atomically; returns the restored size."""
    payload = decompress_bytes(Path(src).read_bytes())
    atomic_write_bytes(Path(dst), payload)
    return len(payload)
