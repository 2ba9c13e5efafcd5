"""The SetPool base: the weights hook, and that it costs nothing when no hook is registered."""

import torch

from attnpool.nn import AttentionPool, GatedAttentionPool, MeanPool, register_weights_hook
from tests.conftest import make_batch


def test_hook_sees_weights_of_every_attention_module_in_a_model():
    model = torch.nn.ModuleDict({"a": AttentionPool(4, 2), "g": GatedAttentionPool(4, 3), "m": MeanPool()})
    batch = make_batch([3, 0, 2], 4, dtype=torch.float32)
    seen = []
    with register_weights_hook(lambda module, weights, sets: seen.append((type(module).__name__, weights.shape,
                                                                          sets.layout))):
        for name in ("a", "g", "m"):
            model[name](batch.packed, offsets=batch.offsets)
            model[name](batch.padded, batch.mask)
    assert seen == [("AttentionPool", (5, 1, 2), "packed"), ("AttentionPool", (3, 1, 2, 3), "padded"),
                    ("GatedAttentionPool", (5, 1, 1), "packed"), ("GatedAttentionPool", (3, 1, 1, 3), "padded")]
    seen.clear()
    model["a"](batch.sets)
    assert seen == []  # the context manager removed the hook


def test_no_weights_are_computed_without_a_hook(monkeypatch):
    calls = []
    import attnpool.nn.base as base

    monkeypatch.setattr(base, "format_weights", lambda *a: calls.append(a) or a[1])
    pool = AttentionPool(4)
    batch = make_batch([3, 2], 4, dtype=torch.float32)
    captured = {}

    def spy(sets, query, need_weights):
        captured["need"] = need_weights
        return AttentionPool.pool(pool, sets, query, need_weights)

    monkeypatch.setattr(pool, "pool", spy)
    pool(batch.sets)
    assert captured["need"] is False and calls == []
    with register_weights_hook(lambda *a: None):
        pool(batch.sets)
    assert captured["need"] is True


def test_hook_restricted_to_some_modules_leaves_the_others_weightless():
    watched, other = AttentionPool(4), AttentionPool(4)
    batch = make_batch([3, 2], 4, dtype=torch.float32)
    seen = []
    with register_weights_hook(lambda module, weights, sets: seen.append(module), modules=[watched]):
        other(batch.sets)
        watched(batch.sets)
        needs = []
        original = AttentionPool.pool
        other.pool = lambda sets, query, need: needs.append(need) or original(other, sets, query, need)
        other(batch.sets)
    assert seen == [watched] and needs == [False]
