"""Run library code that litters the current directory inside a scratch directory instead.

ONNX Runtime's symbolic shape inference saves ``sym_shape_infer_temp.onnx`` (with its tensors as
external data files, 90 MB on an OCR detector) into the *current directory* when it fails, and
``quant_pre_process`` calls it; nothing may be written outside ``--out`` and the work directory, so
such calls run with the working directory moved into a fresh folder under the work directory.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Iterator

_CWD_LOCK = threading.Lock()  # the working directory is process-wide


@contextlib.contextmanager
def scratch_cwd(workdir: Path | str, prefix: str = "scratch-") -> Iterator[Path]:
    """Change into a new folder under ``workdir`` for the block, then change back and delete it.
    Paths handed to the wrapped call must be absolute (resolve them before entering)."""
    base = Path(workdir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    with _CWD_LOCK:
        previous = os.getcwd()
        os.chdir(folder)
        try:
            yield folder
        finally:
            os.chdir(previous)
            shutil.rmtree(folder, ignore_errors=True)
