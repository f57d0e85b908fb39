"""Every registered resampler: shapes, gradients, configuration, strictness and kernel-path selection."""

from __future__ import annotations

import pytest
import torch

from panobench.errors import ConfigError
from panobench.models.resamplers import RESAMPLERS, build_resampler
from panobench.models.resamplers import bimamba as bimamba_module
from panobench.models.resamplers.base import Resampler

IN_DIM = 16
GRID = 4  # 4×4 patch grid -> 16 tokens per view
TINY: dict[str, dict] = {
    "mlp": {"out_dim": 24, "hidden_dim": 20},
    "bimamba": {"out_dim": 24, "depth": 1, "d_state": 4, "scan_chunk_size": 8},
    "qformer": {"out_dim": 24, "num_queries": 5, "depth": 1, "num_heads": 2},
    "perceiver": {"out_dim": 24, "num_latents": 6, "depth": 1, "num_heads": 2},
}
# One knob per resampler whose two values must change the parameter count.
SIZE_KNOB = {"mlp": ("hidden_dim", 8, 32), "bimamba": ("depth", 1, 2), "qformer": ("depth", 1, 2),
             "perceiver": ("depth", 1, 2)}


def tokens(n: int = 3, grid: int = GRID) -> torch.Tensor:
    return torch.randn(n, grid * grid, IN_DIM, generator=torch.Generator().manual_seed(0))


def test_registry_holds_the_four_resamplers():
    assert sorted(RESAMPLERS) == ["bimamba", "mlp", "perceiver", "qformer"]
    assert set(TINY) == set(RESAMPLERS)


@pytest.mark.parametrize("name", sorted(RESAMPLERS))
def test_output_shape_matches_num_output_tokens(name):
    torch.manual_seed(0)
    resampler = build_resampler(name, IN_DIM, TINY[name])
    assert isinstance(resampler, Resampler)
    out = resampler(tokens())
    assert out.shape == (3, resampler.num_output_tokens(GRID * GRID), resampler.out_dim)
    assert resampler.out_dim == 24
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(RESAMPLERS))
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    resampler = build_resampler(name, IN_DIM, TINY[name])
    x = tokens().requires_grad_()
    resampler(x).pow(2).mean().backward()
    missing = [k for k, p in resampler.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(RESAMPLERS))
def test_parameter_count_follows_the_configuration(name):
    key, small, large = SIZE_KNOB[name]
    count = lambda value: sum(  # noqa: E731
        p.numel() for p in build_resampler(name, IN_DIM, {**TINY[name], key: value}).parameters()
    )
    assert count(small) < count(large)


@pytest.mark.parametrize(("name", "key"), [("qformer", "num_queries"), ("perceiver", "num_latents")])
def test_query_count_sets_output_tokens_and_parameters(name, key):
    small = build_resampler(name, IN_DIM, {**TINY[name], key: 8})
    large = build_resampler(name, IN_DIM, {**TINY[name], key: 16})
    assert small(tokens()).shape[1] == 8 and large(tokens()).shape[1] == 16
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n_params(large) - n_params(small) == 8 * IN_DIM


@pytest.mark.parametrize("name", sorted(RESAMPLERS))
@pytest.mark.parametrize("grid", [4, 6])
def test_output_grid_is_consistent_with_num_output_tokens(name, grid):
    resampler = build_resampler(name, IN_DIM, TINY[name])
    side = resampler.output_grid(grid)
    if name in ("qformer", "perceiver"):
        assert side is None
        assert resampler.pool_factor == 1
    else:
        assert side == grid
        assert side * side == resampler.num_output_tokens(grid * grid)
    assert resampler(tokens(2, grid)).shape[1] == resampler.num_output_tokens(grid * grid)


@pytest.mark.parametrize("name", ["mlp", "bimamba"])
def test_pooling_shrinks_the_grid_by_the_pool_factor(name):
    resampler = build_resampler(name, IN_DIM, {**TINY[name], "pool_factor": 2})
    assert resampler.pool_factor == 2
    assert resampler.output_grid(4) == 2
    assert resampler.num_output_tokens(16) == 4
    assert resampler(tokens()).shape == (3, 4, 24)
    with pytest.raises(ConfigError, match="pool_factor=2"):
        resampler.num_output_tokens(9)


