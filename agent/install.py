"""A/B model slots with an atomic pointer switch, health checks and rollback.

Layout under the data dir::

    slots/a/, slots/b/      two complete, verified artifact directories
    active.json             {"active": "a", "previous": "b"}, replaced atomically (tmp + fsync + rename + dir fsync)

A new model goes to the slot that is not active, is fsynced, re-verified (signature + hashes),
loaded and health-checked on its sample (shape, dtype, finite values, agreement with the expected
outputs within the manifest's ``verify_tolerance``), and only then does ``active.json`` point at it.
The pointer only ever names a slot that passed all of that, so a crash or power cut at any moment
leaves a loadable model: on start-up the active slot is verified again and, failing that, the
previous one takes over.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from agent.compare import compare_arrays
from agent.errors import AgentError, InstallError
from agent.manifest import Manifest, verify_artifact_dir
from agent.runtime import ModelRuntime, open_runtime

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

SLOTS = ("a", "b")
POINTER_FILE = "active.json"


@dataclass(frozen=True)
class Pointer:
    active: str | None
    previous: str | None


@dataclass(frozen=True)
class HealthReport:
    ok: bool
    baseline_p50_ms: float
    max_abs_error: float
    min_cosine: float


@dataclass
class LoadedModel:
    """A verified, health-checked model ready to serve."""

    manifest: Manifest
    runtime: ModelRuntime
    slot: str
    directory: Path
    health: HealthReport

    @property
    def label(self) -> str:
        return f"{self.manifest.model_name}@{self.manifest.model_version}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for item in sorted(Path(path).rglob("*")):
        if item.is_file():
            with open(item, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(path)


class SlotStore:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.slots_dir = self.data_dir / "slots"
        self.slots_dir.mkdir(parents=True, exist_ok=True)
        self.pointer_path = self.data_dir / POINTER_FILE

    def read_pointer(self) -> Pointer:
        try:
            data = json.loads(self.pointer_path.read_text(encoding="utf-8"))
            active, previous = data.get("active"), data.get("previous")
            return Pointer(active if active in SLOTS else None, previous if previous in SLOTS else None)
        except (OSError, json.JSONDecodeError, AttributeError):
            return Pointer(None, None)

    def write_pointer(self, pointer: Pointer) -> None:
        tmp = self.pointer_path.with_name(POINTER_FILE + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"active": pointer.active, "previous": pointer.previous}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.pointer_path)
        fsync_dir(self.data_dir)

    def slot_dir(self, slot: str) -> Path:
        return self.slots_dir / slot

    def inactive_slot(self) -> str:
        active = self.read_pointer().active
        return "b" if active == "a" else "a"

    def place(self, incoming: Path, slot: str) -> Path:
        """Move a complete incoming artifact dir into ``slot`` (never the active one)."""
        pointer = self.read_pointer()
        if slot == pointer.active:
            raise InstallError("refusing to overwrite the active slot")
        if pointer.previous == slot:  # the rollback target is about to be overwritten: forget it first
            self.write_pointer(Pointer(pointer.active, None))
        target = self.slot_dir(slot)
        if target.exists():
            trash = self.slots_dir / f".trash-{slot}-{time.time_ns()}"
            os.replace(target, trash)
            shutil.rmtree(trash, ignore_errors=True)
        fsync_tree(incoming)
        os.replace(incoming, target)
        fsync_dir(self.slots_dir)
        return target

    def clean_trash(self) -> None:
        for trash in self.slots_dir.glob(".trash-*"):
            shutil.rmtree(trash, ignore_errors=True)


def load_sample(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(inputs, expected outputs) from a sample.npz with keys "in:<name>" / "out:<name>"."""
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        inputs = {k[3:]: data[k] for k in data.files if k.startswith("in:")}
        outputs = {k[4:]: data[k] for k in data.files if k.startswith("out:")}
    return inputs, outputs


def benchmark_feeds(model: LoadedModel) -> dict[str, np.ndarray]:
    """The artifact's own sample inputs (what it was verified on), else synthetic ones of the right shape."""
    from agent.runtime.base import synthetic_feeds

    sample = model.manifest.sample_payload
    if sample is not None:
        inputs, _ = load_sample(model.directory / sample.name)
        if inputs:
            return inputs
    return synthetic_feeds(model.runtime.inputs)


