"""Float64 oracles of the trajectory-matching ops (REFERENCE.md 5.2; MTT Eq. 2, TESLA's running
gradient sum), and the eager compositions the benchmark compares against. Differentiable
(plain autograd)."""
import torch


def param_distance(theta, target, start):
    """‖θ − θ*‖² / ‖θ_0 − θ*‖² over the last dim, in float64 ([P] -> 0-dim, [K, P] -> [K])."""
    t = target.double()
    return (theta.double() - t).pow(2).sum(-1) / (start.double() - t).pow(2).sum(-1)


def param_distance_eager(theta, target, start):
    """The trajectory code's eager formula (MTT's ``param_loss / param_dist``), in the inputs'
    dtype: the baseline of the fused op."""
    return (theta - target).pow(2).sum(-1) / (start - target).pow(2).sum(-1)


def sgd_step_accumulate(theta, grad, lr, grad_sum):
    """(θ − lr·g, G + g) in float64."""
    g = grad.double()
    return theta.double() - lr.double() * g, grad_sum.double() + g


def sgd_step_accumulate_eager(theta, grad, lr, grad_sum):
    """The eager composition in the inputs' dtype: the baseline of the fused op."""
    return theta - lr * grad, grad_sum + grad
