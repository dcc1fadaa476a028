"""The CPU fast path of PackedLinear (`qvla_quant.kernels.cpu`) against the exact output of the packed layer.

Tolerances. The path rounds activations and partial outputs to bf16 (unit roundoff u = 2^-8), so each output is
checked against the elementwise bound of `kernels.reference.error_bound` (u |y| + 2u sum |x||w| + the grouped
rows' bf16 scales + fp32 summation), and the figure users see, max |y - ref| / max |ref|, against REL_TOL = 1e-2.
Measured here: up to 5.1e-3 (the output rounding, <= u = 3.9e-3 of |y|, dominates), |error| / bound <= 0.55.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qvla_quant import kernels
from qvla_quant.config import ActivationQuantConfig, QuantConfig, WeightQuantConfig
from qvla_quant.kernels import cpu
from qvla_quant.kernels.reference import error_bound, max_relative_error, reference_output
from qvla_quant.packed import PackedLinear
from qvla_quant.transforms import set_kernels

pytestmark = pytest.mark.skipif(not cpu.has_ops(), reason=f"torch {torch.__version__} lacks the CPU low-bit ops")

CONFIG = QuantConfig(weight=WeightQuantConfig(clip_search=False))
REL_TOL = 1e-2  # max |y - ref| / max |ref|; measured <= 5.1e-3 (see the module docstring)
ALL_BITS = (0, 2, 3, 4, 6, 8, 16)


def make_layer(out, k, bits, *, seed=0, bias=True, group_size=None, grouped=None, config=CONFIG, dtype=None):
    torch.manual_seed(seed)
    lin = nn.Linear(k, out, bias=bias)
    if dtype is not None:
        lin = lin.to(dtype)
    if isinstance(bits, int):
        bits = torch.full((out,), bits)
    layer = PackedLinear.from_float(lin, bits, config, group_size=group_size, grouped=grouped)
    layer.kernels = "cpu"
    return layer


def random_bits(out, seed, choices=ALL_BITS):
    g = torch.Generator().manual_seed(seed)
    return torch.tensor(choices)[torch.randint(0, len(choices), (out,), generator=g)]


def check(layer, x, rel=REL_TOL):
    """Fast path output: dtype, shape, elementwise bound and the relative error; returns the relative error."""
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], layer.out_features)
    ref = reference_output(layer, x.float())
    bound = error_bound(layer, x.float(), out_dtype=x.dtype)
    excess = ((y.double() - ref).abs() - bound).max().item() if y.numel() else 0.0
    assert excess <= 0, f"error above the bound by {excess:.3g}"
    err = max_relative_error(y, ref)
    assert err <= rel, f"max relative error {err:.3g} > {rel}"
    return err


# ---- every row kind, odd K, few and many tokens


SHAPES = [(37, 67), (48, 100), (32, 128), (16, 5), (50, 257)]


@pytest.mark.parametrize("bits", [8, 6, 4, 3, 2, 16])
@pytest.mark.parametrize("out,k", SHAPES)
def test_uniform_layers(bits, out, k):
    layer = make_layer(out, k, bits)
    # all kernels; int8 dequantized, int4 on its kernel; every family dequantized
    for m in (1, 3, cpu.INT8_KERNEL_MAX_TOKENS + 1, cpu.INT4_KERNEL_MAX_TOKENS + 1):
        check(layer, torch.randn(m, k))


@pytest.mark.parametrize("out,k", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_mixed_rows_with_pruned(out, k, seed):
    layer = make_layer(out, k, random_bits(out, seed), seed=seed)
    assert layer.group_sizes()[0] > 0  # pruned rows present
    for m in (1, 2, 4, 9, cpu.INT8_KERNEL_MAX_TOKENS + 8, cpu.INT4_KERNEL_MAX_TOKENS + 5):
        check(layer, torch.randn(m, k))


@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize("out,k", [(40, 67), (33, 200), (24, 256), (20, 300)])
def test_grouped_rows(group_size, out, k):
    # grouped 2/3/4-bit rows beside per-row ones of every width; K not a multiple of the group size but one
    bits = random_bits(out, 3)
    grouped = (bits == 2) | (bits == 3) | (bits == 4)
    grouped &= torch.arange(out) % 2 == 0
    layer = make_layer(out, k, bits, group_size=group_size, grouped=grouped)
    assert any(c.grouped and n for c, n in layer.storage_groups())
    for m in (1, 3, 17, cpu.GROUPED_KERNEL_MAX_TOKENS + 6):  # kernel, kernel in the GEMM path, fp32 dequantization
        check(layer, torch.randn(m, k))


def test_all_pruned_layer_outputs_the_bias():
    layer = make_layer(12, 40, 0)
    x = torch.randn(3, 40)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.bias.expand(3, -1))
        assert torch.equal(layer(torch.randn(6, 40)), layer.bias.expand(6, -1))
    nobias = make_layer(12, 40, 0, bias=False)
    with torch.no_grad():
        assert torch.equal(nobias(x), torch.zeros(3, 12))


@pytest.mark.parametrize("bias", [True, False])
def test_no_bias_and_3d_inputs(bias):
    layer = make_layer(30, 72, random_bits(30, 5), bias=bias)
    check(layer, torch.randn(2, 3, 72))
    check(layer, torch.randn(4, 5, 72))
    check(layer, torch.randn(72))


def test_zero_tokens():
    layer = make_layer(20, 48, random_bits(20, 1))
    with torch.no_grad():
        y = layer(torch.randn(0, 48))
    assert y.shape == (0, 20) and y.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_inputs_keep_their_dtype(dtype):
    layer = make_layer(36, 96, random_bits(36, 2))
    for m in (1, 8):
        check(layer, torch.randn(m, 96).to(dtype))


def test_fp16_model_kept_rows():
    # an fp16 model keeps fp16 rows: the path uses a bf16 copy of them (counted in kernel_layout_bytes)
    layer = make_layer(24, 64, random_bits(24, 4), dtype=torch.float16)
    assert layer.kept.dtype == torch.float16 and layer.kept.shape[0] > 0
    check(layer, torch.randn(2, 64).to(torch.float16))
    assert layer.kernel_layout_bytes() >= layer.kept.numel() * 2


def test_offset_columns_keep_positive_activations_exact():
    """8-bit rows whose zero point is far from the int8 centre (an asymmetric range: z ~ 85, c = 128) under all-
    positive activations (after a GELU): the kernel must see the -S columns. Applying the offset (z - c) S in fp32
    after the kernel instead would subtract two numbers ~30x larger than the result after bf16 rounded one of them."""
    torch.manual_seed(0)
    lin = nn.Linear(512, 32)
    with torch.no_grad():
        lin.weight.normal_().clamp_(-3.0, 3.0)
        lin.weight[:, 0] = 6.0  # range [-3, 6]: s = 9 / 255, z = 85
        lin.weight[:, 1] = -3.0
    layer = PackedLinear.from_float(lin, torch.full((32,), 8), CONFIG)
    layer.kernels = "cpu"
    x = F.gelu(torch.randn(2, 512)) + 0.5  # mean ~0.9: S ~ 460
    err = check(layer, x)
    lay = layer._kernel_layout("cpu", x.device)
    assert lay.offset8 and int((lay.w8[:, 512].float() + 43).abs().max()) <= 1
    assert err < 4e-3
    xb = x.to(torch.bfloat16)
    centred = torch._weight_int8pack_mm(F.pad(xb, (0, lay.k8 - 512)), lay.w8[:, :], lay.ones8)  # no -S columns
    off = lay.w8[:, 512].float()
    naive = (centred.float() - off * xb.float().sum(1, keepdim=True)) * lay.col_scale + lay.bias
    assert max_relative_error(naive, reference_output(layer, x)) > 5 * err


def test_a8_layers_take_the_fast_path():
    config = QuantConfig(weight=WeightQuantConfig(clip_search=False), activation=ActivationQuantConfig(bits=8))
    layer = make_layer(28, 80, random_bits(28, 6), config=config)
    x = torch.randn(3, 80)
    with torch.no_grad():
        y = layer(x)
        layer.kernels = "reference"
        ref = layer(x)
    assert max_relative_error(y, ref) <= REL_TOL


def test_linear_stored_matches_reference_order():
    layer = make_layer(26, 70, random_bits(26, 7))
    x = torch.randn(5, 70)
    with torch.no_grad():
        fast = layer._linear_stored(x)
        layer.kernels = "reference"
        ref = layer._linear_stored(x)
    assert fast.shape == ref.shape == (5, layer.row_index.numel())
    assert max_relative_error(fast, ref) <= REL_TOL


# ---- dispatch, override and the resident layout


def test_dispatch_rules(monkeypatch):
    layer = make_layer(16, 32, 4)
    layer.kernels = None
    x = torch.randn(2, 32)
    monkeypatch.setenv(kernels.ENV_VAR, "reference")
    assert kernels.select(layer, x) is None
    monkeypatch.setenv(kernels.ENV_VAR, "cpu")
    assert kernels.select(layer, x) == "cpu"
    monkeypatch.setenv(kernels.ENV_VAR, "auto")
    assert kernels.select(layer, x) == ("cpu" if cpu.available() else None)
    monkeypatch.delenv(kernels.ENV_VAR)
    assert kernels.select(layer, x) == ("cpu" if cpu.available() else None)
    layer.kernels = "reference"  # the layer attribute wins over the environment
    monkeypatch.setenv(kernels.ENV_VAR, "cpu")
    assert kernels.select(layer, x) is None
    layer.kernels = "cpu"
    assert kernels.select(layer, x.to(torch.int32)) is None  # not a float input
    assert kernels.select(layer, x.requires_grad_()) is None  # autograd needs the reference path
    with torch.no_grad():
        assert kernels.select(layer, x) == "cpu"
    layer.cache_dequantized = True
    assert kernels.select(layer, x.detach()) is None
    layer.kernels = "bogus"
    with pytest.raises(ValueError, match="expected one of"):
        kernels.select(layer, x)


def test_gradients_still_flow_through_the_reference_path():
    layer = make_layer(10, 24, random_bits(10, 8))
    x = torch.randn(2, 24, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.kernel_layout_bytes() == 0


def test_set_kernels_sets_every_layer():
    model = nn.Sequential(make_layer(8, 16, 4), nn.ReLU(), make_layer(4, 8, 8))
    assert set_kernels(model, "reference") == 2
    assert model[0].kernels == model[2].kernels == "reference"
    set_kernels(model, None)
    assert model[0].kernels is None
    with pytest.raises(ValueError):
        set_kernels(model, "gpu")


def test_layout_is_not_saved_and_follows_the_buffers():
    a = make_layer(24, 64, random_bits(24, 9), seed=1)
    b = make_layer(24, 64, random_bits(24, 9), seed=2)
    keys = list(a.state_dict())
    x = torch.randn(2, 64)
    check(a, x)
    assert a.kernel_layout_bytes() > 0
    assert list(a.state_dict()) == keys  # nothing added to the artifact
    assert all(not name.startswith("_kernel") for name, _ in a.named_buffers())
    a.load_state_dict(b.state_dict())  # in place: same tensors, new versions -> rebuilt
    with torch.no_grad():
        assert torch.allclose(a(x), b(x))
    a.clear_kernel_layout()
    assert a.kernel_layout_bytes() == 0


def test_resident_bytes_match_the_documented_cost():
    w4 = make_layer(64, 512, 4)
    w8 = make_layer(64, 512, 8)
    x = torch.randn(1, 512)
    check(w4, x)
    check(w8, x)
    n = 64 * 512
    # 4 bits of nibbles + 32 / 256 bits of (1, 8 - z) bf16 pairs + 12 bytes per row (fp32 column scale, stored-row
    # bias and full bias)
    assert w4.kernel_layout_bytes() == n // 2 + (512 // 256) * 64 * 4 + 64 * 12
    # int8 codes with three offset columns, padded to 16 (K8 = 528), the bf16 ones vector, the same 12 bytes a row
    assert w8.kernel_layout_bytes() == 64 * 528 + 64 * 2 + 64 * 12
