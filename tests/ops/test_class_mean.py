"""class_mean / class_moments (CPU kernel) against the float64 oracle in
python/reference/class_mean.py."""
import pytest
import torch

import pydistill_ext as pde
from reference import class_mean as ref

OP = torch.ops.pydistill_ext.class_mean_forward
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# atol relative to max|x| of the (rounded) input. The oracle runs in float64 on the same
# rounded inputs, so the error is the kernel's accumulation (float32 for float32 / half /
# bfloat16) plus the rounding of the output to the input dtype (bf16: 2^-8, fp16: 2^-11).
TOL = {torch.float64: 1e-13, torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _inputs(n, d, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) * 3 + 1).to(dtype)
    y = torch.randint(0, max(k, 1), (n,), generator=g)
    return x, y


def _close(got, want, dtype, scale):
    assert got.dtype == dtype and got.shape == want.shape
    err = (got.double() - want).abs().max().item() if want.numel() else 0.0
    assert err <= TOL[dtype] * max(scale, 1e-30), f"error {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d,k", [(97, 301, 7), (256, 2048, 10), (33, 1, 4), (5, 17, 1)])
def test_matches_oracle(dtype, n, d, k):
    x, y = _inputs(n, d, k, dtype)
    scale = x.double().abs().max().item()
    _close(pde.class_mean(x, y, k), ref.class_mean(x, y, k), dtype, scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradient_matches_oracle(dtype):
    x, y = _inputs(61, 37, 5, dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    go = torch.randn(5, 37, generator=g, dtype=torch.float64)
    a = x.clone().requires_grad_()
    pde.class_mean(a, y, 5).backward(go.to(dtype))
    b = x.double().requires_grad_()
    ref.class_mean(b, y, 5).backward(go)
    _close(a.grad, b.grad, dtype, go.abs().max().item())


def test_empty_class_is_zero_and_gets_no_gradient():
    x, _ = _inputs(12, 6, 5, torch.float32)
    y = torch.tensor([0, 2, 2, 4, 0, 0, 2, 4, 4, 4, 0, 2])  # classes 1 and 3 empty
    x.requires_grad_()
    out = pde.class_mean(x, y, 5)
    assert torch.equal(out[1], torch.zeros(6)) and torch.equal(out[3], torch.zeros(6))
    torch.testing.assert_close(out[2], x[y == 2].mean(0))
    out.sum().backward()
    # each row's gradient is 1 / count of its class
    counts = torch.bincount(y, minlength=5).float()
    torch.testing.assert_close(x.grad, (1 / counts[y]).unsqueeze(1).expand(12, 6))


def test_all_same_label_and_one_class():
    x, _ = _inputs(20, 9, 1, torch.float64)
    y = torch.full((20,), 3)
    out = pde.class_mean(x, y, 4)
    torch.testing.assert_close(out[3], x.mean(0), rtol=1e-14, atol=1e-14)
    assert torch.equal(out[:3], torch.zeros(3, 9, dtype=torch.float64))
    torch.testing.assert_close(pde.class_mean(x, torch.zeros(20, dtype=torch.long), 1),
                               x.mean(0, keepdim=True), rtol=1e-14, atol=1e-14)


def test_zero_rows_and_zero_classes():
    x = torch.zeros(0, 5)
    y = torch.zeros(0, dtype=torch.long)
    out = pde.class_mean(x, y, 3)
    assert out.shape == (3, 5) and torch.equal(out, torch.zeros(3, 5))
    assert pde.class_mean(x, y, 0).shape == (0, 5)
    a = torch.zeros(0, 5, requires_grad=True)
    pde.class_mean(a, y, 3).sum().backward()
    assert a.grad.shape == (0, 5)
    m, v = pde.class_moments(x, y, 2)
    assert torch.equal(m, torch.zeros(2, 5)) and torch.equal(v, torch.zeros(2, 5))


def test_deterministic_across_thread_counts():
    x, y = _inputs(513, 1030, 7, torch.float32, seed=5)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = pde.class_mean(x, y, 7)
        torch.set_num_threads(max(old, 2))
        many = pde.class_mean(x, y, 7)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, many)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_class_moments_matches_oracle(dtype):
    x, y = _inputs(90, 23, 6, dtype, seed=7)
    y[y == 4] = 5  # class 4 empty
    m, v = pde.class_moments(x, y, 6)
    wm, wv = ref.class_moments(x, y, 6)
    scale = x.double().abs().max().item()
    _close(m, wm, dtype, scale)
    _close(v, wv, dtype, scale * scale)
    assert torch.equal(v[4].double(), torch.zeros(23, dtype=torch.float64))


def test_gradcheck():
    x, y = _inputs(14, 5, 4, torch.float64, seed=2)
    y[y == 1] = 0  # an empty class
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda a: pde.class_mean(a, y, 4), (x,))
    assert torch.autograd.gradcheck(lambda a: pde.class_moments(a, y, 4), (x,))


