"""Held-out real inputs for the third-party zoo benchmark, made offline.

Images are scikit-image's and scikit-learn's bundled sample photographs (cropped, resized,
flipped); text lines are rendered with Pillow's bundled font onto crops of those photographs;
sentences are first lines of the Python standard library's docstrings; audio is formant-synthesised
speech-like sound (voiced syllables with pitch contours, pauses and noise) at 16 kHz, because no
wheel here ships a speech recording. Every set is split by *source* (images, modules, utterances)
into a calibration part and a held-out part, so fidelity is never measured on calibration inputs.
"""
from __future__ import annotations

import functools
import inspect
import importlib
from typing import Sequence

import numpy as np

CALIBRATION_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "china", "immunohistochemistry")
HELDOUT_IMAGES = ("hubble_deep_field", "retina", "colorwheel", "flower", "cat", "logo",
                  "camera", "coins", "moon", "page", "text", "brick", "grass", "gravel", "clock", "horse")


@functools.lru_cache(maxsize=None)
def photo(name: str) -> np.ndarray:
    """One bundled photograph as uint8 RGB (H, W, 3)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        img = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data

        img = getattr(skimage.data, name)()
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    out = np.ascontiguousarray(img[..., :3]).astype(np.uint8)
    out.setflags(write=False)  # cached: shared by every caller
    return out


def _resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((width, height), Image.BILINEAR))


def photo_crops(names: Sequence[str], count: int, height: int, width: int, seed: int) -> np.ndarray:
    """``count`` uint8 (H, W, 3) crops: random square-ish windows of 50-100% of the short side, flips."""
    rng = np.random.default_rng(seed)
    photos = [photo(n) for n in names]
    out = np.empty((count, height, width, 3), np.uint8)
    for i in range(count):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        scale = 1.0 if i < len(photos) else rng.uniform(0.5, 1.0)
        ch = max(8, int(min(h, w) * scale))
        cw = min(w, max(8, int(ch * width / height)))
        ch = min(h, ch)
        y0 = rng.integers(0, h - ch + 1)
        x0 = rng.integers(0, w - cw + 1)
        crop = img[y0:y0 + ch, x0:x0 + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = _resize(np.ascontiguousarray(crop), height, width)
    return out


_WORDS = ("edge fleet model device build verify quantize the of and to in 2026 OCR 42 Raspberry "
          "Jetson Android sensor camera invoice total amount date 12.50 EUR order number street city "
          "station battery voltage 3.7V temperature 21C speed km/h north south east west").split()


def text_lines(names: Sequence[str], count: int, height: int, width: int, seed: int,
               rotate_half: bool = False) -> np.ndarray:
    """Rendered text lines on photo crops, uint8 (count, H, W, 3); odd ones turned 180 degrees if asked."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    backgrounds = photo_crops(names, count, height, width, seed + 1)
    out = np.empty_like(backgrounds)
    for i in range(count):
        bg = backgrounds[i].astype(np.float32)
        light = rng.random() < 0.7
        bg = 200 + 0.2 * bg if light else 0.3 * bg
        canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(canvas)
        size = int(rng.integers(int(height * 0.45), int(height * 0.8)))
        font = ImageFont.load_default(size=size)
        words = " ".join(rng.choice(_WORDS, size=int(rng.integers(2, 7))))
        ink = tuple(int(v) for v in (rng.integers(0, 70, 3) if light else rng.integers(190, 256, 3)))
        draw.text((int(rng.integers(1, max(2, width // 10))), int((height - size) / 2) - 2), words, fill=ink, font=font)
        arr = np.asarray(canvas)
        if rotate_half and i % 2:
            arr = arr[::-1, ::-1]
        out[i] = arr
    return out


def text_pages(names: Sequence[str], count: int, size: int, seed: int) -> np.ndarray:
    """Square scenes with several text lines over photos (text-detector input), uint8 (count, S, S, 3)."""
    rng = np.random.default_rng(seed)
    scenes = photo_crops(names, count, size, size, seed)
    line_h = max(16, size // 10)
    for i in range(count):
        n_lines = int(rng.integers(2, 6))
        lines = text_lines(names, n_lines, line_h, int(size * rng.uniform(0.5, 0.9)), seed * 1000 + i)
        for line in lines:
            y = int(rng.integers(0, size - line_h))
            x = int(rng.integers(0, size - line.shape[1] + 1))
            scenes[i, y:y + line_h, x:x + line.shape[1]] = line
    return scenes


CALIBRATION_MODULES = ("os", "json", "collections", "itertools", "functools", "textwrap", "string")
HELDOUT_MODULES = ("pathlib", "datetime", "statistics", "random", "shutil", "subprocess", "logging",
                   "argparse", "re", "csv", "zipfile", "tarfile", "email.message", "http.client",
                   "urllib.parse", "threading", "asyncio", "decimal", "fractions", "heapq", "bisect",
                   "difflib", "inspect", "typing", "unittest", "sqlite3", "socket", "tempfile")


def docstring_sentences(modules: Sequence[str], count: int) -> list[str]:
    """First sentences of the docstrings of public callables in ``modules`` (deduplicated, ordered)."""
    seen: dict[str, None] = {}
    for module_name in modules:
        module = importlib.import_module(module_name)
        for attr in sorted(dir(module)):
            if attr.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(module, attr, None)) or ""
            first = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
            first = first.split(". ")[0].strip()
            if 20 <= len(first) <= 200 and "(" not in first[:15] and first not in seen:
                seen[first] = None
            if len(seen) >= count:
                return list(seen)
    return list(seen)


def speech_like_audio(seconds: float, seed: int, rate: int = 16000) -> np.ndarray:
    """Formant-synthesised syllables (glottal pulses through vowel resonators) with pauses and noise."""
    from scipy.signal import lfilter

    rng = np.random.default_rng(seed)
    total = int(seconds * rate)
    out = rng.normal(0, 0.003, total).astype(np.float64)
    vowels = ((730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410))
    pos = int(rng.uniform(0.2, 0.6) * rate)
    while pos < total - rate // 4:
        word_end = min(total, pos + int(rng.uniform(0.3, 1.2) * rate))
        while pos < word_end:
            dur = int(rng.uniform(0.08, 0.25) * rate)
            f0 = rng.uniform(90, 220) * np.linspace(1.0, rng.uniform(0.8, 1.2), dur)
            phase = np.cumsum(f0 / rate)
            source = (np.diff(np.floor(phase), prepend=0) > 0).astype(np.float64)
            seg = source
            for formant, bandwidth in zip(rng.choice(vowels), (60, 90, 120)):
                r = np.exp(-np.pi * bandwidth / rate)
                theta = 2 * np.pi * formant / rate
                seg = lfilter([1 - r], [1, -2 * r * np.cos(theta), r * r], seg)
            seg *= np.hanning(dur) * rng.uniform(0.2, 0.6) / (np.abs(seg).max() + 1e-9)
            end = min(total, pos + dur)
            out[pos:end] += seg[:end - pos]
            if rng.random() < 0.3:  # a fricative
                n = min(total - end, int(0.06 * rate))
                out[end:end + n] += rng.normal(0, 0.05, n) * np.hanning(n)
                end += n
            pos = end
        pos = word_end + int(rng.uniform(0.15, 0.8) * rate)
    return np.clip(out, -1, 1).astype(np.float32)


def audio_chunks(utterance_seeds: Sequence[int], seconds: float, chunk: int = 512, context: int = 64) -> np.ndarray:
    """Consecutive ``chunk``-sample windows of each synthesised utterance, each preceded by the last
    ``context`` samples of the one before (zeros for the first), (count, context + chunk) float32:
    silero VAD v5+ expects 64 samples of context at 16 kHz and says "no speech" to bare 512-sample chunks."""
    parts = []
    for seed in utterance_seeds:
        audio = np.concatenate([np.zeros(context, np.float32), speech_like_audio(seconds, seed)])
        n = (len(audio) - context) // chunk
        parts.append(np.stack([audio[i * chunk:i * chunk + context + chunk] for i in range(n)]))
    return np.concatenate(parts)
