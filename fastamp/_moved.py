"""Import paths that moved, kept working: ``import fastamp.lightning`` gives the very module
``fastamp.integrations.lightning`` (one module object, so ``isinstance`` and pickles of the old paths
keep working). One table, resolved on first import of an old path; nothing is imported before."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Dict, Optional

__all__ = ["MOVED_MODULES", "install"]

MOVED_MODULES: Dict[str, str] = {
    "fastamp.lightning": "fastamp.integrations.lightning",
    "fastamp.models": "fastamp.testing.models",
    "fastamp.check": "fastamp.cli.check",
    "fastamp.bench": "fastamp.cli.bench",
    "fastamp.demo": "fastamp.cli.demo",
    "fastamp.gradients": "fastamp._gradients",
    "fastamp.batch": "fastamp._batch",
    "fastamp.metrics": "fastamp._metrics",
    "fastamp.plots": "fastamp._plots",
    "fastamp.precision": "fastamp._precision",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        # The target ran its own code when it was imported; importlib sets the old name in
        # sys.modules to the same module object.
        pass


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path=None, target=None) -> Optional[importlib.machinery.ModuleSpec]:
        new = MOVED_MODULES.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new))


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
