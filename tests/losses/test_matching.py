"""pydistill_ext.losses.matching against the float64 loop-over-classes oracles in
python/reference/matching_eager.py."""
import pytest
import torch

import pydistill_ext.losses as L
from pydistill_ext.losses.matching import (AttentionMatchLoss, DMLoss, MMDLoss,
                                           attention_match_loss, dm_loss, mmd)
from reference import matching_eager as ref


def _emb(n, d, k, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64).mul(2).add(0.5).to(dtype), \
        torch.randint(0, k, (n,), generator=g)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_dm_loss_matches_oracle_and_grad(dtype, tol):
    er, yr = _emb(60, 33, 5, 0, dtype)
    es, ys = _emb(17, 33, 5, 1, dtype)
    er.requires_grad_(True)
    es.requires_grad_(True)
    got = dm_loss(er, yr, es, ys, 5)
    want = ref.dm_loss(er, yr, es, ys, 5)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    ga = torch.autograd.grad(got, (er, es))
    gb = torch.autograd.grad(want, (er, es))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)
    # closed form: d/d syn_j = (2/|S_c|)(mu_syn - mu_real)
    c = int(ys[0])
    closed = 2.0 / (ys == c).sum() * (es[ys == c].mean(0) - er[yr == c].mean(0))
    torch.testing.assert_close(ga[1][0].double(), closed.detach().double(), rtol=tol, atol=tol)
    assert DMLoss(5)(er, yr, es, ys).item() == pytest.approx(got.item(), rel=1e-6)


def test_dm_loss_absent_class_contributes_zero():
    er, yr = _emb(40, 8, 4, 2)
    es, ys = _emb(12, 8, 4, 3)
    yr = torch.where(yr == 3, torch.zeros_like(yr), yr)   # class 3 absent on the real side
    assert bool((ys == 3).any())
    es.requires_grad_(True)
    got = dm_loss(er, yr, es, ys, 4)
    torch.testing.assert_close(got.double(), ref.dm_loss(er, yr, es, ys, 4), rtol=2e-5, atol=2e-5)
    got.backward()
    assert torch.all(es.grad[ys == 3] == 0) and es.grad[ys != 3].abs().sum() > 0
    # the unmasked difference of class means would charge ||mu_syn,3||^2
    mu3 = es[ys == 3].mean(0).detach()
    naive = sum(((er[yr == c].mean(0) if (yr == c).any() else torch.zeros(8))
                 - es[ys == c].mean(0)).pow(2).sum() for c in range(4))
    assert float((naive - got).detach()) == pytest.approx(float(mu3.pow(2).sum()), rel=1e-4)


def test_dm_loss_zero_for_identical_sets():
    er, yr = _emb(30, 6, 3, 4)
    assert dm_loss(er, yr, er.clone(), yr.clone(), 3).item() == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_mmd_matches_pairwise_oracle(kernel):
    x, _ = _emb(9, 4, 1, 5, torch.float64)
    y, _ = _emb(7, 4, 1, 6, torch.float64)
    y = y + 0.7
    sig = (0.5, 2.0, 5.0)
    got = mmd(x, y, kernel, sigmas=sig)
    torch.testing.assert_close(got, ref.mmd(x, y, kernel, sig), rtol=1e-10, atol=1e-12)
    assert got.item() > 0
    assert MMDLoss(kernel, sig)(x, y).item() == pytest.approx(got.item(), rel=1e-12)
    assert mmd(x, x.clone(), kernel, sigmas=sig).item() == pytest.approx(0.0, abs=1e-10)


def test_mmd_rbf_detects_variance_difference_linear_does_not():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(200, 2, generator=g, dtype=torch.float64)
    y = 3.0 * torch.randn(200, 2, generator=g, dtype=torch.float64)
    x, y = x - x.mean(0), y - y.mean(0)     # equal means exactly
    assert mmd(x, y, "linear").item() < 1e-20
    assert mmd(x, y, "rbf").item() > 0.05


def test_mmd_rejects_bad_args():
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match="kernel"):
        mmd(x, x, "poly")
    with pytest.raises(ValueError, match="sigmas"):
        mmd(x, x, "rbf", sigmas=(0.0,))
    with pytest.raises(ValueError):
        mmd(x, torch.randn(3, 5))


@pytest.mark.parametrize("p", [1.0, 4.0])
def test_attention_match_matches_oracle(p):
    g = torch.Generator().manual_seed(8)
    shapes = [(8, 6, 6), (8, 3, 3)]
    maps_r = [torch.randn(20, *s, generator=g, dtype=torch.float64) for s in shapes]
    maps_s = [torch.randn(6, *s, generator=g, dtype=torch.float64).requires_grad_(True)
              for s in shapes]
    yr = torch.arange(20) % 3
    ys = torch.tensor([0, 0, 1, 1, 2, 2])
    got = attention_match_loss(maps_r, yr, maps_s, ys, 3, p=p)
    want = ref.attention_match_loss(maps_r, yr, maps_s, ys, 3, p)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    ga = torch.autograd.grad(got, maps_s)
    gb = torch.autograd.grad(want, maps_s)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    mod = AttentionMatchLoss(3, p=p)
    assert mod(maps_r, yr, maps_s, ys).item() == pytest.approx(got.item(), rel=1e-12)
    # p matters: the two exponents give different losses
    other = attention_match_loss(maps_r, yr, maps_s, ys, 3, p=2.0)
    assert abs(other.item() - got.item()) > 1e-6


def test_attention_match_rejects_mismatched_layers():
    a = [torch.randn(2, 3, 4, 4)]
    with pytest.raises(ValueError):
        attention_match_loss(a, torch.zeros(2, dtype=torch.long), [], torch.zeros(0, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="shapes"):
        attention_match_loss(a, torch.zeros(2, dtype=torch.long), [torch.randn(2, 3, 5, 5)],
                             torch.zeros(2, dtype=torch.long), 1)


def test_reexported_from_losses_package():
    for name in ("dm_loss", "mmd", "attention_match_loss", "DMLoss", "MMDLoss",
                 "AttentionMatchLoss"):
        assert getattr(L, name) is getattr(__import__("pydistill_ext.losses.matching",
                                                      fromlist=[name]), name)
