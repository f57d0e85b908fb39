"""The pure-PyTorch Mamba: chunked scan vs a step-by-step scan, and parity with the real mamba_ssm.Mamba.

mamba_ssm cannot be imported on a CPU-only machine (its CUDA extension), so the parity tests extract the
pure-Python files of the project's built wheel into tmp_path and stub the compiled modules.
"""

from __future__ import annotations

import importlib
import math
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from panobench.models.resamplers import bimamba
from panobench.models.resamplers.mamba_ref import MambaReference, selective_scan_reference

WHEEL_NAME = "mamba_ssm-2.3.2.post1-cp312-cp312-linux_x86_64.whl"
WHEEL_DIRS = [Path(__file__).parents[2] / "../shared/wheels", Path("/work/shared/wheels")]
# Pure-Python files that mamba_simple.py needs; mamba_ssm/__init__.py is replaced by an empty one because the
# real one imports Mamba2/Mamba3 (triton) too.
WHEEL_FILES = [
    "mamba_ssm/modules/__init__.py",
    "mamba_ssm/modules/mamba_simple.py",
    "mamba_ssm/ops/__init__.py",
    "mamba_ssm/ops/selective_scan_interface.py",
    "mamba_ssm/utils/__init__.py",
    "mamba_ssm/utils/torch.py",
]


def sequential_scan(u, delta, A, B, C, D, z, delta_bias):
    """The recurrence one time step at a time: the obviously-correct oracle (b d l / d n / b n l layouts)."""
    delta = F.softplus(delta + delta_bias[:, None])
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1) + u * D[:, None]
    return y * F.silu(z)


def scan_inputs(b=2, d=6, length=75, n=4, seed=0, large_dt=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).float()  # noqa: E731
    inputs = {
        "u": r(b, d, length),
        "delta": r(b, d, length) + (3.0 if large_dt else 0.0),
        "A": -torch.exp(r(d, n)),
        "B": r(b, n, length),
        "C": r(b, n, length),
        "D": r(d),
        "z": r(b, d, length),
        "delta_bias": r(d) * 0.1,
    }
    return {k: v.requires_grad_() for k, v in inputs.items()}


def assert_close_to_oracle(actual, expected, tol, what):
    """max |actual − expected| ≤ tol · max |expected|: relative to the tensor's scale, as float32 allows."""
    err = (actual.double() - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} × {scale:.3g}"


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 32, 75, 128])
@pytest.mark.parametrize("large_dt", [False, True])
def test_chunked_scan_matches_sequential_scan_values_and_gradients(chunk_size, large_dt):
    """float32 chunked scan vs the float64 step-by-step oracle, including a last chunk shorter than the rest."""
    inputs = scan_inputs(large_dt=large_dt)
    oracle_inputs = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    y = selective_scan_reference(**inputs, chunk_size=chunk_size)
    y_oracle = sequential_scan(**oracle_inputs)
    assert y.dtype == torch.float32
    assert_close_to_oracle(y, y_oracle, 1e-5, "output")
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y * weight).sum().backward()
    (y_oracle * weight.double()).sum().backward()
    for key in inputs:
        # Parameter-like gradients (A, D, delta_bias) sum over batch and time, so allow a little more.
        assert_close_to_oracle(inputs[key].grad, oracle_inputs[key].grad, 3e-5, f"d/d{key}")


def test_chunked_scan_stays_finite_when_decay_is_huge():
    """Δ·A of hundreds per step: exp of the cumulative sum alone would overflow; differences never do."""
    inputs = scan_inputs(length=64)
    with torch.no_grad():
        inputs["delta"].fill_(50.0)
        inputs["A"].fill_(-10.0)
    y = selective_scan_reference(**inputs, chunk_size=64)
    y.sum().backward()
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(v.grad).all() for v in inputs.values())


def test_scan_runs_in_float32_under_bf16_input():
    inputs = {k: v.detach() for k, v in scan_inputs().items()}
    y32 = selective_scan_reference(**inputs)
    y16 = selective_scan_reference(**{k: (v.bfloat16() if k in ("u", "z") else v) for k, v in inputs.items()})
    assert y16.dtype == torch.bfloat16
    # Only the bf16 rounding of u and z separates them, not a bf16 recurrence.
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.05)


