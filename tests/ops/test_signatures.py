"""Each op is stated once: the reference's signature. The schema is inferred from it; the public
wrapper, the fake kernel and the C++ kernels (which fail to register on a mismatched schema) must agree
with it, argument for argument, so that adding a knob in one place and not another fails here."""

from __future__ import annotations

import inspect

import pytest
import torch

from fastamp import ops
from fastamp.ops import _library
from fastamp.testing import reference

OPS = list(_library.OP_NAMES)


def _params(fn):
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name", OPS)
def test_the_schema_has_the_reference_s_arguments(name):
    schema = getattr(torch.ops.fastamp, name).default._schema
    assert [a.name for a in schema.arguments] == [n for n, _ in _params(getattr(reference, name))]
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert written == set(_library.MUTATES[name])


@pytest.mark.parametrize("name", OPS)
def test_the_wrapper_has_the_reference_s_arguments_and_defaults(name):
    assert _params(getattr(ops, name)) == _params(getattr(reference, name))


@pytest.mark.parametrize("name", OPS)
def test_the_fake_kernel_has_the_reference_s_arguments(name):
    fake = _library.FAKES[name]
    registered = torch._library.simple_registry.singleton.find(f"fastamp::{name}").fake_impl.kernel
    assert registered.source.endswith(f":{inspect.getsourcelines(fake)[1]}")  # the one registered for the op
    assert [n for n, _ in _params(fake)] == [n for n, _ in _params(getattr(reference, name))]


def test_every_op_has_a_schema_a_wrapper_a_reference_and_a_fake():
    names = set(_library.MUTATES)
    assert names == set(_library.SCHEMAS) == set(OPS) == set(_library.FAKES)
    for name in names:
        assert callable(getattr(ops, name)) and callable(getattr(reference, name))
