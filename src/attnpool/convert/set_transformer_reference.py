"""State dicts of the Set Transformer reference code (github.com/juho-lee/set_transformer, ``modules.py``)."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn

from attnpool.convert._common import StateDict, check_heads, factory, load_exact, read_state_dict, reject_extra, require
from attnpool.nn.set_transformer import ISAB, MAB, PMA, SAB

__all__ = ["from_set_transformer_reference"]

_WHAT = "Set Transformer reference"
Kind = Literal["MAB", "SAB", "ISAB", "PMA"]
_KINDS = ("MAB", "SAB", "ISAB", "PMA")


def _mab_tensors(sd: StateDict, src: str, dst: str, layer_norm: bool) -> tuple[dict[str, Tensor], set[str]]:
    """One reference ``MAB``'s weights (``fc_q, fc_k, fc_v, fc_o, ln0, ln1`` under ``src``) under attnpool's names
    (``attn.query_proj, attn.key_proj, attn.value_proj, ff.0, ln0, ln1`` under ``dst``)."""
    names = {"fc_q": "attn.query_proj", "fc_k": "attn.key_proj", "fc_v": "attn.value_proj", "fc_o": "ff.0"}
    if layer_norm:
        names.update({"ln0": "ln0", "ln1": "ln1"})
    keys = [f"{src}{ref}.{p}" for ref in names for p in ("weight", "bias")]
    require(sd, keys, f"{_WHAT} MAB")
    out = {f"{dst}{ours}.{p}": sd[f"{src}{ref}.{p}"] for ref, ours in names.items() for p in ("weight", "bias")}
    return out, set(keys)


def from_set_transformer_reference(
    module_or_state_dict: nn.Module | StateDict,
    kind: Kind | None = None,
    *,
    num_heads: int | None = None,
    prefix: str = "",
) -> MAB | SAB | ISAB | PMA:
    r"""The attnpool block that computes what a reference-code ``MAB``, ``SAB``, ``ISAB`` or ``PMA`` computes.

    The official code of Lee et al. (2019) differs from the paper in ways that change its outputs; the converted
    block reproduces each of them through a switch of attnpool's Set Transformer modules
    (:mod:`attnpool.nn.set_transformer`):

    * **scale**: ``softmax(Q K^T / sqrt(dim_V))`` divides by the square root of the *whole* width ``dim_V``, not
      of a head's ``dim_V / H`` as the paper's scaled dot product does. With ``H`` heads its logits are
      ``sqrt(H)`` times smaller, its attention softer: ``scale=dim**-0.5``. attnpool's default is
      ``1/sqrt(D/H)``.
    * **residual**: ``O = Q_ + A V_`` adds the *projected* query ``fc_q(Q)``, not the input ``Q``:
      ``residual="projected_query"`` (the paper: ``X + Multihead(X, Y, Y)``).
    * **no output projection** ``W_O`` on the heads: ``out_proj=False``.
    * the rFF is ``relu(fc_o(h))``, added to ``h`` (``O + relu(fc_o(O))``): attnpool's ``ff_hidden_dim=None``,
      with ``fc_o -> ff.0``.
    * **PMA** has no rFF on its input (the paper writes ``MAB(S, rFF(Z))``): ``input_ff=False``.
    * LayerNorms only with ``ln=True`` (the paper has them always): ``layer_norm``, read from the state dict.

    It also has no mask at all: a padded batch pools its padding. The converted block takes ``mask`` (True =
    keep), packed and list input, never reads masked values, and gives exactly 0 for an empty set; on sets without
    padding it matches the reference to float32 rounding.

    Weights move as ``fc_q, fc_k, fc_v -> attn.query_proj, attn.key_proj, attn.value_proj``, ``fc_o -> ff.0``,
    ``ln0, ln1 -> ln0, ln1``; PMA's ``S [1, k, D] -> seeds [k, D]``; ISAB's ``I [1, m, D] -> inducing [m, D]``,
    ``mab0, mab1 -> mab0, mab1``; SAB's and PMA's ``mab -> mab``.

    Args:
        module_or_state_dict: a reference module or its state dict.
        kind: ``"MAB"``, ``"SAB"``, ``"ISAB"`` or ``"PMA"``; read from the class name when a module is given.
        num_heads: the reference's ``num_heads``: read from a module, required with a state dict (which does not
            record it).
        prefix: the block's key prefix in a larger state dict, e.g. ``"dec.0."`` for the PMA of the reference
            ``SetTransformer`` model (``enc = [ISAB, ISAB]``, ``dec = [PMA, SAB, SAB, Linear]``).

    Returns:
        the attnpool block in eval mode, on the weights' device and dtype.
    """
    if kind is None:
        if not isinstance(module_or_state_dict, nn.Module) or type(module_or_state_dict).__name__ not in _KINDS:
            raise TypeError(f"kind: pass one of {_KINDS} (it is read from the class name of a reference module only)")
        kind = type(module_or_state_dict).__name__  # type: ignore[assignment]
    if kind not in _KINDS:
        raise ValueError(f"kind: expected one of {_KINDS}, got {kind!r}")
    if isinstance(module_or_state_dict, nn.Module):
        m: Any = module_or_state_dict
        mab = {"MAB": lambda: m, "SAB": lambda: m.mab, "PMA": lambda: m.mab, "ISAB": lambda: m.mab0}[kind]()
        recorded = getattr(mab, "num_heads", None)
        if num_heads is not None and recorded is not None and num_heads != recorded:
            raise ValueError(f"num_heads: the module has {recorded} heads, got num_heads={num_heads}")
        num_heads = recorded if num_heads is None else num_heads
    sd = read_state_dict(module_or_state_dict, prefix, _WHAT)
    mab_prefix = {"MAB": "", "SAB": "mab.", "PMA": "mab.", "ISAB": "mab0."}[kind]
    require(sd, [f"{mab_prefix}fc_q.weight", f"{mab_prefix}fc_k.weight"], f"{_WHAT} {kind}")
    layer_norm = f"{mab_prefix}ln0.weight" in sd
    kw = factory(sd)

    if kind == "MAB":
        dim, query_dim = sd["fc_q.weight"].shape
        kv_dim = sd["fc_k.weight"].shape[1]
        block: MAB | SAB | ISAB | PMA = MAB(
            dim, check_heads(num_heads, dim, _WHAT), query_dim=query_dim, kv_dim=kv_dim, layer_norm=layer_norm,
            residual="projected_query", out_proj=False, scale=dim**-0.5, **kw)
        tensors, used = _mab_tensors(sd, "", "", layer_norm)
    elif kind == "SAB":
        dim, in_dim = sd["mab.fc_q.weight"].shape
        block = SAB(dim, check_heads(num_heads, dim, _WHAT), in_dim=in_dim, layer_norm=layer_norm,
                    residual="projected_query", out_proj=False, scale=dim**-0.5, **kw)
        tensors, used = _mab_tensors(sd, "mab.", "mab.", layer_norm)
    elif kind == "PMA":
        require(sd, ["S"], f"{_WHAT} PMA")
        seeds = sd["S"]
        dim = seeds.shape[-1]
        block = PMA(dim, seeds.shape[1], check_heads(num_heads, dim, _WHAT), input_ff=False, layer_norm=layer_norm,
                    residual="projected_query", out_proj=False, scale=dim**-0.5, **kw)
        tensors, used = _mab_tensors(sd, "mab.", "mab.", layer_norm)
        tensors["seeds"] = seeds.reshape(seeds.shape[1], dim)
        used.add("S")
    else:
        require(sd, ["I"], f"{_WHAT} ISAB")
        inducing = sd["I"]
        dim = inducing.shape[-1]
        in_dim = sd["mab0.fc_k.weight"].shape[1]
        block = ISAB(dim, inducing.shape[1], check_heads(num_heads, dim, _WHAT), in_dim=in_dim,
                     layer_norm=layer_norm, residual="projected_query", out_proj=False, scale=dim**-0.5, **kw)
        tensors, used = _mab_tensors(sd, "mab0.", "mab0.", layer_norm)
        more, used1 = _mab_tensors(sd, "mab1.", "mab1.", layer_norm)
        tensors.update(more)
        tensors["inducing"] = inducing.reshape(inducing.shape[1], dim)
        used |= used1 | {"I"}
    reject_extra(sd, used, f"{_WHAT} {kind}")
    load_exact(block, tensors, f"{_WHAT} {kind}")
    return block.eval()
