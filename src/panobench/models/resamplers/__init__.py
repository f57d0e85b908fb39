"""Resampler registry: vision tokens ``(B·V, S, D_vis) -> (B·V, S', out_dim)``; one file per resampler.

Adding a resampler = one new file with ``<Name>Config`` + ``<Name>Resampler`` and one line in ``_ENTRIES``.

The registry names its classes by module and attribute and imports them on first use: checking a resampler
*name* (the workflow does it for every cell while building its DAG) must not cost a ``torch`` import.
``RESAMPLERS[name]`` still returns ``(ConfigClass, ResamplerClass)``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from panobench.errors import ConfigError

logger = logging.getLogger(__name__)

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


def check_resampler_type(name: str, where: str = "resampler.type") -> None:
    """Raise ConfigError unless ``name`` is a key of the registry (torch-free: the workflow checks every cell)."""
    if name not in RESAMPLERS:
        raise ConfigError(f"config key {where}: unknown resampler {name!r}; expected one of {sorted(RESAMPLERS)}")


def build_resampler(name: str, in_dim: int, params: dict[str, Any] | None = None, *,
                    tokens_per_view: int | None = None, input_grid: int | None = None) -> Resampler:
    """Build resampler ``name`` for vision width ``in_dim`` from plain hyper-parameters.

    Args:
        name: a key of ``RESAMPLERS``.
        in_dim: vision token width D_vis.
        params: hyper-parameters of ``<Name>Config`` (may include ``in_dim`` if it agrees, so that
            ``build_resampler(name, d["in_dim"], d)`` rebuilds from ``resampler.config_dict()``).
        tokens_per_view: the visual-token budget per view; the resampler's own ``<Name>Config.params_for_budget``
            turns it into its parameters (pool factor, queries, latents). A key also given in ``params`` wins
            (a deliberately unequal budget, logged here and flagged in the report).
        input_grid: side of the vision tower's patch grid (needed with ``tokens_per_view``).

    Raises:
        ConfigError: unknown name, unknown parameter, wrong type, out-of-range value, or a budget this resampler
            cannot meet.
    """
    if name not in RESAMPLERS:
        raise ConfigError(f"unknown resampler {name!r}; expected one of {sorted(RESAMPLERS)}")
    from panobench.models.resamplers.base import config_from_params

    config_cls, module_cls = RESAMPLERS[name]
    merged = dict(params or {})
    if tokens_per_view is not None:
        if input_grid is None:
            raise ValueError("build_resampler: tokens_per_view needs input_grid")
        derived = config_cls.params_for_budget(tokens_per_view, input_grid)
        overridden = {k: (merged[k], v) for k, v in derived.items() if k in merged and merged[k] != v}
        if overridden:
            logger.warning("resampler %s: explicit params %s override the tokens_per_view=%d budget (derived %s): "
                           "this arm feeds the LM a different number of tokens per view", name,
                           {k: a for k, (a, _) in overridden.items()}, tokens_per_view,
                           {k: b for k, (_, b) in overridden.items()})
        merged = {**derived, **merged}
    return module_cls(config_from_params(config_cls, in_dim, merged, name=name))


_LAZY = {cls: (mod, cls) for mod, cfg, res in _ENTRIES.values() for cls in (cfg, res)}
_LAZY["Resampler"] = ("base", "Resampler")


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    return getattr(importlib.import_module(f"{__name__}.{module_name}"), attr)


__all__ = ["RESAMPLERS", "build_resampler", "check_resampler_type", *sorted(_LAZY)]
