"""Checks shared by the tests of every directory (ops, cuda, ...)."""
import pytest
import torch


def _compiled_matches_eager(f, x):
    """torch.compile(f, fullgraph=True) gives f's value and input gradient at x."""
    cf = torch.compile(f, fullgraph=True, backend="inductor")
    a1, a2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out1, out2 = cf(a1), f(a2)
    torch.testing.assert_close(out1, out2)
    out1.backward()
    out2.backward()
    torch.testing.assert_close(a1.grad, a2.grad)


@pytest.fixture
def compiled_matches_eager():
    return _compiled_matches_eager
