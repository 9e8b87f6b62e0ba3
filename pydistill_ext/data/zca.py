"""ZCA whitening as used by the trajectory-matching papers (MTT, FTD, TESLA, DATM).

Same semantics as ``kornia.enhance.ZCAWhitening(eps=0.1, compute_inv=True)``: images are
flattened to D = C*H*W features, the covariance is ``Xc^T Xc / (N-1)`` and, with its
eigendecomposition ``cov = U diag(S) U^T``,

    W     = U diag((S + eps)^-1/2) U^T        transform(x) = (x - mu) W
    W_inv = U diag((S + eps)^+1/2) U^T        inverse(y)   = y W_inv + mu

The mean and covariance are accumulated in float64 (chunked, so memory stays at one D x D
matrix plus one chunk); the stored matrices and all outputs are float32.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ZCA"]

_CHUNK = 4096  # rows per matmul when accumulating the covariance or transforming large inputs


class ZCA:
    """A fitted ZCA whitening transform. Create it with `ZCA.fit` or `ZCA.from_state_dict`.

    Attributes: ``mean`` [D], ``W`` [D, D], ``W_inv`` [D, D] (float32), ``eigenvalues`` [D]
    (float64, ascending, the covariance spectrum S), ``eps`` and ``shape`` (the per-sample
    shape the transform was fitted on, e.g. (C, H, W)).
    """

    def __init__(self, mean: Tensor, W: Tensor, W_inv: Tensor, eigenvalues: Tensor,
                 eps: float, shape: tuple[int, ...]):
        D = mean.numel()
        if W.shape != (D, D) or W_inv.shape != (D, D) or eigenvalues.numel() != D:
            raise ValueError(f"ZCA: inconsistent shapes: mean {tuple(mean.shape)}, W {tuple(W.shape)}, "
                             f"W_inv {tuple(W_inv.shape)}, eigenvalues {tuple(eigenvalues.shape)}")
        if _prod(shape) != D:
            raise ValueError(f"ZCA: shape {tuple(shape)} does not have D={D} elements")
        self.mean = mean.reshape(D).float().contiguous()
        self.W = W.float().contiguous()
        self.W_inv = W_inv.float().contiguous()
        self.eigenvalues = eigenvalues.reshape(D).double().contiguous()
        self.eps = float(eps)
        self.shape = tuple(int(s) for s in shape)
        self._per_device: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(mean, W, W_inv) on `device`, copied once per device."""
        if device == self.mean.device:
            return self.mean, self.W, self.W_inv
        if device not in self._per_device:
            self._per_device[device] = (self.mean.to(device), self.W.to(device), self.W_inv.to(device))
        return self._per_device[device]

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, x: Tensor, eps: float = 0.1) -> "ZCA":
        """Fit on `x` [N, C, H, W] (or any [N, ...]; N >= 2) with regulariser `eps` > 0."""
        if not isinstance(x, Tensor):
            raise TypeError(f"ZCA.fit: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2:
            raise ValueError(f"ZCA.fit: x must be [N, ...] with N samples, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"ZCA.fit: x must be a floating-point tensor, got {x.dtype}")
        N = x.shape[0]
        if N < 2:
            raise ValueError(f"ZCA.fit: need at least 2 samples to estimate a covariance, got {N}")
        if not eps > 0:
            raise ValueError(f"ZCA.fit: eps must be > 0, got {eps}")
        shape = tuple(x.shape[1:])
        x = x.detach()
        dev = x.device if x.device.type != "mps" else torch.device("cpu")  # no float64 on MPS
        flat = x.reshape(N, -1)
        D = flat.shape[1]

        mean = torch.zeros(D, dtype=torch.float64, device=dev)
        for i in range(0, N, _CHUNK):
            mean += flat[i:i + _CHUNK].to(dev, torch.float64).sum(0)
        mean /= N
        cov = torch.zeros(D, D, dtype=torch.float64, device=dev)
        for i in range(0, N, _CHUNK):
            xc = flat[i:i + _CHUNK].to(dev, torch.float64) - mean
            cov.addmm_(xc.T, xc)
        cov /= N - 1
        if not torch.isfinite(cov).all():
            raise ValueError("ZCA.fit: x contains non-finite values (nan or inf)")

        S, U = torch.linalg.eigh(cov)
        del cov
        S = S.clamp_min(0.0)  # round-off can make the smallest eigenvalues slightly negative
        W = (U * (S + eps).rsqrt()) @ U.T
        W_inv = (U * (S + eps).sqrt()) @ U.T
        return cls(mean.to(x.device), W.to(x.device), W_inv.to(x.device), S.to(x.device), eps, shape)

    # ------------------------------------------------------------------ applying
    @property
    def dim(self) -> int:
        return self.mean.numel()

    def transform(self, x: Tensor) -> Tensor:
        """Whiten: ``(x - mean) @ W`` for x [N, *shape] or [*shape]; float32, same shape as x."""
        mean, W, _ = self._on(x.device) if isinstance(x, Tensor) else (self.mean, self.W, None)
        return self._apply(x, W, subtract=mean, add=None, what="transform")

    def inverse(self, y: Tensor) -> Tensor:
        """Un-whiten: ``y @ W_inv + mean``; float32, same shape as y."""
        mean, _, W_inv = self._on(y.device) if isinstance(y, Tensor) else (self.mean, None, self.W_inv)
        return self._apply(y, W_inv, subtract=None, add=mean, what="inverse")

    def transform_(self, x: Tensor) -> Tensor:
        """In-place `transform` of a float32 CPU/GPU tensor x [N, *shape] (chunked; no autograd)."""
        mean, W, _ = self._on(x.device) if isinstance(x, Tensor) else (self.mean, self.W, None)
        return self._apply(x, W, subtract=mean, add=None, what="transform_", inplace=True)

    def _flat(self, x: Tensor, what: str) -> tuple[Tensor, bool]:
        D = self.dim
        if tuple(x.shape) == self.shape or (x.dim() == 1 and x.numel() == D):
            return x.reshape(1, D), True
        if x.dim() >= 2 and _prod(x.shape[1:]) == D and (tuple(x.shape[1:]) == self.shape or x.dim() == 2):
            return x.reshape(x.shape[0], D), False
        raise ValueError(f"ZCA.{what}: expected a tensor of shape [N, {', '.join(map(str, self.shape))}] "
                         f"(or [N, {D}]), got {tuple(x.shape)}")

    def _apply(self, x: Tensor, mat: Tensor, subtract: Tensor | None, add: Tensor | None,
               what: str, inplace: bool = False) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"ZCA.{what}: expected a torch.Tensor, got {type(x).__name__}")
        flat, single = self._flat(x, what)
        sub, addv = subtract, add
        N = flat.shape[0]

        if inplace:
            if x.dtype != torch.float32 or not x.is_contiguous():
                raise ValueError(f"ZCA.{what}: in-place needs a contiguous float32 tensor, got {x.dtype}")
            with torch.no_grad():
                for i in range(0, N, _CHUNK):
                    chunk = flat[i:i + _CHUNK]
                    r = (chunk - sub) @ mat if sub is not None else chunk @ mat
                    if addv is not None:
                        r += addv
                    chunk.copy_(r)
            return x

        xf = flat.float()
        if xf.requires_grad or N <= _CHUNK:
            out = (xf - sub) @ mat if sub is not None else xf @ mat
            if addv is not None:
                out = out + addv
        else:  # large input without autograd: bound the temporaries to one chunk
            out = torch.empty_like(xf)
            for i in range(0, N, _CHUNK):
                chunk = xf[i:i + _CHUNK]
                o = out[i:i + _CHUNK]
                torch.mm(chunk - sub if sub is not None else chunk, mat, out=o)
                if addv is not None:
                    o += addv
        return out.reshape(self.shape) if single else out.reshape(x.shape)

    # ------------------------------------------------------------------ (de)serialising
    def to(self, device: torch.device | str) -> "ZCA":
        """A copy with its tensors on `device`."""
        return ZCA(self.mean.to(device), self.W.to(device), self.W_inv.to(device),
                   self.eigenvalues.to(device), self.eps, self.shape)

    def state_dict(self) -> dict[str, Tensor]:
        """Plain tensors only (safe for ``safetensors.torch.save_file``)."""
        return {
            "mean": self.mean.detach().cpu().contiguous(),
            "W": self.W.detach().cpu().contiguous(),
            "W_inv": self.W_inv.detach().cpu().contiguous(),
            "eigenvalues": self.eigenvalues.detach().cpu().contiguous(),
            "eps": torch.tensor([self.eps], dtype=torch.float64),
            "shape": torch.tensor(self.shape, dtype=torch.int64),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> "ZCA":
        missing = [k for k in ("mean", "W", "W_inv", "eigenvalues", "eps", "shape") if k not in state]
        if missing:
            raise KeyError(f"ZCA.from_state_dict: missing keys {missing}")
        return cls(state["mean"], state["W"], state["W_inv"], state["eigenvalues"],
                   float(state["eps"].reshape(-1)[0]), tuple(int(s) for s in state["shape"].tolist()))

    def __repr__(self) -> str:
        return f"ZCA(shape={self.shape}, eps={self.eps})"


def _prod(shape) -> int:
    p = 1
    for s in shape:
        p *= int(s)
    return p
