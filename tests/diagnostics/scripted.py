"""A pooling module whose weights follow a script: synthetic failure modes that must trigger their alerts."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from attnpool._sets import Sets
from attnpool.nn import SetPool

# rule(x [n, D] the set's elements) -> weights [H, Q, n]
Rule = Callable[[Tensor], Tensor]


class ScriptedPool(SetPool):
    """Pools with the weights ``rule`` gives each set; ``leak`` puts that much mass on masked positions."""

    has_weights = True

    def __init__(self, rule: Rule, leak: float = 0.0) -> None:
        super().__init__()
        self.rule, self.leak = rule, leak

    def pool(self, sets: Sets, query: Tensor | None, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        lengths = sets.lengths.tolist()
        if sets.is_padded:
            keep = sets.keep_mask()
            per = [self.rule(sets.values[b][keep[b]]) for b in range(len(lengths))]
            h, q = per[0].shape[:2]
            w = torch.zeros(len(lengths), h, q, sets.values.shape[1], dtype=torch.float32)
            for b, wb in enumerate(per):
                w[b][..., keep[b]] = wb
                if self.leak and not bool(keep[b].all()):
                    w[b][..., ~keep[b]] = self.leak
            out = torch.einsum("bl,bld->bd", w[:, 0, 0], sets.values.float())
        else:
            parts = torch.split(sets.values, lengths)
            per = [self.rule(x) for x in parts]
            w = torch.cat([wb.permute(2, 0, 1) for wb in per])  # [N, H, Q]
            out = torch.stack([wb[0, 0] @ x.float() for wb, x in zip(per, parts)])
        return out, w if need_weights else None


def content_softmax(x: Tensor, scale: float = 2.0, feature: int = 0) -> Tensor:
    """Weights from the content of the elements: a softmax of one feature."""
    return torch.softmax(scale * x[:, feature].float(), 0)


def heads_queries(*rows: Tensor) -> Tensor:
    """Stack ``[n]`` weight rows as ``[H=len(rows), Q=1, n]``."""
    return torch.stack(rows).unsqueeze(1)


def random_sets(count: int, dim: int = 4, low: int = 5, high: int = 20, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(low, high + 1, (count,), generator=g).tolist()
    return [torch.randn(n, dim, generator=g) for n in sizes]