def test_reference_mamba_parameter_shapes_follow_mamba_ssm():
    m = MambaReference(40, d_state=8, d_conv=3, expand=2)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    dt_rank = math.ceil(40 / 16)
    assert shapes == {
        "in_proj.weight": (160, 40),
        "conv1d.weight": (80, 1, 3),
        "conv1d.bias": (80,),
        "x_proj.weight": (dt_rank + 16, 80),
        "dt_proj.weight": (80, dt_rank),
        "dt_proj.bias": (80,),
        "A_log": (80, 8),
        "D": (80,),
        "out_proj.weight": (40, 80),
    }
    torch.testing.assert_close(m.A_log, torch.log(torch.arange(1.0, 9.0)).repeat(80, 1))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001


# --- parity with the real mamba_ssm.Mamba, loaded from the built wheel -------------------------------------


def _mini_einops() -> types.ModuleType:
    """Just enough of einops (rearrange/repeat with flat or single-level groups) for mamba_simple.py on CPU."""

    def parse(side):
        groups, current = [], None
        for token in side.replace("(", " ( ").replace(")", " ) ").split():
            if token == "(":
                current = []
            elif token == ")":
                groups.append(current)
                current = None
            elif current is not None:
                current.append(token)
            else:
                groups.append([] if token == "1" else [token])
        return groups

    def rearrange(tensor, pattern, **sizes):
        lhs, rhs = (parse(side) for side in pattern.split("->"))
        known = dict(sizes)
        for group, dim in zip(lhs, tensor.shape, strict=True):
            unknown = [a for a in group if a not in known]
            if unknown:
                known[unknown[0]] = dim // math.prod(known[a] for a in group if a in known)
        flat = [a for group in lhs for a in group]
        out_axes = [a for group in rhs for a in group]
        tensor = tensor.reshape([known[a] for a in flat]).permute([flat.index(a) for a in out_axes])
        return tensor.reshape([math.prod(known[a] for a in group) for group in rhs])

    def repeat(tensor, pattern, **sizes):
        lhs, rhs = (parse(side) for side in pattern.split("->"))
        assert all(len(g) <= 1 for g in lhs + rhs), "mini einops: repeat with groups is not needed here"
        old = [g[0] for g in lhs]
        for axis in [g[0] for g in rhs if g[0] not in old]:
            tensor, old = tensor.unsqueeze(0), [axis, *old]
        tensor = tensor.permute([old.index(g[0]) for g in rhs])
        return tensor.expand([sizes.get(g[0], -1) for g in rhs]).contiguous()

    module = types.ModuleType("einops")
    module.rearrange, module.repeat = rearrange, repeat
    return module


def _find_wheel() -> Path:
    for directory in WHEEL_DIRS:
        matches = sorted(directory.glob(f"*/{WHEEL_NAME}")) + sorted(directory.glob(WHEEL_NAME))
        if matches:
            return matches[0]
    pytest.fail(f"mamba_ssm wheel {WHEEL_NAME} not found under {[str(d) for d in WHEEL_DIRS]} (looked in */)")


