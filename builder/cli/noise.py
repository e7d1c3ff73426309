"""Library noise (torchao's missing CUDA kernels, torch ``_pytree`` notices, TensorFlow/LiteRT absl
and glog lines, ONNX Runtime warnings) silenced unless ``--verbose``: environment variables set
before the libraries are imported, their loggers and warnings filtered, and a context manager that
silences C-level stderr around calls that print past Python (conversions, calibration)."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from typing import Iterator

# Read by TensorFlow / LiteRT / glog when they are imported: errors only.
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "GLOG_minloglevel": "2", "TF_ENABLE_ONEDNN_OPTS": "0",
             "ABSL_MIN_LOG_LEVEL": "2", "GRPC_VERBOSITY": "ERROR"}
QUIET_LOGGERS = ("torchao", "torch.utils._pytree", "torch._dynamo", "torch._export", "torch.export", "torch.onnx",
                 "onnxscript", "absl", "tensorflow", "litert_torch", "ai_edge_torch", "ai_edge_quantizer",
                 "ai_edge_litert", "onnxruntime", "optuna", "matplotlib", "PIL")
QUIET_WARNING_MODULES = r"(torch|torchao|onnxscript|onnx|onnxruntime|tensorflow|tf_keras|keras|ai_edge_\w+|litert\w*|absl|optuna|google\.protobuf)(\..*)?"

_state: dict = {"verbose": False, "stream": None}


def configure(verbose: bool) -> None:
    """Call once, first thing in a CLI, before heavy imports."""
    _state["verbose"] = verbose
    if verbose:
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    own_stderr()  # dup the real stderr now, before any quiet_stderr() block
    warnings.filterwarnings("ignore", module=QUIET_WARNING_MODULES)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*ExperimentalWarning.*")


def is_verbose() -> bool:
    return bool(_state["verbose"])


def own_stderr():  # -> TextIO
    """A stream on the process's real stderr that :func:`quiet_stderr` does not silence: progress
    bars and our own messages are printed through it while library noise goes to /dev/null."""
    if _state["stream"] is None:
        _state["stream"] = os.fdopen(os.dup(2), "w", buffering=1, encoding=sys.stderr.encoding or "utf-8",
                                     errors="replace")
    return _state["stream"]


def _is_fd2(stream: object) -> bool:
    """True when ``stream`` writes to file descriptor 2 (not an in-process capture such as pytest's)."""
    try:
        return stream.fileno() == 2  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence what native code (absl, glog, TensorFlow/LiteRT, ORT's C++ logger) writes to file
    descriptor 2, and what libraries print to stdout, during the block. Python's ``sys.stderr`` points
    at :func:`own_stderr` meanwhile, so our progress, log warnings and errors still show. Nothing is
    silenced with ``--verbose``."""
    if is_verbose():
        yield
        return
    # our messages go where sys.stderr goes; only when that is fd 2 itself does it need its own dup
    mine = own_stderr() if _is_fd2(sys.stderr) else sys.stderr
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fd = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    saved_stderr = sys.stderr
    try:
        os.dup2(devnull, 2)
        sys.stderr = mine
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            yield
    finally:
        sys.stderr = saved_stderr
        mine.flush()
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        os.close(devnull)