def test_opcheck():
    x, y = _inputs(19, 11, 4, torch.float32)
    for req in (False, True):
        torch.library.opcheck(OP.default, (x.clone().requires_grad_(req), y, 4))
    torch.library.opcheck(OP.default, (x[:0], y[:0], 3))


def test_torch_compile_fullgraph():
    x, y = _inputs(40, 16, 5, torch.float32)

    def f(a, lab):
        return (pde.class_mean(a, lab, 5) * 2.0).pow(2).sum()

    cf = torch.compile(f, fullgraph=True, backend="inductor")
    a1, a2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out1, out2 = cf(a1, y), f(a2, y)
    torch.testing.assert_close(out1, out2)
    out1.backward()
    out2.backward()
    torch.testing.assert_close(a1.grad, a2.grad)


def test_bad_inputs():
    x, y = _inputs(8, 4, 3, torch.float32)
    with pytest.raises(ValueError, match="features must be \\[N, D\\]"):
        pde.class_mean(x[0], y, 3)
    with pytest.raises(ValueError, match="features must be float"):
        pde.class_mean(x.long(), y, 3)
    with pytest.raises(ValueError, match="labels must be an int64"):
        pde.class_mean(x, y.int(), 3)
    with pytest.raises(ValueError, match="labels must be \\[N\\]"):
        pde.class_mean(x, y[:5], 3)
    with pytest.raises(ValueError, match="num_classes must be >= 0"):
        pde.class_mean(x, y, -1)
    with pytest.raises(TypeError, match="num_classes must be an int"):
        pde.class_mean(x, y, 3.0)
    with pytest.raises(ValueError, match="labels is on meta"):
        pde.class_mean(x, y.to("meta"), 3)
    bad = y.clone()
    bad[5] = 3
    with pytest.raises(RuntimeError, match=r"labels\[5\] = 3 is out of range for num_classes = 3"):
        pde.class_mean(x, bad, 3)
    bad[5] = -1
    with pytest.raises(RuntimeError, match=r"labels\[5\] = -1 is out of range"):
        pde.class_mean(x, bad, 3)
    with pytest.raises(RuntimeError, match="out of range for num_classes = 0"):
        pde.class_mean(x, y, 0)


def test_native_op_checks_its_arguments():
    x, y = _inputs(8, 4, 3, torch.float32)
    with pytest.raises(RuntimeError, match="features must be \\[N, D\\]"):
        OP(x[0], y, 3)
    with pytest.raises(RuntimeError, match="labels must be int64"):
        OP(x, y.int(), 3)
    with pytest.raises(RuntimeError, match="labels must be \\[N\\]"):
        OP(x, y[:3], 3)
    with pytest.raises(RuntimeError, match="num_classes must be >= 0"):
        OP(x, y, -2)
    with pytest.raises(RuntimeError, match="features must be float64"):
        OP(x.int(), y, 3)