def health_check(runtime: ModelRuntime, manifest: Manifest, directory: Path, timing_runs: int = 5) -> HealthReport:
    """Run the shipped sample; raise InstallError naming what is wrong. Also times a few runs
    (the baseline for the latency-regression rollback)."""
    import numpy as np

    sample_entry = manifest.sample_payload
    if sample_entry is None:
        raise InstallError(f"artifact {manifest.artifact_id[:12]} ships no sample payload; rebuild it with a sample")
    inputs, expected = load_sample(directory / sample_entry.name)
    if not inputs:
        raise InstallError("sample.npz has no 'in:<name>' arrays")
    try:
        outputs = runtime.run(inputs)
    except AgentError as exc:
        raise InstallError(f"model fails on its own sample: {exc}") from exc
    tol = manifest.verify_tolerance
    atol, rtol, min_cos = float(tol.get("atol", 1e-3)), float(tol.get("rtol", 1e-3)), float(tol.get("min_cosine", 0.99))
    worst_err, worst_cos = 0.0, 1.0
    for name, want in expected.items():
        if name not in outputs:
            raise InstallError(f"model output {name!r} is missing")
        got = np.asarray(outputs[name])
        if got.shape != want.shape:
            raise InstallError(f"output {name!r} has shape {got.shape}, expected {want.shape}")
        if got.dtype != want.dtype:
            raise InstallError(f"output {name!r} has dtype {got.dtype}, expected {want.dtype}")
        if np.issubdtype(got.dtype, np.floating) and not np.all(np.isfinite(got)):
            raise InstallError(f"output {name!r} has NaN or infinite values")
        compared = compare_arrays(got, want, atol, rtol)  # the builder's verification rule
        err, cos = compared.max_abs_diff, compared.cosine
        worst_err, worst_cos = max(worst_err, err), min(worst_cos, cos)
        if not compared.within:
            raise InstallError(f"output {name!r} differs from the expected output (max |error| {err:.3g} > atol {atol:g} + rtol {rtol:g})")
        if cos < min_cos:
            raise InstallError(f"output {name!r} cosine {cos:.4f} < required {min_cos}")
    times = []
    for _ in range(max(1, timing_runs)):
        t0 = time.perf_counter()
        runtime.run(inputs)
        times.append((time.perf_counter() - t0) * 1000.0)
    return HealthReport(True, round(float(np.median(times)), 4), worst_err, worst_cos)


class Installer:
    """Installs verified artifact directories into the A/B slots."""

    def __init__(self, data_dir: Path, public_key: Any, *, threads: int = 0, pause_before_switch_s: float = 0.0,
                 on_stage: Callable[[str], None] | None = None) -> None:
        self.store = SlotStore(data_dir)
        self._public_key = public_key  # the key, or a zero-argument function returning it (loaded lazily)
        self.cache_dir = Path(data_dir) / "cache"
        self.threads = threads
        self.pause_before_switch_s = pause_before_switch_s
        self.on_stage = on_stage

    def _open(self, slot: str) -> LoadedModel:
        directory = self.store.slot_dir(slot)
        try:
            key = self._public_key() if callable(self._public_key) else self._public_key
            manifest = verify_artifact_dir(directory, key)
            runtime = open_runtime(manifest, directory / manifest.model_payload.name, self.cache_dir, self.threads)
            health = health_check(runtime, manifest, directory)
        except InstallError:
            raise
        except AgentError as exc:
            raise InstallError(str(exc)) from exc
        return LoadedModel(manifest, runtime, slot, directory, health)

    def install(self, incoming: Path) -> LoadedModel:
        """Place, verify, load, health-check, then switch. On failure the active model is untouched."""
        pointer = self.store.read_pointer()
        slot = self.store.inactive_slot()
        self.store.place(Path(incoming), slot)
        loaded = self._open(slot)
        if self.on_stage is not None:
            self.on_stage("health_ok")
        if self.pause_before_switch_s:
            time.sleep(self.pause_before_switch_s)  # test hook: lets tests kill the agent right here
        self.store.write_pointer(Pointer(slot, pointer.active))
        return loaded

    def load_active(self) -> tuple[LoadedModel | None, list[str]]:
        """Model to serve after a (re)start: the active slot, else the previous one; problems listed."""
        self.store.clean_trash()
        pointer = self.store.read_pointer()
        problems: list[str] = []
        for slot, is_previous in ((pointer.active, False), (pointer.previous, True)):
            if slot is None:
                continue
            try:
                loaded = self._open(slot)
            except InstallError as exc:
                problems.append(f"slot {slot}: {exc}")
                log.warning("slot %s not loadable: %s", slot, exc)
                continue
            if is_previous:
                self.store.write_pointer(Pointer(slot, None))
            return loaded, problems
        return None, problems

    def rollback(self) -> LoadedModel:
        """Make the previous slot active again (verified and health-checked first)."""
        pointer = self.store.read_pointer()
        if pointer.previous is None:
            raise InstallError("no previous model to roll back to")
        loaded = self._open(pointer.previous)
        self.store.write_pointer(Pointer(pointer.previous, pointer.active))
        return loaded
