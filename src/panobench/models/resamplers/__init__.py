"""Resampler registry: vision tokens ``(B·V, S, D_vis) -> (B·V, S', out_dim)``; one file per resampler.

Adding a resampler = one new file with ``<Name>Config`` + ``<Name>Resampler`` and one line in ``_ENTRIES``.

The registry names its classes by module and attribute and imports them on first use: checking a resampler
*name* (the workflow does it for every cell while building its DAG) must not cost a ``torch`` import.
``RESAMPLERS[name]`` still returns ``(ConfigClass, ResamplerClass)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from panobench.errors import ConfigError

if TYPE_CHECKING:
    from panobench.models.resamplers.base import Resampler

# name -> (module in this package, config class, resampler class)
_ENTRIES: dict[str, tuple[str, str, str]] = {
    "mlp": ("mlp", "MLPConfig", "MLPResampler"),
    "bimamba": ("bimamba", "BiMambaConfig", "BiMambaResampler"),  # mamba_ssm is imported lazily inside bimamba.py
    "qformer": ("qformer", "QFormerConfig", "QFormerResampler"),
    "perceiver": ("perceiver", "PerceiverConfig", "PerceiverResampler"),
}


class _Registry(Mapping[str, tuple[type, type]]):
    """Read-only mapping name -> (ConfigClass, ResamplerClass), importing a resampler's module on first access."""

    def __getitem__(self, name: str) -> tuple[type, type]:
        module_name, config_name, module_cls_name = _ENTRIES[name]
        module = importlib.import_module(f"{__name__}.{module_name}")
        return getattr(module, config_name), getattr(module, module_cls_name)

    def __contains__(self, name: object) -> bool:   # Mapping's default would import the module
        return name in _ENTRIES

    def __iter__(self) -> Iterator[str]:
        return iter(_ENTRIES)

    def __len__(self) -> int:
        return len(_ENTRIES)


RESAMPLERS = _Registry()


def build_resampler(name: str, in_dim: int, params: dict[str, Any] | None = None) -> Resampler:
    """Build resampler ``name`` for vision width ``in_dim`` from plain hyper-parameters.

    Args:
        name: a key of ``RESAMPLERS``.
        in_dim: vision token width D_vis.
        params: hyper-parameters of ``<Name>Config`` (may include ``in_dim`` if it agrees, so that
            ``build_resampler(name, d["in_dim"], d)`` rebuilds from ``resampler.config_dict()``).

    Raises:
        ConfigError: unknown name, unknown parameter, wrong type or out-of-range value.
    """
    if name not in RESAMPLERS:
        raise ConfigError(f"unknown resampler {name!r}; expected one of {sorted(RESAMPLERS)}")
    from panobench.models.resamplers.base import config_from_params

    config_cls, module_cls = RESAMPLERS[name]
    return module_cls(config_from_params(config_cls, in_dim, params, name=name))


_LAZY = {cls: (mod, cls) for mod, cfg, res in _ENTRIES.values() for cls in (cfg, res)}
_LAZY["Resampler"] = ("base", "Resampler")


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    return getattr(importlib.import_module(f"{__name__}.{module_name}"), attr)


__all__ = ["RESAMPLERS", "build_resampler", *sorted(_LAZY)]
