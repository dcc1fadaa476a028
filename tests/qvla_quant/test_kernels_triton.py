"""The Triton kernels of PackedLinear (`qvla_quant.kernels.triton_kernels`) against the exact output of the layer.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1), which must be set before triton wraps
a kernel and which makes every later Triton user in the process interpret too: so the interpreted cases run in a
child process (this file run as a script, `--cases`), once per session, and each case is one test here reading its
result. With CUDA the same cases (plus bf16 inputs) run natively, in process (`@pytest.mark.gpu`).

Tolerances: fp32 inputs accumulate in fp32 from exact (q - z) or fp32 weights, so max |y - ref| <= 1e-5 max |ref|
(the reference path's own test bound; measured ~2e-7). fp16 / bf16 inputs: the elementwise bound of
`kernels.reference.error_bound` at that dtype's unit roundoff (weights of grouped rows and the output are rounded
to it once; measured ~3e-4 of max |ref| in fp16). Shapes stay small (K <= 300): the interpreter runs each program
instance in ~ms.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
FP32_REL = 1e-5
ALL_BITS = (0, 2, 3, 4, 6, 8, 16)

# (name, out, k, bits, tokens, dtype, options): bits an int (uniform) or "mixed" (all kinds incl. pruned);
# options: group_size (grouped 2/3/4-bit rows, every other one), split_k (forced), no_bias, stored_only, shape3d
CASES = [
    *[(f"uniform{b}-m{m}", 37, 67, b, m, "float32", {}) for b in (8, 6, 4, 3, 2, 16) for m in (1, 20)],
    *[(f"mixed-m{m}-{dt}", 40, 100, "mixed", m, dt, {}) for m in (1, 3, 20) for dt in ("float32", "float16")],
    *[(f"grouped-m{m}-{dt}", 33, 130, "mixed", m, dt, {"group_size": 64}) for m in (1, 20)
      for dt in ("float32", "float16")],
    ("splitk3-m2", 48, 256, "mixed", 2, "float32", {"split_k": 3}),
    ("splitk2-grouped-m7", 24, 300, "mixed", 7, "float16", {"split_k": 2, "group_size": 128}),
    ("all-pruned-m1", 12, 40, 0, 1, "float32", {}),
    ("all-pruned-m20", 12, 40, 0, 20, "float32", {"no_bias": True}),
    ("no-bias-m5", 29, 90, "mixed", 5, "float32", {"no_bias": True}),
    ("stored-only-m6", 31, 70, "mixed", 6, "float32", {"stored_only": True}),
    ("zero-tokens", 16, 32, "mixed", 0, "float32", {}),
    ("3d-input", 21, 48, "mixed", 6, "float32", {"shape3d": True}),
]  # fmt: skip
GPU_EXTRA = [
    (f"bf16-{name}", out, k, bits, m, "bfloat16", opts) for name, out, k, bits, m, dt, opts in CASES if dt == "float16"
]


def _layer(out, k, bits, opts, seed):
    from qvla_quant.config import QuantConfig, WeightQuantConfig
    from qvla_quant.packed import PackedLinear

    torch.manual_seed(seed)
    lin = nn.Linear(k, out, bias=not opts.get("no_bias"))
    if bits == "mixed":
        g = torch.Generator().manual_seed(seed)
        row_bits = torch.tensor(ALL_BITS)[torch.randint(0, len(ALL_BITS), (out,), generator=g)]
    else:
        row_bits = torch.full((out,), bits)
    grouped, gs = None, opts.get("group_size")
    if gs:
        grouped = ((row_bits == 2) | (row_bits == 3) | (row_bits == 4)) & (torch.arange(out) % 2 == 0)
    config = QuantConfig(weight=WeightQuantConfig(clip_search=False))
    return PackedLinear.from_float(lin, row_bits, config, group_size=gs, grouped=grouped)


def run_case(case, device: str) -> dict:
    """Run one case through the Triton path on `device`; returns its errors (JSON-able)."""
    from qvla_quant.kernels import triton_kernels
    from qvla_quant.kernels.reference import UNIT_ROUNDOFF, error_bound, max_relative_error, reference_output

    name, out, k, bits, m, dtype, opts = case
    dtype = getattr(torch, dtype)
    layer = _layer(out, k, bits, opts, seed=len(name)).to(device)
    layer.kernels = "triton"
    shape = (2, m // 2, k) if opts.get("shape3d") else (m, k)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    with torch.no_grad():
        lay = layer._kernel_layout("triton", x.device)
        lay.split_k = opts.get("split_k")
        if opts.get("stored_only"):
            y = layer._linear_stored(x)
            layer.kernels = "reference"
            ref = layer._linear_stored(x.float()).double()
            layer.kernels = "triton"
        else:
            y = layer(x)
            ref = reference_output(layer, x.float())
    result = {"name": name, "dtype_ok": y.dtype == dtype, "shape": list(y.shape), "want_shape": list(ref.shape),
              "rel": max_relative_error(y.float(), ref), "layout_bytes": lay.nbytes()}  # fmt: skip
    if dtype != torch.float32 and not opts.get("stored_only"):
        bound = error_bound(layer, x.float(), u=UNIT_ROUNDOFF[dtype], out_dtype=dtype)
        result["bound_excess"] = ((y.double() - ref).abs() - bound).max().item() if y.numel() else 0.0
    assert triton_kernels.available(check_device=False)
    return result


def check_result(r: dict, dtype: str) -> None:
    assert r["dtype_ok"], f"{r['name']}: output dtype changed"
    assert r["shape"] == r["want_shape"], f"{r['name']}: shape {r['shape']} != {r['want_shape']}"
    if dtype == "float32":
        assert r["rel"] <= FP32_REL, f"{r['name']}: max relative error {r['rel']:.3g} > {FP32_REL}"
    else:
        assert r.get("bound_excess", 0.0) <= 0, f"{r['name']}: above the {dtype} error bound by {r['bound_excess']}"
        assert r["rel"] <= 1e-2, f"{r['name']}: max relative error {r['rel']:.3g}"


# ---- interpreted (CPU) runs, in a child process


# Triton lives outside the venv's path (requirements/triton-interpreter.txt says why): only this child sees it.
TRITON_DIR = Path(sys.prefix) / "triton-interpreter"


def _child_env(interpret: bool) -> dict[str, str]:
    paths = [str(REPO / "src"), *([str(TRITON_DIR)] if TRITON_DIR.is_dir() else []),
             *filter(None, [os.environ.get("PYTHONPATH")])]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env.pop("QVLA_KERNELS", None)
    return env


def _triton_missing() -> str | None:
    """Why the kernels cannot run here (None: they can): asked in a child with the interpreter's path."""
    code = ("from qvla_quant.kernels import triton_kernels as t\n"
            "print(t.unavailable_reason(check_device=False) or '')")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], env=_child_env(interpret=True), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    if proc.returncode != 0:
        return f"the availability check failed: {proc.stderr[-500:]}"
    return proc.stdout.strip() or None


