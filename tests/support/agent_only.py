"""Run a command as on an agent-only install (`pip install 'edgefleet[agent]'`): the builder
extra's packages are made unimportable before anything else is imported.

    python tests/support/agent_only.py builder analyze model.onnx
"""
from __future__ import annotations

import importlib.abc
import sys

from builder.cli.errors import BUILDER_EXTRA_MODULES


class _BlockBuilderExtra(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):  # noqa: ANN001 - importlib's signature
        if name.split(".")[0] in BUILDER_EXTRA_MODULES:
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return None


if __name__ == "__main__":
    for module in list(sys.modules):
        if module.split(".")[0] in BUILDER_EXTRA_MODULES:
            del sys.modules[module]
    sys.meta_path.insert(0, _BlockBuilderExtra())
    prog, sys.argv = sys.argv[1], sys.argv[1:]
    if prog == "builder":
        from builder.cli.main import app
    else:
        from agent.cli import app
    app()
