"""Which artifact `builder push` deploys to a device: a registered one (checked against the
device's profile) or one built now for that profile (reused from the registry's cache when the
same model, recipe and profile were built before)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from builder.errors import UsageError
from builder.fleet.transport.store import DeviceRecord


class ArtifactChooser:
    def __init__(self, registry: Any, data_dir: Path, *, artifact: str | None = None, model: str | None = None,
                 input_shapes: list[str] | None = None, recipe: Path | None = None, precision: str | None = None,
                 data: str | None = None, train_data: str | None = None, task: str | None = None) -> None:
        self.registry = registry
        self.data_dir = Path(data_dir)
        self.artifact = registry.resolve(artifact) if artifact else None
        self.model = model
        self.input_shapes = list(input_shapes or [])
        self.recipe = recipe
        self.precision = precision  # None: the profile's preferred precision
        if precision is not None and model is None:
            raise UsageError("--precision applies to --model builds; a registered --artifact already has one")
        if model is None and (data or train_data or task):
            raise UsageError("--data/--train-data/--task apply to --model builds; a registered --artifact is already verified")
        # real inputs calibrate and verify the build; without them it is judged on generated inputs
        self.data, self.train_data, self.task = data, train_data, task
        self._built: dict[str, str] = {}
        self.on_stage = lambda text: None  # set by the CLI to show build stages

    def for_device(self, device: DeviceRecord) -> str:
        if not device.profile:
            raise UsageError(f"{device.device_id} has no profile yet; register it with `builder fleet add-device "
                             f"{device.device_id} --profile P` or let its agent say hello first")
        return self.for_profile(device.profile)

    @property
    def builds(self) -> bool:
        """True when artifacts are built here for each device's profile (so they match it)."""
        return self.artifact is None

    def for_profile(self, profile: str) -> str:
        if self.artifact is not None:
            return self.artifact  # the push checks that the device can run it
        if profile not in self._built:
            self._built[profile] = self._build(profile)
        return self._built[profile]

    def _build(self, profile: str) -> str:
        try:
            from builder.targets.profile_build import build_for_profile
        except ImportError as exc:
            raise UsageError("building during a push needs `builder build` (builder.targets.profile_build), which this "
                             "checkout lacks; build first and push with --artifact ID") from exc
        shapes = ",".join(self.input_shapes) if self.input_shapes else None
        result = build_for_profile(str(self.model), profile, recipe=self.recipe, input_shapes=shapes,
                                   registry_dir=self.data_dir, precision=self.precision, on_stage=self.on_stage,
                                   data=self.data, train_data=self.train_data, task=self.task)
        return str(result.artifact_id)