@pytest.fixture(scope="module")
def interpreted_results():
    reason = _triton_missing()
    if reason:
        pytest.skip(f"triton kernels not testable: {reason} (make setup installs triton into {TRITON_DIR})")
    proc = subprocess.run([sys.executable, __file__, "--cases"], env=_child_env(interpret=True),
                          capture_output=True, text=True, timeout=600, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return {r["name"]: r for r in map(json.loads, lines)}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_interpreted(case, interpreted_results):
    assert case[0] in interpreted_results, f"{case[0]} did not run"
    check_result(interpreted_results[case[0]], case[5])


def test_import_without_triton_is_harmless():
    # the module imports and answers without importing triton itself
    code = ("import sys; sys.modules['triton'] = None\n"
            "from qvla_quant.kernels import triton_kernels as t, select\n"
            "print(t.available(), t.unavailable_reason() is not None)")  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "True"]


# ---- native runs on CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES + GPU_EXTRA, ids=[c[0] for c in CASES + GPU_EXTRA])
def test_cuda(case):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    reason = _triton_missing()
    if reason:
        pytest.skip(reason)
    check_result(run_case(case, "cuda"), case[5])


@pytest.mark.gpu
def test_cuda_auto_dispatch_uses_triton(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from qvla_quant import kernels
    from qvla_quant.kernels import triton_kernels

    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    layer = _layer(64, 128, "mixed", {}, seed=0).cuda()
    x = torch.randn(3, 128, device="cuda")
    assert kernels.select(layer, x) == ("triton" if triton_kernels.available() else None)
    with torch.no_grad():
        y = layer(x)
    assert y.is_cuda and layer.kernel_layout_bytes() < 4 * (layer.out_features + layer.row_index.numel())


if __name__ == "__main__":
    if sys.argv[1:] == ["--cases"]:
        assert os.environ.get("TRITON_INTERPRET") == "1"
        for c in CASES:
            print(json.dumps(run_case(c, "cpu")), flush=True)
    else:
        sys.exit(f"usage: TRITON_INTERPRET=1 {sys.argv[0]} --cases")
