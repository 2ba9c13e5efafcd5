"""from_set_transformer_reference: the reference code's MAB/SAB/ISAB/PMA (vendored verbatim) and their quirks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnpool.convert import from_set_transformer_reference
from attnpool.nn import ISAB, MAB, PMA, SAB
from tests.convert import _set_transformer_reference as ref

# float32 rounding through a stack of blocks whose outputs reach |x| ~ 4: 1e-6, absolute or relative to the output
PARITY = {"rtol": 1e-6, "atol": 1e-6}


def reference(kind: str, ln: bool, heads: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    make = {
        "MAB": lambda: ref.MAB(10, 12, 16, heads, ln=ln),
        "SAB": lambda: ref.SAB(12, 16, heads, ln=ln),
        "ISAB": lambda: ref.ISAB(12, 16, heads, 5, ln=ln),
        "PMA": lambda: ref.PMA(12, heads, 3, ln=ln),
    }[kind]
    m = make()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return m.eval()


def run(module: nn.Module, kind: str, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return module(q, x) if kind == "MAB" else module(x)


@pytest.mark.parametrize("kind", ["MAB", "SAB", "ISAB", "PMA"])
@pytest.mark.parametrize("ln", [False, True])
@pytest.mark.parametrize("heads", [1, 4])
def test_outputs_match_the_reference(kind, ln, heads):
    peer = reference(kind, ln, heads)
    ours = from_set_transformer_reference(peer)  # kind and heads read from the module
    assert type(ours) is {"MAB": MAB, "SAB": SAB, "ISAB": ISAB, "PMA": PMA}[kind]
    g = torch.Generator().manual_seed(1)
    x, q = torch.randn(4, 7, 12, generator=g), torch.randn(4, 3, 10, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(run(ours, kind, x, q), run(peer, kind, x, q), **PARITY)


@pytest.mark.parametrize("kind", ["MAB", "SAB", "ISAB", "PMA"])
def test_padded_sets_equal_the_reference_run_set_by_set(kind):
    """The reference has no mask; attnpool's masked input gives what the reference gives on each unpadded set."""
    peer = reference(kind, ln=True)
    ours = from_set_transformer_reference(peer, num_heads=4)
    lengths = [7, 2, 5]
    g = torch.Generator().manual_seed(2)
    x, q = torch.randn(3, 7, 12, generator=g), torch.randn(3, 3, 10, generator=g)
    mask = torch.arange(7) < torch.tensor(lengths)[:, None]
    dirty = x.masked_fill(~mask[..., None], float("nan"))
    with torch.no_grad():
        got = ours(q, dirty, mask) if kind == "MAB" else ours(dirty, mask)
        for i, n in enumerate(lengths):
            want = run(peer, kind, x[i : i + 1, :n], q[i : i + 1])[0]
            torch.testing.assert_close(got[i, :n] if kind in ("SAB", "ISAB") else got[i], want, **PARITY)


def test_quirks_are_the_switches():
    ours = from_set_transformer_reference(reference("PMA", ln=False), num_heads=4)
    mab = ours.mab
    assert ours.input_ff is None  # no rFF on the PMA's input
    assert mab.residual == "projected_query" and mab.attn.out_proj is None
    assert mab.attn.scale == pytest.approx(12**-0.5)  # 1/sqrt(dim_V), not 1/sqrt(dim_V / H)
    # with the paper's per-head scale the outputs would differ: the quirk matters
    paper = PMA(12, 3, 4, input_ff=False, residual="projected_query", out_proj=False)
    paper.load_state_dict(ours.state_dict())
    x = torch.randn(2, 6, 12)
    with torch.no_grad():
        assert not torch.allclose(paper(x), ours(x), atol=1e-4)


def test_whole_model_state_dict_with_prefixes():
    """The reference ``SetTransformer`` model (models.py): ``enc = [ISAB, ISAB]``, ``dec = [PMA, SAB, SAB, Linear]``."""
    torch.manual_seed(3)
    enc = nn.Sequential(ref.ISAB(3, 16, 4, 6, ln=True), ref.ISAB(16, 16, 4, 6, ln=True))
    dec = nn.Sequential(ref.PMA(16, 4, 2, ln=True), ref.SAB(16, 16, 4, ln=True))
    model = nn.ModuleDict({"enc": enc, "dec": dec}).eval()
    sd = model.state_dict()
    blocks = [from_set_transformer_reference(sd, kind, num_heads=4, prefix=prefix) for kind, prefix in
              [("ISAB", "enc.0."), ("ISAB", "enc.1."), ("PMA", "dec.0."), ("SAB", "dec.1.")]]
    x = torch.randn(2, 9, 3)
    with torch.no_grad():
        want = dec(enc(x))
        h = blocks[1](blocks[0](x))
        got = blocks[3](blocks[2](h))
    torch.testing.assert_close(got, want, **PARITY)


def test_errors_name_the_problem():
    peer = reference("SAB", ln=False)
    with pytest.raises(TypeError, match="kind"):
        from_set_transformer_reference(peer.state_dict(), num_heads=4)
    with pytest.raises(ValueError, match="kind"):
        from_set_transformer_reference(peer, "XAB", num_heads=4)
    with pytest.raises(KeyError, match="prefix"):
        from_set_transformer_reference(peer.state_dict(), "PMA", num_heads=4)
    with pytest.raises(ValueError, match="num_heads"):
        from_set_transformer_reference(peer, num_heads=3)
    with pytest.raises(TypeError, match="num_heads"):
        from_set_transformer_reference(peer.state_dict(), "SAB")
    with pytest.raises(ValueError, match="num_heads"):
        from_set_transformer_reference(peer.state_dict(), "SAB", num_heads=3)
    sd = dict(peer.state_dict())
    sd["mab.extra.weight"] = torch.zeros(2)
    with pytest.raises(NotImplementedError, match="extra"):
        from_set_transformer_reference(sd, "SAB", num_heads=4)
