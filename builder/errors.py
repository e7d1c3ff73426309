"""One shallow exception tree for the host side.

Lower layers raise these (mapping library errors with ``raise ... from exc``); only the CLI turns
them into a one-line message and an exit code. Every message should name the problem and the fix.
"""
from __future__ import annotations


class BuilderError(Exception):
    """Base of every error the builder reports to a user."""

    exit_code: int = 1


class UsageError(BuilderError):
    """The user asked for something malformed or contradictory (bad option, impossible recipe)."""

    exit_code = 2


class ProfileError(BuilderError):
    """A device profile is missing or invalid."""


class ModelLoadError(BuilderError):
    """A model could not be found, parsed, built or exported."""


class UnsupportedOpError(ModelLoadError):
    """The model uses an operator a step or target cannot handle."""


class DataError(BuilderError):
    """Calibration/evaluation/training data is missing or does not fit the model."""


class CompressionError(BuilderError):
    """A compression step failed or produced a broken result."""


class TargetError(BuilderError):
    """Cross-compilation for a runtime failed, or the converter is not installed."""


class VerificationError(BuilderError):
    """An artifact's outputs, hash or signature do not match what it claims."""


class RegistryError(BuilderError):
    """The local artifact registry refused an operation (unknown id, corrupt entry)."""


class FleetError(BuilderError):
    """A fleet operation failed: broker unreachable, device refused or rolled back."""


class DeviceUnavailableError(FleetError):
    """A device is unknown, offline or stopped answering (a search measuring on it cannot go on)."""


class SearchError(BuilderError):
    """The recipe search could not meet its targets or could not run."""


class DemoError(BuilderError):
    """A demo stage could not finish: a child process died, a step failed, or it timed out waiting."""
