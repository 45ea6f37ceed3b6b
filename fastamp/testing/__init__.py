"""What fastamp's tests and ``fastamp check`` share: the test model and the oracle.

- :mod:`fastamp.testing.models`: the test transformer of the reference notebook and its synthetic
  task (the demo, tests and benchmarks train it).
- ``reference``: the pure-PyTorch implementation of every op (:mod:`fastamp.ops._reference`), the
  oracle every kernel is judged against.
- :class:`HostReads`, :class:`FastampOpCalls`, :class:`Collectives`: count a step's host reads, fastamp
  op calls and collectives.
- :mod:`fastamp.testing.mesh_layouts`: a small model on every DeviceMesh layout, run under torchrun.
"""

from __future__ import annotations

from ..ops import _reference as reference
from . import models
from .probes import Collectives, FastampOpCalls, HostReads

__all__ = ["Collectives", "FastampOpCalls", "HostReads", "models", "reference"]
