"""What every converter shares: reading a peer's weights, and loading them into an attnpool module strictly."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

StateDict = Mapping[str, Tensor]


def read_state_dict(module_or_state_dict: nn.Module | StateDict, prefix: str, what: str) -> dict[str, Tensor]:
    """The peer's tensors (detached, on their device), with ``prefix`` removed from the keys that have it.

    ``prefix`` picks one layer out of a whole model's state dict (``"head.attn_pool."``); keys without it are
    dropped.
    """
    if isinstance(module_or_state_dict, nn.Module):
        sd = module_or_state_dict.state_dict()
    elif isinstance(module_or_state_dict, Mapping):
        sd = dict(module_or_state_dict)
    else:
        raise TypeError(f"module_or_state_dict: expected a {what} module or its state dict, "
                        f"got {type(module_or_state_dict).__name__}")
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not sd:
            raise ValueError(f"prefix: no key of the state dict starts with {prefix!r}")
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise TypeError(f"module_or_state_dict: expected tensors, got other values at {bad[:5]}")
    return {k: v.detach() for k, v in sd.items()}


def require(sd: Mapping[str, Tensor], keys: list[str], what: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise KeyError(f"module_or_state_dict: not a {what} state dict: missing {missing} (keys present: "
                       f"{sorted(sd)[:12]}{' ...' if len(sd) > 12 else ''}). Pass prefix= to pick the layer out of a "
                       "larger model's state dict")


def reject_extra(sd: Mapping[str, Tensor], used: set[str], what: str) -> None:
    """Fail on peer weights that the conversion would silently drop (a feature attnpool does not reproduce)."""
    extra = sorted(set(sd) - used)
    if extra:
        raise NotImplementedError(f"{what}: the state dict holds weights that this conversion has no place for: "
                                  f"{extra}. They belong to a feature of the peer that attnpool does not reproduce "
                                  "exactly, so converting would change the outputs")


def bias_or_zeros(bias: Tensor | None, size: int, like: Tensor) -> Tensor:
    """A peer's missing bias as zeros: adding exact zeros changes no output bit."""
    return bias if bias is not None else torch.zeros(size, dtype=like.dtype, device=like.device)


def load_exact(module: nn.Module, tensors: Mapping[str, Tensor], what: str) -> None:
    """Copy ``tensors`` into ``module``'s parameters and buffers: every key of its state dict, exact shapes."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:  # a converter bug, not a user error: say everything
        raise RuntimeError(f"{what}: conversion produced the wrong keys for {type(module).__name__}: missing "
                           f"{missing}, unexpected {unexpected}")
    wrong = [(k, tuple(tensors[k].shape), tuple(v.shape)) for k, v in own.items() if tensors[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{what}: weight shapes do not fit the configuration given: (key, got, expected) = {wrong}. "
                         "Check num_heads and the other arguments against the peer's")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()}, strict=True)


def factory(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """``device``/``dtype`` for the new module: those of the peer's weights."""
    t = next(iter(sd.values()))
    return {"device": t.device, "dtype": t.dtype if t.is_floating_point() else None}


def class_name(obj: object) -> str:
    return type(obj).__name__


def check_heads(num_heads: int | None, dim: int, what: str) -> int:
    if num_heads is None:
        raise TypeError(f"num_heads: a {what} state dict does not record its number of heads; pass num_heads=")
    if not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
        raise ValueError(f"num_heads: expected a positive divisor of the width {dim}, got {num_heads!r}")
    return num_heads
