"""Resampler registry: vision tokens ``(B·V, S, D_vis) -> (B·V, S', out_dim)``; one file per resampler.

Adding a resampler = one new file with ``<Name>Config`` + ``<Name>Resampler`` and one line in ``RESAMPLERS``.
"""

from __future__ import annotations

from typing import Any

from panobench.errors import ConfigError
from panobench.models.resamplers.base import Resampler, config_from_params
from panobench.models.resamplers.bimamba import BiMambaConfig, BiMambaResampler
from panobench.models.resamplers.mlp import MLPConfig, MLPResampler
from panobench.models.resamplers.perceiver import PerceiverConfig, PerceiverResampler
from panobench.models.resamplers.qformer import QFormerConfig, QFormerResampler

RESAMPLERS: dict[str, tuple[type, type]] = {
    "mlp": (MLPConfig, MLPResampler),
    "bimamba": (BiMambaConfig, BiMambaResampler),  # mamba_ssm is imported lazily inside bimamba.py
    "qformer": (QFormerConfig, QFormerResampler),
    "perceiver": (PerceiverConfig, PerceiverResampler),
}


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
    config_cls, module_cls = RESAMPLERS[name]
    return module_cls(config_from_params(config_cls, in_dim, params, name=name))


__all__ = [
    "RESAMPLERS",
    "BiMambaConfig",
    "BiMambaResampler",
    "MLPConfig",
    "MLPResampler",
    "PerceiverConfig",
    "PerceiverResampler",
    "QFormerConfig",
    "QFormerResampler",
    "Resampler",
    "build_resampler",
]
