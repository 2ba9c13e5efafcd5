"""Save and load attnpool modules: ``save_pretrained(module, path)`` and ``from_pretrained(path)``.

A saved module is a directory with two files, the layout Hugging Face uses:

* ``config.json``: the module's class and the constructor arguments that rebuild it (JSON), the attnpool and
  torch versions that wrote it, and the names of frozen parameters;
* ``model.safetensors``: its state dict (persistent parameters and buffers), in safetensors format.

Loading builds the module from the config, loads the tensors strictly (every key, every shape) and returns it in
eval mode, so ``from_pretrained(path)(x)`` equals ``module(x)`` bit for bit on the same machine.

The constructor arguments are read back from a built module by one small function per class (below), because the
modules do not record them. ``save_pretrained`` therefore checks, before writing anything, that a module rebuilt
from the config has the same ``repr`` (every ``extra_repr`` in the tree: sizes, flags, epsilons) and the same
state-dict keys and shapes as the original; a module whose configuration cannot be captured raises instead of
being saved wrongly. Modules holding other modules (the PyG and Hugging Face adapters) are saved as nested configs.

Classes are looked up only inside the ``attnpool`` package, or among those added with :func:`register`, so a
config file cannot make ``from_pretrained`` import arbitrary code.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "from_pretrained", "module_config", "module_from_config", "register",
           "save_pretrained"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1

ConfigFn = Callable[[nn.Module], dict[str, Any]]
_CONFIG_FNS: dict[str, ConfigFn] = {}
_REGISTERED: dict[str, type[nn.Module]] = {}


def _safetensors_torch() -> Any:
    try:
        import safetensors.torch
    except ImportError as e:
        raise ModuleNotFoundError("attnpool.hub needs safetensors: pip install safetensors", name="safetensors") from e
    return safetensors.torch


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register(cls: type[nn.Module], config_fn: ConfigFn | None = None) -> type[nn.Module]:
    """Make ``cls`` (a class outside attnpool, or one whose configuration needs reading) savable.

    ``config_fn(module)`` returns the keyword arguments that rebuild ``module`` with ``cls(**kwargs)``; values may be
    JSON types, dtypes, or modules (saved as nested configs). Without it, each constructor argument is read from the
    module attribute of the same name. Usable as a decorator.
    """
    name = _qualname(cls)
    _REGISTERED[name] = cls
    if config_fn is not None:
        _CONFIG_FNS[name] = config_fn
    return cls


# ---------------------------------------------------------------------------------------------------------------
# Reading a module's constructor arguments back.
# ---------------------------------------------------------------------------------------------------------------


def _has_bias(linear: nn.Module | None, default: bool = True) -> bool:
    return default if linear is None else getattr(linear, "bias", None) is not None


def _attention_pool_config(m: Any) -> dict[str, Any]:
    from attnpool.nn.attention_pool import _SCORES
    from attnpool.nn.scores import AdditiveScore

    if m.score_name not in _SCORES:
        raise TypeError(f"module: {type(m).__name__} with a custom score ({m.score_name}) cannot be saved: a callable "
                        "has no JSON form. Save its state_dict() and rebuild it in code instead")
    projs = [m.query_proj, m.key_proj, m.value_proj, m.out_proj]
    present = [p for p in projs if p is not None]
    return {
        "dim": m.dim, "num_queries": m.num_queries, "num_heads": m.num_heads, "query_dim": m.query_dim,
        "query_proj": m.query_proj is not None, "key_proj": m.key_proj is not None,
        "value_proj": m.value_proj is not None, "out_proj": m.out_proj is not None,
        "bias": _has_bias(present[0]) if present else True,
        "score": m.score_name,
        "score_hidden": m.score.hidden_dim if isinstance(m.score, AdditiveScore) else None,
        "temperature": m.initial_temperature,
        "learn_temperature": isinstance(m.log_temperature, nn.Parameter),
        "dropout": m.dropout, "fold": m.fold,
    }


def _gated_config(m: Any) -> dict[str, Any]:
    return {"dim": m.dim, "hidden_dim": m.hidden_dim, "num_branches": m.num_branches, "gated": m.gated,
            "dropout": m.dropout}


def _mab_options(mab: Any) -> dict[str, Any]:
    """The options that PMA, SAB and ISAB pass on to their MABs."""
    return {"layer_norm": mab.layer_norm, "norm_eps": mab.norm_eps, "ff_hidden_dim": mab.ff_hidden_dim,
            "residual": mab.residual, "out_proj": mab.attn.out_proj is not None, "scale": mab.attn.scale,
            "bias": _has_bias(mab.attn.query_proj), "dropout": mab.attn.dropout}


def _mab_config(m: Any) -> dict[str, Any]:
    return {"dim": m.dim, "num_heads": m.num_heads, "query_dim": m.query_dim, "kv_dim": m.kv_dim, **_mab_options(m)}


def _pma_config(m: Any) -> dict[str, Any]:
    return {"dim": m.dim, "num_seeds": m.num_seeds, "num_heads": m.num_heads, "input_ff": m.input_ff is not None,
            **_mab_options(m.mab)}


def _sab_config(m: Any) -> dict[str, Any]:
    return {"dim": m.dim, "num_heads": m.num_heads, "in_dim": m.in_dim, **_mab_options(m.mab)}


def _isab_config(m: Any) -> dict[str, Any]:
    return {"dim": m.dim, "num_inducing": m.num_inducing, "num_heads": m.num_heads, "in_dim": m.in_dim,
            **_mab_options(m.mab0)}


def _latent_config(m: Any) -> dict[str, Any]:
    block = m.layers[0]
    config = {"dim": m.dim, "num_latents": m.num_latents, "num_heads": m.num_heads, "num_layers": m.num_layers,
              "kv_dim": m.kv_dim, "mlp_ratio": m.mlp_ratio, "norm_eps": m.norm_eps, "final_norm": m.norm is not None,
              "bias": _has_bias(block.attn.query_proj), "dropout": block.attn.dropout}
    # switches that newer versions of the module may have (read when present, so that the repr check passes)
    for name in ("residual",):
        if hasattr(m, name):
            config[name] = getattr(m, name)
    return config


def _map_head_config(m: Any) -> dict[str, Any]:
    return {"dim": m.dim, "num_heads": m.num_heads, "num_probes": m.num_probes, "mlp_ratio": m.mlp_ratio,
            "norm_eps": m.norm_eps, "norm": m.norm is not None, "qkv_bias": _has_bias(m.attn.query_proj),
            "gelu_approximate": m.gelu_approximate, "dropout": m.attn.dropout}


def _additive_config(m: Any) -> dict[str, Any]:
    return {"query_dim": m.query_dim, "key_dim": m.key_dim, "hidden_dim": m.hidden_dim, "bias": m.bias is not None}


def _bilinear_config(m: Any) -> dict[str, Any]:
    return {"query_dim": m.query_dim, "key_dim": m.key_dim}


def _channel_softmax_config(m: Any) -> dict[str, Any]:
    return {"t": m.initial_t, "learn": m.learn, "channels": m.channels}


def _no_config(m: Any) -> dict[str, Any]:
    return {}


_CONFIG_FNS.update({
    "attnpool.nn.attention_pool.AttentionPool": _attention_pool_config,
    "attnpool.nn.gated_attention_pool.GatedAttentionPool": _gated_config,
    "attnpool.nn.set_transformer.MAB": _mab_config,
    "attnpool.nn.set_transformer.PMA": _pma_config,
    "attnpool.nn.set_transformer.SAB": _sab_config,
    "attnpool.nn.set_transformer.ISAB": _isab_config,
    "attnpool.nn.latent_cross_attention.LatentCrossAttention": _latent_config,
    "attnpool.nn.map_head.MAPHead": _map_head_config,
    "attnpool.nn.scores.AdditiveScore": _additive_config,
    "attnpool.nn.scores.BilinearScore": _bilinear_config,
    "attnpool.nn.channel_softmax_pool.ChannelSoftmaxPool": _channel_softmax_config,
    **{f"attnpool.nn.baselines.{name}": _no_config
       for name in ("MeanPool", "SumPool", "MaxPool", "ClsPool", "LastTokenPool")},
})


def _attribute_config(m: nn.Module) -> dict[str, Any]:
    """Each constructor argument read from the attribute of the same name (for modules that store them all)."""
    import inspect

    config: dict[str, Any] = {}
    for name, p in inspect.signature(type(m).__init__).parameters.items():
        if name in ("self", "device", "dtype") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if not hasattr(m, name):
            raise TypeError(f"module: cannot read the constructor argument {name!r} of {type(m).__name__} back "
                            f"(no attribute of that name); register it with attnpool.hub.register(cls, config_fn)")
        config[name] = getattr(m, name)
    return config


def _to_json(value: Any, where: str) -> Any:
    if isinstance(value, nn.Module):
        return {"__attnpool_module__": _describe(value)}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, (list, tuple)):
        return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"module: the constructor argument {where} = {value!r} ({type(value).__name__}) has no JSON form")


def _from_json(value: Any, dtype: torch.dtype | None) -> Any:
    if isinstance(value, dict):
        if "__attnpool_module__" in value:
            return _build(value["__attnpool_module__"], dtype)
        if "__dtype__" in value:
            return getattr(torch, value["__dtype__"])
        return {k: _from_json(v, dtype) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v, dtype) for v in value]
    return value


def _describe(module: nn.Module) -> dict[str, Any]:
    name = _qualname(type(module))
    if not (name.startswith("attnpool.") or name in _REGISTERED):
        raise TypeError(f"module: {name} is not an attnpool module; register it with attnpool.hub.register(cls)")
    fn = _CONFIG_FNS.get(name)
    custom = getattr(module, "attnpool_config", None)  # modules outside attnpool.nn may describe themselves
    config = fn(module) if fn is not None else custom() if callable(custom) else _attribute_config(module)
    return {"class": name, "config": {k: _to_json(v, f"{type(module).__name__}.{k}") for k, v in config.items()}}


def _resolve(name: str) -> type[nn.Module]:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if not name.startswith("attnpool."):
        raise ValueError(f"config: class {name!r} is outside attnpool and was not registered with "
                         "attnpool.hub.register; refusing to import it")
    module_name, _, cls_name = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"config: class {name!r} does not exist in this version of attnpool") from e
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"config: {name!r} is not a torch.nn.Module class")
    return cls


def _build(description: dict[str, Any], dtype: torch.dtype | None = None) -> nn.Module:
    """The module ``description`` names, built in ``dtype`` where its constructor takes one (so that tensors it
    computes at construction, such as a fixed temperature's buffer, are computed in that dtype)."""
    import inspect

    cls = _resolve(description["class"])
    kwargs = {k: _from_json(v, dtype) for k, v in description["config"].items()}
    if dtype is not None and "dtype" in inspect.signature(cls.__init__).parameters:
        kwargs["dtype"] = dtype
    module = cls(**kwargs)
    return module if dtype is None else module.to(dtype)


def module_config(module: nn.Module) -> dict[str, Any]:
    """``{"class": "attnpool.nn....", "config": {...}}``: what rebuilds ``module`` (without its weights).

    Raises TypeError when the configuration cannot be captured (a custom score callable, a foreign class).
    """
    return _describe(module)


def module_from_config(description: dict[str, Any]) -> nn.Module:
    """A new module (freshly initialized weights) from :func:`module_config`'s description."""
    return _build(description)


def _check_rebuilds(module: nn.Module, description: dict[str, Any]) -> None:
    rebuilt = _build(description)
    if repr(rebuilt) != repr(module):
        raise TypeError(f"module: {type(module).__name__}'s configuration could not be captured exactly; a module "
                        f"rebuilt from it differs:\nsaved:   {module!r}\nrebuilt: {rebuilt!r}")
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))
        raise TypeError(f"module: {type(module).__name__}'s configuration could not be captured exactly; the state "
                        f"dict of a module rebuilt from it differs in {diff[:6]}")


