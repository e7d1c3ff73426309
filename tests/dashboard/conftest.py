"""The fleet tests' fixtures (artifacts in a real registry, child processes) for the browser test."""
from tests.fleet.conftest import digits_onnx, fleet_home, processes  # noqa: F401
