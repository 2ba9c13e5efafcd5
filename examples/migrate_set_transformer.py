"""Migrating from the Set Transformer reference code (github.com/juho-lee/set_transformer, modules.py).

Run: python examples/migrate_set_transformer.py (CPU, about a second). Every claim is asserted.
"""

import torch
from _peers import set_transformer_reference  # in your code: from modules import PMA, SAB (the reference repo)

reference = set_transformer_reference()
torch.manual_seed(0)

# --8<-- [start:before]
# Before: the reference blocks, on [B, N, D] sets of equal size (they take no mask).
ref_sab = reference.SAB(16, 32, num_heads=4, ln=True).eval()
ref_pma = reference.PMA(32, num_heads=4, num_seeds=1, ln=True).eval()
x = torch.randn(2, 7, 16)
with torch.no_grad():
    ref_out = ref_pma(ref_sab(x))                     # [B, 1, 32]
# --8<-- [end:before]

# --8<-- [start:convert]
from attnpool.convert import from_set_transformer_reference
from attnpool.nn import PMA, SAB

sab = from_set_transformer_reference(ref_sab)         # kind read from the class name; state dicts work too:
pma = from_set_transformer_reference(ref_pma.state_dict(), "PMA", num_heads=4)
assert isinstance(sab, SAB) and isinstance(pma, PMA)
# --8<-- [end:convert]

# --8<-- [start:after]
with torch.no_grad():
    assert torch.allclose(pma(sab(x)), ref_out[:, 0], atol=1e-5)   # one seed: [B, D] here, [B, 1, D] there
    # Sets of different sizes: padded + mask or packed; masked positions are never read.
    keep = torch.arange(7) < torch.tensor([[7], [3]])
    out = pma(sab(x, keep), keep)
    assert torch.allclose(out[1], ref_pma(ref_sab(x[1:, :3]))[0, 0], atol=1e-5)  # = the reference on the set alone
    # The reference's quirks are switches of attnpool's blocks; the converter turns them on:
    # the reference divides the logits by sqrt(dim_V), not by sqrt(dim_V / heads) as the paper does
    assert pma.mab.attn.scale == 32**-0.5
    # it adds the projected query fc_q(Q) as the residual, has no output projection and no rFF before PMA
    assert pma.mab.residual == "projected_query" and pma.mab.attn.out_proj is None and pma.input_ff is None
    # attnpool's defaults follow the paper instead: a paper-style PMA of the same size.
    paper = PMA(32, num_seeds=1, num_heads=4, layer_norm=True)
    assert paper.mab.residual == "query" and paper.mab.attn.out_proj is not None and paper.input_ff is not None
# --8<-- [end:after]

print("migrate_set_transformer: all assertions passed")
