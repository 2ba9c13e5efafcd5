"""Imports of the peers' layers for the migration examples, in this repository's environment.

In your own code, import the peers as usual (``from timm.layers import AttentionPoolLatent``,
``from open_clip.transformer import AttentionalPooler``). Here that fails for a reason unrelated to attnpool: timm
and open_clip import torchvision when their package loads, and PyPI's torchvision does not import beside this
project's pinned torch 2.13.0 (see DEVELOPERS.md). Their pooling layers use nothing from torchvision, so these
helpers import just the module holding the layer, with a stand-in for the one torchvision class their package
tables name, and run the peer's own, unmodified code. When torchvision works, the stand-in is not used.

The Set Transformer reference code is not a package: its ``modules.py`` is vendored verbatim (MIT licence) in
``tests/convert/_set_transformer_reference.py`` and loaded from there.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def _stand_in() -> dict[str, types.ModuleType]:
    tv, ops, misc = (types.ModuleType(n) for n in ("torchvision", "torchvision.ops", "torchvision.ops.misc"))

    class FrozenBatchNorm2d(nn.Module):  # only named in timm's/open_clip's norm-layer tables, never built
        pass

    misc.FrozenBatchNorm2d = FrozenBatchNorm2d  # type: ignore[attr-defined]
    tv.ops, ops.misc = ops, misc  # type: ignore[attr-defined]
    tv.__path__, ops.__path__ = [], []  # type: ignore[attr-defined]
    return {"torchvision": tv, "torchvision.ops": ops, "torchvision.ops.misc": misc}


def peer_module(package: str, submodule: str) -> types.ModuleType:
    """``package.submodule`` without running ``package/__init__.py`` (which loads the peer's whole model zoo)."""
    name = f"{package}.{submodule}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{package} is not installed (`make setup` installs it with --no-deps)")
    try:
        import torchvision  # noqa: F401
        added: dict[str, types.ModuleType] = {}
    except Exception:
        added = {k: v for k, v in _stand_in().items() if k not in sys.modules}
        sys.modules.update(added)
    try:
        if package not in sys.modules:
            pkg = types.ModuleType(package)
            pkg.__path__ = list(spec.submodule_search_locations)  # type: ignore[attr-defined]
            sys.modules[package] = pkg
        return importlib.import_module(name)
    finally:
        for k in added:
            sys.modules.pop(k, None)


def set_transformer_reference() -> types.ModuleType:
    """The reference code's ``modules.py`` (``MAB``, ``SAB``, ``ISAB``, ``PMA``), vendored in tests/."""
    path = ROOT / "tests" / "convert" / "_set_transformer_reference.py"
    spec = importlib.util.spec_from_file_location("set_transformer_modules", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
