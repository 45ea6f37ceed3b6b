"""fastamp.testing.models: the test transformer and its synthetic task."""

from __future__ import annotations

import itertools

import pytest
import torch

from fastamp.testing.models import MODEL_SIZES, TransformerConfig, TransformerLM, build_model, synthetic_batches


def test_forward_returns_logits_and_cross_entropy_loss():
    model = build_model("tiny")
    batch = next(synthetic_batches(model.config, batch_size=3, seq_len=10))
    out = model(**batch)
    assert out["logits"].shape == (3, 10, model.config.vocab_size)
    expected = torch.nn.functional.cross_entropy(out["logits"].reshape(-1, model.config.vocab_size), batch["labels"].reshape(-1))
    torch.testing.assert_close(out["loss"], expected)
    assert "loss" not in model(batch["input_ids"])


def test_attention_is_causal():
    model = build_model("tiny").eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % model.config.vocab_size
    with torch.no_grad():
        a, b = model(ids)["logits"], model(changed)["logits"]
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = build_model("tiny")
    checkpointed = build_model("tiny", gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    batch = next(synthetic_batches(plain.config, batch_size=2))
    plain(**batch)["loss"].backward()
    checkpointed(**batch)["loss"].backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_sizes_and_errors():
    assert set(MODEL_SIZES) == {"tiny", "small", "base"}
    model = build_model("tiny", num_layers=1, vocab_size=100)
    assert len(model.layers) == 1 and model.embedding.num_embeddings == 100
    with pytest.raises(ValueError, match="unknown model size"):
        build_model("huge")
    with pytest.raises(ValueError, match="more than seq_len"):
        model(torch.zeros(1, model.config.seq_len + 1, dtype=torch.long))
    config = TransformerConfig(d_model=32, num_heads=4)
    assert config.ffn_dim == 128 and isinstance(TransformerLM(config), torch.nn.Module)


def test_synthetic_task_is_deterministic_and_learnable_by_construction():
    config = MODEL_SIZES["tiny"]
    first = list(itertools.islice(synthetic_batches(config, 4, seed=3, num_tokens=50), 3))
    again = list(itertools.islice(synthetic_batches(config, 4, seed=3, num_tokens=50), 3))
    for a, b in zip(first, again):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    # labels are the next inputs, and each next token is a fixed function of the current one
    batch = first[0]
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    mapping = {}
    for batch in first:
        for cur, nxt in zip(batch["input_ids"].flatten().tolist(), batch["labels"].flatten().tolist()):
            assert mapping.setdefault(cur, nxt) == nxt
    assert max(mapping) < 50
