"""What fastamp's tests and ``fastamp check`` share: the test model and the oracle.

- :mod:`fastamp.testing.models`: the test transformer of the reference notebook and its synthetic
  task (the demo, tests and benchmarks train it).
- ``reference``: the pure-PyTorch implementation of every op (:mod:`fastamp.ops._reference`), the
  oracle every kernel is judged against.
- :class:`HostReads`, :class:`FastampOpCalls`: count a step's host reads and fastamp op calls.
"""

from __future__ import annotations

from ..ops import _reference as reference
from . import models
from .probes import FastampOpCalls, HostReads

__all__ = ["FastampOpCalls", "HostReads", "models", "reference"]
