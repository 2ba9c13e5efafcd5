"""save_pretrained / from_pretrained: every module class of attnpool.nn round-trips with identical outputs."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from torch import nn

import attnpool.nn as apnn
from attnpool.hub import CONFIG_NAME, WEIGHTS_NAME, from_pretrained, module_config, register, save_pretrained
from tests.conftest import make_batch

D = 8

# Every module class exported by attnpool.nn, with the configurations that exercise its switches.
VARIANTS: dict[str, list[Callable[[], nn.Module]]] = {
    "AttentionPool": [
        lambda: apnn.AttentionPool(D),
        lambda: apnn.AttentionPool(D, 3, 2, query_proj=True, key_proj=True, value_proj=True, out_proj=True,
                                   bias=False),
        lambda: apnn.AttentionPool(D, 2, 2, query_dim=5, query_proj=True, score="additive", score_hidden=7,
                                   temperature=0.5, learn_temperature=True),
        lambda: apnn.AttentionPool(D, 1, 1, score="bilinear", temperature=2.0, dropout=0.1),
        lambda: apnn.AttentionPool(D, 2, 4, score="dot", key_proj=True, fold=False),
    ],
    "GatedAttentionPool": [
        lambda: apnn.GatedAttentionPool(D, 6),
        lambda: apnn.GatedAttentionPool(D, 5, 2, gated=False),
    ],
    "LatentCrossAttention": [
        lambda: apnn.LatentCrossAttention(D, 3, 2),
        lambda: apnn.LatentCrossAttention(D, 1, 4, num_layers=2, kv_dim=6, mlp_ratio=2.0, norm_eps=1e-6,
                                          final_norm=True, bias=False),
    ],
    "MAPHead": [
        lambda: apnn.MAPHead(D, 2),
        lambda: apnn.MAPHead(D, 4, num_probes=3, mlp_ratio=1.5, norm_eps=1e-5, norm=False, qkv_bias=False,
                             gelu_approximate="tanh"),
    ],
    "MAB": [
        lambda: apnn.MAB(D, 2),
        lambda: apnn.MAB(D, 2, query_dim=5, kv_dim=6, layer_norm=True, norm_eps=1e-6, ff_hidden_dim=11,
                         residual="projected_query", out_proj=False, scale=D**-0.5, bias=False),
    ],
    "PMA": [
        lambda: apnn.PMA(D, 2, 2),
        lambda: apnn.PMA(D, 1, 4, input_ff=False, layer_norm=True, residual="projected_query", out_proj=False,
                         scale=D**-0.5),
    ],
    "SAB": [
        lambda: apnn.SAB(D, 2),
        lambda: apnn.SAB(D, 2, in_dim=5, residual="projected_query", layer_norm=True, ff_hidden_dim=4),
    ],
    "ISAB": [
        lambda: apnn.ISAB(D, 3, 2),
        lambda: apnn.ISAB(D, 2, 4, in_dim=6, residual="projected_query", out_proj=False, scale=D**-0.5),
    ],
    "ChannelSoftmaxPool": [lambda: apnn.ChannelSoftmaxPool(0.5), lambda: apnn.ChannelSoftmaxPool(2.0, learn=True),
                           lambda: apnn.ChannelSoftmaxPool(-1.0, learn=True, channels=D)],
    "MeanPool": [apnn.MeanPool],
    "SumPool": [apnn.SumPool],
    "MaxPool": [apnn.MaxPool],
    "ClsPool": [apnn.ClsPool],
    "LastTokenPool": [apnn.LastTokenPool],
    "AdditiveScore": [lambda: apnn.AdditiveScore(4, 3, 5), lambda: apnn.AdditiveScore(4, 4, 2, bias=False)],
    "BilinearScore": [lambda: apnn.BilinearScore(4, 3)],
}
ABSTRACT = {"SetPool", "SetToSet"}


def module_classes() -> list[str]:
    return [name for name in apnn.__all__
            if isinstance(getattr(apnn, name), type) and issubclass(getattr(apnn, name), nn.Module)]


def test_every_module_class_has_round_trip_cases():
    assert set(module_classes()) - ABSTRACT == set(VARIANTS), "add the new attnpool.nn class to VARIANTS"


def perturb_(module: nn.Module, seed: int) -> nn.Module:
    """Move every parameter away from its initial value, so that a loader that re-initializes is caught."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def call(module: nn.Module, dtype: torch.dtype = torch.float32) -> object:
    """The module's output on a ragged batch with NaN padding (and, for scores, on query/key tensors)."""
    g = torch.Generator().manual_seed(1)
    if isinstance(module, (apnn.AdditiveScore, apnn.BilinearScore)):
        q = torch.randn(2, 1, 3, module.query_dim, generator=g, dtype=dtype)
        k = torch.randn(2, 1, 5, module.key_dim, generator=g, dtype=dtype)
        return module(q, k)
    width = getattr(module, "in_dim", None) or getattr(module, "kv_dim", None) or D
    batch = make_batch([3, 1, 0, 5], width, dtype=dtype)
    if isinstance(module, apnn.MAB):
        x = torch.randn(4, 2, module.query_dim, generator=g, dtype=dtype)
        return module(x, batch.padded, batch.mask)
    if isinstance(module, apnn.AttentionPool) and module.query_dim != D:
        return module(batch.padded, batch.mask, query=torch.randn(4, module.query_dim, generator=g, dtype=dtype))
    return module(batch.padded, batch.mask)