def test_mlp_pooling_averages_row_major_2x2_blocks():
    resampler = build_resampler("mlp", IN_DIM, {"pool_factor": 2})
    x = tokens(1)
    pooled = x.view(1, 2, 2, 2, 2, IN_DIM).mean(dim=(2, 4)).reshape(1, 4, IN_DIM)  # (row-block, row, col-block, col)
    expected = resampler.fc2(resampler.act(resampler.fc1(resampler.layer_norm(pooled))))
    torch.testing.assert_close(resampler(x), expected)


@pytest.mark.parametrize("name", sorted(RESAMPLERS))
def test_out_dim_defaults_to_in_dim(name):
    params = {k: v for k, v in TINY[name].items() if k != "out_dim"}
    for out_dim in (None, 0):
        resampler = build_resampler(name, IN_DIM, {**params, "out_dim": out_dim})
        assert resampler.out_dim == IN_DIM
        assert resampler.config_dict()["out_dim"] == IN_DIM


def test_unknown_resampler_name_is_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown resampler 'mamba'; expected one of \['bimamba', 'mlp'"):
        build_resampler("mamba", IN_DIM)


@pytest.mark.parametrize("name", sorted(RESAMPLERS))
def test_unknown_parameter_is_a_config_error_naming_the_key(name):
    with pytest.raises(ConfigError, match="num_layerz"):
        build_resampler(name, IN_DIM, {"num_layerz": 2})


@pytest.mark.parametrize(
    ("name", "params", "key"),
    [
        ("mlp", {"pool_factor": "2"}, "pool_factor"),
        ("mlp", {"pool_factor": 2.0}, "pool_factor"),
        ("bimamba", {"depth": True}, "depth"),
        ("bimamba", {"use_mamba_ssm": "always"}, "use_mamba_ssm"),
        ("bimamba", {"allow_reference_on_cuda": "yes"}, "allow_reference_on_cuda"),
        ("qformer", {"num_heads": 3}, "num_heads"),
        ("qformer", {"mlp_ratio": "4"}, "mlp_ratio"),
        ("perceiver", {"num_latents": 0}, "num_latents"),
        ("perceiver", {"in_dim": IN_DIM + 1}, "in_dim"),
    ],
)
def test_ill_typed_or_out_of_range_parameter_is_a_config_error(name, params, key):
    with pytest.raises(ConfigError, match=key):
        build_resampler(name, IN_DIM, params)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("mlp", {"num_layerz": 2}, r"resampler 'mlp': unknown config key resampler\.params\.num_layerz; expected one of"),
        ("mlp", {"pool_factor": "2"}, r"resampler 'mlp': config key 'resampler\.params\.pool_factor': expected an integer"),
        ("bimamba", {"use_mamba_ssm": "always"}, r"config key 'resampler\.params\.use_mamba_ssm': 'always' is not one of"),
    ],
)
def test_parameter_errors_name_the_resampler_and_the_full_key(name, params, message):
    """Resampler params are checked by the run config's own checker, as the ``resampler.params`` section."""
    with pytest.raises(ConfigError, match=message):
        build_resampler(name, IN_DIM, params)


def test_integer_is_accepted_for_a_float_parameter():
    assert build_resampler("qformer", IN_DIM, {"num_heads": 2, "mlp_ratio": 2}).config_dict()["mlp_ratio"] == 2


@pytest.mark.parametrize("name", sorted(RESAMPLERS))
def test_config_dict_round_trip_rebuilds_an_identical_module(name):
    torch.manual_seed(0)
    original = build_resampler(name, IN_DIM, TINY[name])
    resolved = original.config_dict()
    assert resolved["in_dim"] == IN_DIM
    assert set(resolved) >= set(TINY[name])
    torch.manual_seed(1)  # different init: the weights must come from the state dict
    rebuilt = build_resampler(name, resolved["in_dim"], resolved)
    assert rebuilt.config_dict() == resolved
    rebuilt.load_state_dict(original.state_dict(), strict=True)
    x = tokens()
    torch.testing.assert_close(rebuilt(x), original(x))


@pytest.mark.parametrize(("name", "names"), [
    ("mlp", {"layer_norm.weight", "fc1.weight", "fc2.weight"}),
    ("qformer", {"query_tokens", "layers.0.self_attn.q_proj.weight", "layers.0.cross_attn.out_proj.weight",
                 "layers.0.mlp.fc1.weight", "layers.0.layer_norm3.weight"}),
    ("perceiver", {"latents", "layers.0.cross_attn.k_proj.weight", "layers.0.mlp.fc2.weight", "layer_norm.weight"}),
    ("bimamba", {"layers.0.fwd_mamba.A_log", "layers.0.bwd_mamba.in_proj.weight", "layers.0.norm.weight"}),
])
def test_submodule_names_follow_the_hf_convention(name, names):
    assert names <= set(build_resampler(name, IN_DIM, TINY[name]).state_dict())


