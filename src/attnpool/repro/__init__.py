"""Reproductions of published results, one module per paper, each run by ``attnpool repro NAME``.

Every module here exposes ``main(argv: list[str] | None = None) -> int``, which parses its own options (its
parser's ``prog`` is ``attnpool repro NAME``); the committed results, with date,
machine, command and wall time, are in ``experiments/README.md``. Modules are imported only when their name is run.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["REPRODUCTIONS", "load"]

#: name on the command line -> (module under attnpool.repro, one-line description)
REPRODUCTIONS: dict[str, tuple[str, str]] = {
    "mil": ("mil", "attention-based deep MIL (Ilse et al. 2018, Table 1) on MUSK1, MUSK2 and ELEPHANT"),
    "set-transformer": ("set_transformer", "Set Transformer (Lee et al. 2019) max regression and amortized clustering"),
    "kernel-regression": ("kernel_regression", "Nadaraya-Watson kernel regression as attention pooling"),
}


def load(name: str) -> ModuleType:
    if name not in REPRODUCTIONS:
        raise ValueError(f"name: expected one of {sorted(REPRODUCTIONS)}, got {name!r}")
    return importlib.import_module(f"attnpool.repro.{REPRODUCTIONS[name][0]}")