CASES = [(name, i) for name, fns in VARIANTS.items() for i in range(len(fns))]


@pytest.mark.parametrize(("name", "variant"), CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_round_trip_gives_identical_outputs(tmp_path, name, variant):
    torch.manual_seed(variant)
    module = perturb_(VARIANTS[name][variant](), seed=variant).eval()
    save_pretrained(module, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {CONFIG_NAME, WEIGHTS_NAME}
    loaded = from_pretrained(tmp_path)
    assert type(loaded) is type(module)
    assert not loaded.training
    assert repr(loaded) == repr(module)
    for (k1, v1), (k2, v2) in zip(module.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1
    with torch.no_grad():
        assert torch.equal(call(loaded), call(module))  # bit for bit
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["class"] == f"{type(module).__module__}.{type(module).__name__}"
    assert config["attnpool_format"] == 1


def test_float64_module_loads_in_float64_and_dtype_override(tmp_path):
    module = perturb_(apnn.AttentionPool(D, 2, 2, key_proj=True, temperature=0.7, dtype=torch.float64), 0).eval()
    save_pretrained(module, tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["dtype"] == "float64"
    loaded = from_pretrained(tmp_path)
    assert loaded.query.dtype == torch.float64
    with torch.no_grad():
        assert torch.equal(call(loaded, torch.float64), call(module, torch.float64))
    as32 = from_pretrained(tmp_path, dtype=torch.float32)
    assert as32.query.dtype == torch.float32


def test_frozen_parameters_stay_frozen(tmp_path):
    module = apnn.AttentionPool(D, 1, 1, key_proj=True)
    module.query.requires_grad_(False)
    save_pretrained(module, tmp_path)
    loaded = from_pretrained(tmp_path)
    assert not loaded.query.requires_grad
    assert loaded.key_proj.weight.requires_grad


def test_custom_score_is_refused_before_writing(tmp_path):
    module = apnn.AttentionPool(D, score=lambda q, k: (q * k.mean(-2, keepdim=True)).sum(-1, keepdim=True))
    with pytest.raises(TypeError, match="custom score"):
        save_pretrained(module, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_foreign_module_is_refused(tmp_path):
    with pytest.raises(TypeError, match="not an attnpool module"):
        save_pretrained(nn.Linear(2, 2), tmp_path)


def test_registered_foreign_module_round_trips(tmp_path):
    class Scaled(nn.Module):
        def __init__(self, dim: int, factor: float = 2.0) -> None:
            super().__init__()
            self.dim, self.factor = dim, factor
            self.pool = apnn.AttentionPool(dim, key_proj=True)

        def forward(self, x, mask=None):
            return self.factor * self.pool(x, mask)

    register(Scaled)
    module = perturb_(Scaled(D, 3.0), 0).eval()
    save_pretrained(module, tmp_path)
    loaded = from_pretrained(tmp_path)
    batch = make_batch([2, 3], D, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(batch.padded, batch.mask), module(batch.padded, batch.mask))


def test_config_naming_a_class_outside_attnpool_is_refused(tmp_path):
    save_pretrained(apnn.MeanPool(), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["class"] = "os.system"
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="outside attnpool"):
        from_pretrained(tmp_path)


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    save_pretrained(apnn.AttentionPool(D, 2, key_proj=True), tmp_path / "a")
    save_pretrained(apnn.AttentionPool(D, 3, key_proj=True), tmp_path / "b")
    (tmp_path / "a" / WEIGHTS_NAME).write_bytes((tmp_path / "b" / WEIGHTS_NAME).read_bytes())
    with pytest.raises(ValueError, match="does not match"):
        from_pretrained(tmp_path / "a")


def test_missing_files_say_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        from_pretrained(tmp_path)


def test_module_config_is_json():
    description = module_config(apnn.PMA(D, 2, 2, layer_norm=True))
    assert description["class"] == "attnpool.nn.set_transformer.PMA"
    assert json.loads(json.dumps(description)) == description
    assert description["config"]["num_seeds"] == 2 and description["config"]["layer_norm"] is True
