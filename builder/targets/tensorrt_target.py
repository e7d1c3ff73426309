"""TensorRT-ready ONNX for NVIDIA Jetson, run by ONNX Runtime's TensorRT execution provider.

TensorRT engines are specific to one GPU and one TensorRT version, so none is shipped: the artifact
holds an ONNX file (fp16 weights with fp32 inputs/outputs, or fp32 + an int8 calibration table, or
an already-QDQ int8 model) and ``runtime_options`` telling the agent how to open it: TensorRT EP
with its engine cache under the device's data directory (built at first load), then CUDA EP, then
CPU EP. The host has no GPU: verification runs the same ONNX file in ONNX Runtime on the CPU and
says so in the report; TensorRT's own fp16/int8 kernels are only exercised on the device.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from agent.manifest import TensorSpec
from builder.errors import DataError, TargetError
from builder.targets.base import (
    CompiledPayloads,
    PayloadFile,
    Tolerance,
    UnsupportedOp,
    VerificationReport,
    count_ops,
    onnx_io_specs,
)
from builder.targets.onnxruntime_target import verify_with_ort

log = logging.getLogger(__name__)

PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
CALIBRATION_FILE = "calibration.flatbuffers"
# Standard ops the TensorRT ONNX parser (TensorRT 8.6/10) does not import; ORT runs them on CUDA/CPU.
TRT_UNSUPPORTED = {"Unique", "StringNormalizer", "TfIdfVectorizer", "Multinomial", "RandomNormal",
                   "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli", "SequenceAt",
                   "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceLength", "SplitToSequence",
                   "ConcatFromSequence", "Optional", "OptionalGetElement", "OptionalHasElement", "Col2Im"}
# Ops the fp16 converter keeps in fp32 (onnxruntime.transformers.float16 DEFAULT_OP_BLOCK_LIST + ours).
FP16_KEEP_FLOAT = {"ArrayFeatureExtractor", "Binarizer", "CastMap", "CategoryMapper", "DictVectorizer",
                   "FeatureVectorizer", "Imputer", "LabelEncoder", "LinearClassifier", "LinearRegressor",
                   "Normalizer", "OneHotEncoder", "RandomUniformLike", "SVMClassifier", "SVMRegressor", "Scaler",
                   "TreeEnsembleClassifier", "TreeEnsembleRegressor", "ZipMap", "NonMaxSuppression", "TopK",
                   "RoiAlign", "Resize", "Range", "CumSum", "Min", "Max", "Upsample"}
ORT_DOMAINS = ("", "ai.onnx", "com.microsoft", "ai.onnx.ml")


def provider_options(precision: str, calibration_table: str | None = None) -> dict[str, Any]:
    """``target.runtime_options`` for the agent's ONNX Runtime backend (agent/runtime/onnxrt.py).

    Providers are ``target.execution_providers`` in order (TensorRT, CUDA, CPU); the agent keeps
    those its onnxruntime build has and points ``trt_engine_cache_path`` at its own data directory
    (``<data_dir>/cache/tensorrt``), where TensorRT writes the engine it builds at first load.
    """
    trt: dict[str, Any] = {
        "trt_engine_cache_enable": True,
        "trt_timing_cache_enable": True,
        "trt_fp16_enable": precision in ("fp16", "int8"),
        "trt_int8_enable": precision == "int8",
        "trt_max_workspace_size": 1 << 30,
    }
    if calibration_table:
        trt["trt_int8_calibration_table_name"] = calibration_table
        trt["trt_int8_use_native_calibration_table"] = False
    return {
        "provider_options": {"TensorrtExecutionProvider": trt, "CUDAExecutionProvider": {}},
        # Aux payloads the agent copies into trt_engine_cache_path before opening the session:
        # the TensorRT EP reads the calibration table from its cache directory.
        "copy_to_engine_cache": [calibration_table] if calibration_table else [],
        "engine_built_on_device": True,
    }


def is_fp16(model: Any) -> bool:
    """Already converted: fp16 weights (converting twice writes duplicate Cast outputs)."""
    import onnx

    return any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)


def is_qdq(model: Any) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


class TensorRtTarget:
    """fp16 / int8 ONNX plus TensorRT EP settings; the engine is built on the Jetson."""

    name: ClassVar[str] = "onnxruntime-tensorrt"
    precisions: ClassVar[tuple[str, ...]] = ("fp16", "fp32", "int8")
    formats: ClassVar[tuple[str, ...]] = ("onnx",)

    def check_ops(self, onnx_model: Any, precision: str = "fp16") -> list[UnsupportedOp]:
        found = []
        for (domain, op), n in sorted(count_ops(onnx_model).items()):
            if domain not in ORT_DOMAINS:
                found.append(UnsupportedOp(op, domain, n, f"custom domain '{domain}' is unknown to ONNX Runtime and TensorRT",
                                           "export the op with standard ONNX ops, or use the litert runtime"))
            elif domain == "com.microsoft" or op in TRT_UNSUPPORTED:
                found.append(UnsupportedOp(op, domain, n, "the TensorRT ONNX parser does not import it",
                                           "ONNX Runtime runs it on the CUDA EP (then CPU EP); the rest stays in TensorRT",
                                           blocking=False))
            elif precision == "fp16" and op in FP16_KEEP_FLOAT:
                found.append(UnsupportedOp(op, domain, n, "unsafe in fp16", "kept in fp32 inside the fp16 model", blocking=False))
        return found

    def compile(self, model_onnx_path: Path, inputs: Sequence[TensorSpec], precision: str,
                options: Mapping[str, Any], workdir: Path) -> CompiledPayloads:
        import onnx

        if precision not in self.precisions:
            raise TargetError(f"TensorRT target builds {', '.join(self.precisions)}, not '{precision}'")
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        model = onnx.load(str(model_onnx_path))
        out = workdir / "model.onnx"
        notes: list[str] = ["TensorRT engine is built on the device at first load and cached in the agent's data dir"]
        files: list[PayloadFile] = []
        calibration = None
        verify_files: tuple[PayloadFile, ...] = ()
        if precision == "fp16" and is_fp16(model):
            notes.append("the model is already fp16 (a recipe's quantize step converted it): shipped as-is")
        elif precision == "fp16" and not is_qdq(model):
            conversion = to_fp16(model, options.get("calibration_samples"))
            model = conversion.model
            notes.append("fp16 weights and compute, fp32 inputs/outputs (onnxruntime.transformers.float16)")
            if conversion.note():
                notes.append(conversion.note())
        elif precision == "int8":
            if is_qdq(model):
                notes.append("explicit int8: the QDQ model is handed to TensorRT as-is (no calibration table)")
            else:
                batches = options.get("calibration_samples")
                if not batches:
                    raise DataError("int8 for TensorRT needs calibration data: pass --data, or quantize with an int8-static recipe first (QDQ)")
                calibration = write_calibration_table(model_onnx_path, batches, workdir / "calib")
                files.append(PayloadFile(CALIBRATION_FILE, calibration, "aux"))
                notes.append("int8 via a TensorRT calibration table (min/max over the calibration data); fp16 fallback layers enabled")
        onnx.save(model, str(out))
        files.insert(0, PayloadFile("model.onnx", out, "model"))
        model_inputs, model_outputs = onnx_io_specs(model)
        return CompiledPayloads(self.name, "onnx", precision, tuple(files), model_inputs, model_outputs, PROVIDERS,
                                provider_options(precision, CALIBRATION_FILE if calibration else None), verify_files,
                                tuple(notes))

    def verify(self, payloads: CompiledPayloads, sample_inputs: Sequence[Mapping[str, np.ndarray]],
               reference_outputs: Sequence[Mapping[str, np.ndarray]], tolerance: Tolerance) -> VerificationReport:
        names = list(reference_outputs[0].keys()) if reference_outputs else []
        how = {"fp16": "the fp16 ONNX ran in ONNX Runtime on the host CPU (fp16 arithmetic as ORT's CPU kernels do it)",
               "fp32": "the fp32 ONNX ran in ONNX Runtime on the host CPU",
               "int8": "the int8 model ran in ONNX Runtime on the host CPU" if not any(
                   f.name == CALIBRATION_FILE for f in payloads.files)
               else "the fp32 ONNX ran in ONNX Runtime on the host CPU; int8 calibration is NOT simulated on the host"}[payloads.precision]
        checked = f"{how}; TensorRT EP not available on this host (no GPU): TensorRT kernels are exercised only on the device"
        # Level "basic": keep ORT from fusing fp16 graphs into CPU-only contrib ops with different numerics.
        return verify_with_ort(self.name, payloads.precision, [payloads.model_file], names, sample_inputs,
                               reference_outputs, tolerance, checked, level="basic")


def to_fp16(model: Any, samples: Sequence[Mapping[str, np.ndarray]] | None = None) -> Any:
    """fp16 weights and activations, fp32 graph inputs/outputs; unsafe ops and the nodes whose ranges
    overflow fp16 on ``samples`` stay fp32 (``fp16_safety``). Returns an ``Fp16Conversion``."""
    from builder.targets.fp16_safety import convert_to_fp16

    try:
        return convert_to_fp16(model, samples, op_block_list=sorted(FP16_KEEP_FLOAT))
    except ImportError as exc:  # pragma: no cover - part of the onnxruntime wheel
        raise TargetError("onnxruntime.transformers.float16 is missing; reinstall onnxruntime") from exc
    except Exception as exc:
        raise TargetError(f"fp16 conversion failed: {str(exc).splitlines()[0] if str(exc) else exc}; "
                          "build fp32 with --precision fp32") from exc


def write_calibration_table(model_path: Path, samples: Sequence[Mapping[str, np.ndarray]], out_dir: Path) -> Path:
    """Min/max ranges of every tensor over the samples, in the flatbuffers table the TensorRT EP reads."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator, write_calibration_table as write_table

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(samples)

        def get_next(self):
            return next(self._it, None)

    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        calibrator = create_calibrator(str(model_path), None, augmented_model_path=str(out_dir / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.MinMax)
        calibrator.collect_data(Reader())
        ranges = calibrator.compute_data()
        write_table(ranges.data if hasattr(ranges, "data") else ranges, dir=str(out_dir))
    except Exception as exc:
        raise TargetError(f"TensorRT calibration failed: {exc}") from exc
    table = out_dir / CALIBRATION_FILE
    if not table.is_file():
        raise TargetError("calibration ran but wrote no calibration.flatbuffers; check the onnxruntime version")
    return table
