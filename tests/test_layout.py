"""The package layout: old import paths still work, and each module's ``__all__`` lists its own public names."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys

import pytest

import fastamp
from fastamp._moved import MOVED_MODULES


@pytest.mark.parametrize("old,new", sorted(MOVED_MODULES.items()))
def test_moved_module_is_the_same_object(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def test_old_paths_work_in_a_fresh_interpreter():
    code = ("from fastamp.lightning import FusedMixedPrecision, AMPMonitor\n"
            "from fastamp.models import build_model\n"
            "import fastamp.integrations.lightning as new\n"
            "assert FusedMixedPrecision is new.FusedMixedPrecision\n"
            "from fastamp import models\n"
            "assert models.build_model is build_model\n")
    pytest.importorskip("lightning")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def _public_modules():
    names = []
    for info in pkgutil.walk_packages(fastamp.__path__, "fastamp."):
        if info.name in MOVED_MODULES or info.name.endswith(("__main__", "._C")):
            continue
        names.append(info.name)
    return names


def _module(name):
    if name.endswith("lightning"):
        pytest.importorskip("lightning")
    if name.endswith("huggingface"):
        pytest.importorskip("transformers")
    return importlib.import_module(name)


def _is_private(module_name: str) -> bool:
    return any(part.startswith("_") for part in module_name.split("."))


@pytest.mark.parametrize("name", _public_modules())
def test_all_lists_only_public_names_defined_here(name):
    """Each public name has one public home: where it is defined, or (for what a private module
    defines) the one public module that hands it on; packages' faces hand on their submodules' names."""
    module = _module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    for attr in exported:
        assert not attr.startswith("_") or attr == "__version__", f"{name}.__all__ lists private {attr}"
        value = getattr(module, attr)
        if not (inspect.isclass(value) or inspect.isfunction(value)):
            continue  # constants, type aliases, instances, submodules
        home = value.__module__
        if home == name or (hasattr(module, "__path__") and home.startswith("fastamp.")):
            continue
        assert _is_private(home), f"{name}.__all__ re-exports {attr} from the public module {home}"
        others = [m for m in _public_modules() if m != name and not _is_private(m)
                  and not hasattr(importlib.import_module(m), "__path__")
                  and attr in getattr(importlib.import_module(m), "__all__", ())]
        assert not others, f"{attr} (from {home}) is handed on by {name} and by {others}"