def test_perceiver_latents_attend_to_themselves():
    """Keys/values are concat(vision tokens, latents), the Flamingo choice."""
    torch.manual_seed(0)
    resampler = build_resampler("perceiver", IN_DIM, TINY["perceiver"])
    attn = resampler.layers[0].cross_attn
    seen = []
    attn.k_proj.register_forward_hook(lambda module, args, out: seen.append(out.shape[1]))
    resampler(tokens())
    assert seen[0] == GRID * GRID + TINY["perceiver"]["num_latents"]


# --- bimamba kernel-path selection ------------------------------------------------------------------------


def test_bimamba_on_cpu_uses_the_reference_kernel():
    resampler = build_resampler("bimamba", IN_DIM, TINY["bimamba"])
    assert resampler.kernel_path == "reference"
    resampler(tokens())
    assert resampler.kernel_path == "reference"


def test_bimamba_reverse_scan_sees_later_tokens():
    """Changing the last token changes the first output: the backward direction is really used."""
    torch.manual_seed(0)
    resampler = build_resampler("bimamba", IN_DIM, TINY["bimamba"])
    x = tokens(1)
    y = x.clone()
    y[:, -1] = torch.randn(IN_DIM)  # not a constant shift, which the pre-norm LayerNorm would erase
    assert not torch.allclose(resampler(x)[:, 0], resampler(y)[:, 0])


def _no_mamba_ssm(monkeypatch):
    monkeypatch.setattr(bimamba_module, "_mamba_ssm_available", lambda: (False, "ModuleNotFoundError: mamba_ssm"))


def test_cuda_without_mamba_ssm_is_refused(monkeypatch):
    _no_mamba_ssm(monkeypatch)
    with pytest.raises(ConfigError, match=r"mamba-ssm is not installed.*resampler\.params\.allow_reference_on_cuda: true"):
        bimamba_module.select_kernel_path("cuda", "auto", allow_reference_on_cuda=False)


def test_cuda_without_mamba_ssm_runs_the_reference_when_allowed(monkeypatch):
    _no_mamba_ssm(monkeypatch)
    assert bimamba_module.select_kernel_path("cuda", "auto", allow_reference_on_cuda=True) == "reference"


def test_cuda_with_mamba_ssm_picks_the_fused_kernels_unless_told_never(monkeypatch):
    monkeypatch.setattr(bimamba_module, "_mamba_ssm_available", lambda: (True, ""))
    assert bimamba_module.select_kernel_path("cuda", "auto", allow_reference_on_cuda=False) == "mamba_ssm"
    with pytest.raises(ConfigError, match=r"resampler\.params\.use_mamba_ssm: never.*resampler\.params\.allow_reference_on_cuda: true"):
        bimamba_module.select_kernel_path("cuda", "never", allow_reference_on_cuda=False)
    assert bimamba_module.select_kernel_path("cuda", "never", allow_reference_on_cuda=True) == "reference"
    assert bimamba_module.select_kernel_path("cpu", "auto", allow_reference_on_cuda=False) == "reference"


def test_mamba_ssm_is_not_importable_here():
    """The real availability probe (not a stub) reports the missing package with its reason."""
    available, reason = bimamba_module._mamba_ssm_available()
    assert not available and "mamba_ssm" in reason


def test_bimamba_construction_with_a_cuda_hint_is_refused_without_mamba_ssm(monkeypatch):
    _no_mamba_ssm(monkeypatch)
    with pytest.raises(ConfigError, match="mamba-ssm is not installed"):
        bimamba_module.BiMambaResampler(bimamba_module.BiMambaConfig(in_dim=IN_DIM), device="cuda")
    allowed = bimamba_module.BiMambaConfig(in_dim=IN_DIM, allow_reference_on_cuda=True)
    assert bimamba_module.BiMambaResampler(allowed, device="cuda").kernel_path == "reference"


def test_bimamba_never_switches_kernel_path_mid_run(monkeypatch):
    resampler = build_resampler("bimamba", IN_DIM, TINY["bimamba"])
    resampler(tokens())  # fixes "reference" on CPU
    monkeypatch.setattr(bimamba_module, "_mamba_ssm_available", lambda: (True, ""))
    with pytest.raises(ConfigError, match="switching kernels mid-run is refused"):
        resampler.resolve_kernel_path("cuda")
    assert resampler.kernel_path == "reference"