# ---------------------------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------------------------


def save_pretrained(module: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Save ``module`` to the directory ``path`` (created if needed) as ``config.json`` + ``model.safetensors``.

    Raises:
        TypeError: the module's configuration cannot be captured exactly (a custom score callable, a class
            outside attnpool that was not registered), checked before anything is written.
    """
    import attnpool

    description = _describe(module)
    _check_rebuilds(module, description)
    # safetensors refuses tensors that share memory or are not contiguous: write independent copies
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}
    frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()})
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "attnpool_format": FORMAT_VERSION,
        "attnpool_version": attnpool.__version__,
        "torch_version": torch.__version__.split("+")[0],
        **description,
        "dtype": dtypes[0] if len(dtypes) == 1 else None,
        "frozen_parameters": frozen,
    }
    metadata = {"format": "pt", "attnpool_class": description["class"]}
    _safetensors_torch().save_file(tensors, str(out / WEIGHTS_NAME), metadata=metadata)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return out


def from_pretrained(path: str | os.PathLike[str], *, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> nn.Module:
    """Load a module written by :func:`save_pretrained`, in eval mode.

    Args:
        path: the directory holding ``config.json`` and ``model.safetensors``.
        device: where to put it (default: the CPU).
        dtype: cast floating-point parameters and buffers to this dtype (default: as saved).
    """
    root = Path(path)
    config_path, weights_path = root / CONFIG_NAME, root / WEIGHTS_NAME
    for file in (config_path, weights_path):
        if not file.is_file():
            raise FileNotFoundError(f"path: expected {file.name} in {root} (written by attnpool.hub.save_pretrained)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if "attnpool_format" not in config or "class" not in config:
        raise ValueError(f"path: {config_path} is not an attnpool config (no attnpool_format / class)")
    if config["attnpool_format"] > FORMAT_VERSION:
        raise ValueError(f"path: {config_path} has format {config['attnpool_format']}; this attnpool reads formats "
                         f"up to {FORMAT_VERSION}: upgrade attnpool")
    saved_dtype = getattr(torch, config["dtype"]) if config.get("dtype") else None
    module = _build(config, saved_dtype)
    state = _safetensors_torch().load_file(str(weights_path))
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))
        raise ValueError(f"path: {weights_path} does not match the {config['class']} that {CONFIG_NAME} describes; "
                         f"(key, shape) pairs differing: {diff[:8]}")
    module.load_state_dict(state, strict=True)
    frozen = set(config.get("frozen_parameters", ()))
    for name, p in module.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    if device is not None or dtype is not None:
        module = module.to(device=device, dtype=dtype)
    return module.eval()
