"""pydistill_ext.chunked: row-chunked gradients equal the whole batch's (float64)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pydistill_ext.chunked import chunked_backward, chunked_grad


def _net_and_batch(n=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=g)
    return net, x, y


def _whole(net, x, y):
    net.zero_grad(set_to_none=True)
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("chunk", [None, 1, 4, 5, 13, 100])
def test_chunked_grad_and_backward_equal_the_whole_batch(chunk):
    net, x, y = _net_and_batch()
    loss_ref, grads_ref = _whole(net, x, y)

    net.zero_grad(set_to_none=True)
    grads = chunked_grad(net, x, y, F.cross_entropy, net.parameters(), chunk)
    assert all(p.grad is None for p in net.parameters())      # .grad untouched
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)

    loss = chunked_backward(net, x, y, F.cross_entropy, chunk)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-14)
    assert not loss.requires_grad
    for p, b in zip(net.parameters(), grads_ref):
        torch.testing.assert_close(p.grad, b, rtol=1e-12, atol=1e-14)


def test_chunked_backward_accumulates_into_existing_grads():
    """Like ``loss.backward()``, it adds to ``.grad`` (the caller zeroes between steps)."""
    net, x, y = _net_and_batch(seed=1)
    _, grads_ref = _whole(net, x, y)
    chunked_backward(net, x, y, F.cross_entropy, 3)          # .grad already holds one copy
    for p, b in zip(net.parameters(), grads_ref):
        torch.testing.assert_close(p.grad, 2 * b, rtol=1e-12, atol=1e-14)


def test_chunks_of_a_batchnorm_net_are_not_the_whole_batch():
    """Why callers refuse BatchNorm: its batch statistics couple rows, so pieces differ."""
    net, x, y = _net_and_batch(n=12, seed=2)
    net.insert(1, nn.BatchNorm1d(8).double())
    net.train()
    whole = chunked_grad(net, x, y, F.cross_entropy, net.parameters(), None)
    pieces = chunked_grad(net, x, y, F.cross_entropy, net.parameters(), 4)
    assert max(float((a - b).abs().max()) for a, b in zip(whole, pieces)) > 1e-6
