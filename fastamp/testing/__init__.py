"""What fastamp's tests and ``fastamp check`` share: the test model and the oracle.

- :mod:`fastamp.testing.models`: the test transformer of the reference notebook and its synthetic
  task (the demo, tests and benchmarks train it).
- ``reference``: the pure-PyTorch implementation of every op (:mod:`fastamp.ops._reference`), the
  oracle every kernel is judged against.
- :mod:`fastamp.testing.cases`: the awkward inputs, the one bitwise comparator, the tolerance per
  (device, dtype, op), the kernels' chunk size, the two implementations an op test runs;
  :mod:`fastamp.testing.oracles`: hand-computed expectations written with torch's own ops.
- :class:`HostReads`, :class:`FastampOpCalls`, :class:`Collectives`: count a step's host reads, fastamp
  op calls and collectives.
- :mod:`fastamp.testing.mesh_layouts`: a small model on every DeviceMesh layout, run under torchrun.
"""

from __future__ import annotations

from ..ops import _reference as reference
from . import models
from .cases import (
    GRAD_DTYPES,
    IMPLEMENTATIONS,
    MIXED_DTYPES,
    NORM_OPS,
    assert_bitwise_equal,
    chunk_size,
    clones,
    grad_cases,
    relative_error,
    same_bits,
    sizes_around_chunks,
    tolerance,
)
from .oracles import (
    bits,
    clone_all,
    flags,
    fresh_state,
    make_grads,
    norm_by_torch,
    norm_rtol,
    opmath,
    skip_unless_supported,
    supported,
    unscaled_by_hand,
)
from .probes import Collectives, FastampOpCalls, HostReads

__all__ = ["Collectives", "FastampOpCalls", "GRAD_DTYPES", "HostReads", "IMPLEMENTATIONS", "MIXED_DTYPES", "NORM_OPS",
           "assert_bitwise_equal", "bits", "chunk_size", "clone_all", "clones", "flags", "fresh_state", "grad_cases",
           "make_grads", "models", "norm_by_torch", "norm_rtol", "opmath", "reference", "relative_error", "same_bits",
           "sizes_around_chunks", "skip_unless_supported", "supported", "tolerance", "unscaled_by_hand"]