@pytest.fixture
def mamba_ssm_cpu(tmp_path, monkeypatch):
    """Import mamba_ssm's Mamba and selective_scan_interface from the wheel with CUDA-only modules stubbed."""
    wheel = _find_wheel()
    with zipfile.ZipFile(wheel) as archive:
        for name in WHEEL_FILES:
            archive.extract(name, tmp_path)
    (tmp_path / "mamba_ssm" / "__init__.py").write_text("")
    triton = types.ModuleType("mamba_ssm.ops.triton")
    triton.__path__ = []
    layer_norm = types.ModuleType("mamba_ssm.ops.triton.layer_norm")
    layer_norm._layer_norm_fwd = None  # the only name selective_scan_interface imports unconditionally
    stubs = {
        "selective_scan_cuda": types.ModuleType("selective_scan_cuda"),
        "causal_conv1d": None,  # None in sys.modules makes `import causal_conv1d` raise ImportError
        "mamba_ssm.ops.triton": triton,
        "mamba_ssm.ops.triton.layer_norm": layer_norm,
        "mamba_ssm.ops.triton.selective_state_update": None,
    }
    try:
        importlib.import_module("einops")
    except ImportError:
        stubs["einops"] = _mini_einops()
    before = set(sys.modules)
    for key in [k for k in sys.modules if k == "mamba_ssm" or k.startswith("mamba_ssm.")]:
        monkeypatch.delitem(sys.modules, key)
    for key, module in stubs.items():
        monkeypatch.setitem(sys.modules, key, module)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    simple = importlib.import_module("mamba_ssm.modules.mamba_simple")
    ssi = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    assert Path(simple.__file__).is_relative_to(tmp_path)
    yield types.SimpleNamespace(Mamba=simple.Mamba, simple=simple, ssi=ssi)
    # Leave no fake mamba_ssm behind: later tests must see "mamba_ssm is not installed" again.
    for key in set(sys.modules) - before:
        if key == "mamba_ssm" or key.startswith("mamba_ssm.") or key == "einops":
            del sys.modules[key]


@pytest.mark.parametrize(("d_model", "d_state", "d_conv", "expand"), [(40, 16, 4, 2), (24, 8, 3, 1)])
def test_state_dict_keys_and_shapes_equal_mamba_ssm(mamba_ssm_cpu, d_model, d_state, d_conv, expand):
    theirs = mamba_ssm_cpu.Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand)
    ours = MambaReference(d_model, d_state=d_state, d_conv=d_conv, expand=expand)
    their_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert list(our_shapes) == list(their_shapes)
    assert our_shapes == their_shapes
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)


def test_same_seed_gives_the_same_initial_weights_as_mamba_ssm(mamba_ssm_cpu):
    torch.manual_seed(3)
    theirs = mamba_ssm_cpu.Mamba(32)
    torch.manual_seed(3)
    ours = MambaReference(32)
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=0, msg=key)


def _torch_causal_conv1d_fn(x, weight, bias=None, activation=None):
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=weight.shape[-1] - 1, groups=x.shape[1])[..., : x.shape[-1]]
    return F.silu(out) if activation in ("silu", "swish") else out


def test_forward_matches_mamba_ssm_forward(mamba_ssm_cpu, monkeypatch):
    """Their Mamba.forward (slow path with their own selective_scan_ref) == ours, on the same weights."""
    monkeypatch.setattr(mamba_ssm_cpu.simple, "selective_scan_fn", mamba_ssm_cpu.ssi.selective_scan_ref)
    torch.manual_seed(0)
    theirs = mamba_ssm_cpu.Mamba(32, d_state=8)
    ours = MambaReference(32, d_state=8, chunk_size=16)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 50, 32)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("has_causal_conv1d", [False, True])
def test_fused_path_feeds_the_kernels_our_parameters(mamba_ssm_cpu, monkeypatch, has_causal_conv1d):
    """The argument wiring of bimamba's fused path, run through mamba_ssm's own pure-PyTorch references."""
    ssi = mamba_ssm_cpu.ssi
    monkeypatch.setattr(ssi, "causal_conv1d_fn", _torch_causal_conv1d_fn)
    monkeypatch.setattr(ssi, "selective_scan_fn", ssi.selective_scan_ref)  # used inside mamba_inner_ref
    kernels = bimamba._MambaKernels(ssi.mamba_inner_ref, ssi.selective_scan_ref, has_causal_conv1d)
    monkeypatch.setattr(bimamba, "_mamba_kernels", lambda: kernels)
    torch.manual_seed(0)
    mixer = MambaReference(32, d_state=8, chunk_size=16)
    x = torch.randn(2, 40, 32)
    torch.testing.assert_close(bimamba.fused_mamba_forward(mixer, x), mixer(x), rtol=1e-5, atol=1e-5)
