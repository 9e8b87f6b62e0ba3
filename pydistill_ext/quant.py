"""Post-training quantization (simulated, "fake-quantized") of a trained network.

This is the use ZeroQ's distilled data exists for (Cai et al., "ZeroQ: A Novel Zero Shot
Quantization Framework", CVPR 2020, Sec. 3.1: the distilled data calibrates the activation
ranges of a quantized model; REFERENCE.md 4.1/4.3). :func:`quantize_model` returns a copy of
a float model in which

* **BatchNorm is folded** into the preceding Conv/Linear (``fold_bn=True``, as deployment does):
  with ``s = gamma / sqrt(running_var + eps)``, ``W' = s[:, None, ...] * W`` and
  ``b' = s * (b - running_mean) + beta`` (:func:`fold_conv_bn`), so the folded weights are what
  gets quantized. (ZeroQ's released code does *not* fold: it quantizes conv weights and keeps
  BN in float. Folding is the harder, deployment-faithful setting: BN's scale can widen a
  channel's weight range.)
* **weights** of every Conv/Linear are quantized **uniform symmetric**, per output channel by
  default (``per_channel``), with the min-max range: ``scale_c = max|W_c| / (2^(b-1) - 1)``,
  ``q = clamp(round(W / scale_c), -(2^(b-1) - 1), 2^(b-1) - 1)``, ``W_hat = q * scale_c``; so
  ``|W - W_hat| <= scale_c / 2``. (ZeroQ uses asymmetric per-channel min-max weights; the
  symmetric form is what integer kernels use. Biases stay in float, as in ZeroQ.)
* **activations**: the **input of every Conv/Linear** is quantized **uniform asymmetric per
  tensor**, ``scale = (hi - lo) / (2^b - 1)``, ``zero_point = round(-lo / scale)``,
  ``x_hat = (clamp(round(x / scale) + zero_point, 0, 2^b - 1) - zero_point) * scale``, with
  ``[lo, hi]`` (always containing 0, so zero is exact) calibrated on ``calibration_images``.
  ZeroQ puts its activation quantizers after every ReLU; in a conv net whose layers are fed by
  ReLU (then pooling) outputs these are the same tensors up to pooling, and quantizing the
  layer inputs is what an integer kernel consumes. As in ZeroQ the network's input image is
  not quantized by default (``quantize_input=False``); pass ``True`` to quantize it too.

Calibration (ZeroQ's ``update`` pass over the distilled data): the weight-quantized model runs
on ``calibration_images`` with float activations while each quantizer observes its input;
then the ranges are frozen. ``act_clip``: ``"minmax"`` (ZeroQ: running min/max over all
batches), ``"percentile"`` (``lo``/``hi`` = the (100 - p)-th / p-th percentile of the observed
values, ``p = percentile``; the standard fix when a few outliers stretch a 4-bit range) or
``"mse"`` (the clipping range, among 100 shrinkings of the min-max range, that minimises the
squared quantization error of the observed values).

The quantized copy is slower than the float model (quantization is simulated in float); its
accuracy is that of the integer model up to float rounding of the accumulation.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["quantize_model", "fold_batchnorm", "fold_conv_bn", "quantize_weight",
           "asymmetric_qparams", "fake_quantize_asymmetric", "ActQuantizer", "QuantLayer",
           "ACT_CLIPS"]

ACT_CLIPS = ("minmax", "percentile", "mse")
_QUANT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_MAX_SAMPLES = 1 << 22  # observed values kept per quantizer and batch (percentile / mse)


def _check_bits(bits, name: str, allow_none: bool = True) -> Optional[int]:
    if bits is None and allow_none:
        return None
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 16:
        raise ValueError(f"{name} must be an integer in [2, 16]{' or None (float)' if allow_none else ''}, "
                         f"got {bits!r}")
    return bits


# ---------------------------------------------------------------------------- weights
def quantize_weight(w: torch.Tensor, bits: int, *, per_channel: bool = True):
    """Uniform symmetric min-max quantization of a weight tensor (dim 0 = output channels).

    Returns ``(w_hat, q, scale)``: the dequantized weights (same dtype/shape as ``w``), the
    integer codes in ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (int32) and the scale (shape
    ``[C_out]`` per channel, ``[]`` per tensor). A channel of zeros gets scale 1 (codes 0).
    """
    bits = _check_bits(bits, "bits", allow_none=False)
    if not torch.is_floating_point(w):
        raise TypeError(f"weights must be floating point, got {w.dtype}")
    if w.dim() < 1 or w.numel() == 0:
        raise ValueError(f"weights must be a non-empty tensor, got shape {tuple(w.shape)}")
    qmax = 2 ** (bits - 1) - 1
    wf = w.detach().double()
    if per_channel:
        amax = wf.reshape(wf.shape[0], -1).abs().amax(1)
        shape = (-1,) + (1,) * (w.dim() - 1)
    else:
        amax = wf.abs().amax()
        shape = ()
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = torch.clamp(torch.round(wf / scale.reshape(shape)), -qmax, qmax)
    w_hat = (q * scale.reshape(shape)).to(w.dtype)
    return w_hat, q.to(torch.int32), scale.to(w.dtype)


# ---------------------------------------------------------------------------- activations
def asymmetric_qparams(lo: float, hi: float, bits: int):
    """(scale, zero_point) of uniform asymmetric quantization of ``[min(lo, 0), max(hi, 0)]``
    to the codes ``0 .. 2^b - 1``; a degenerate range (all zeros) gets scale 1."""
    bits = _check_bits(bits, "bits", allow_none=False)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"activation range must be finite, got [{lo}, {hi}]")
    levels = 2 ** bits - 1
    scale = (hi - lo) / levels if hi > lo else 1.0
    zero_point = int(round(-lo / scale))
    return scale, min(max(zero_point, 0), levels)


def fake_quantize_asymmetric(x: torch.Tensor, scale: float, zero_point: int, bits: int) -> torch.Tensor:
    """``(clamp(round(x / scale) + zero_point, 0, 2^b - 1) - zero_point) * scale``."""
    levels = 2 ** bits - 1
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, levels)
    return (q - zero_point) * scale


class ActQuantizer(nn.Module):
    """Per-tensor asymmetric activation quantizer with a calibration (observer) mode.

    While ``observing`` it records the running min/max (and, for ``percentile``/``mse``, a
    deterministic strided subsample of the values) and passes ``x`` through unchanged;
    :meth:`freeze` computes ``scale``/``zero_point``; afterwards it fake-quantizes.
    """

    def __init__(self, bits: int, clip: str = "minmax", percentile: float = 99.99):
        super().__init__()
        self.bits = _check_bits(bits, "act_bits", allow_none=False)
        if clip not in ACT_CLIPS:
            raise ValueError(f"act_clip must be one of {ACT_CLIPS}, got {clip!r}")
        if not (isinstance(percentile, (int, float)) and 50.0 < percentile <= 100.0):
            raise ValueError(f"percentile must be in (50, 100], got {percentile!r}")
        self.clip, self.percentile = clip, float(percentile)
        self.observing = True
        self.register_buffer("x_min", torch.tensor(float("inf")))
        self.register_buffer("x_max", torch.tensor(float("-inf")))
        self.scale: Optional[float] = None
        self.zero_point: Optional[int] = None
        self.lo: Optional[float] = None
        self.hi: Optional[float] = None
        self._samples: List[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            xd = x.detach()
            self.x_min = torch.minimum(self.x_min, xd.min().float())
            self.x_max = torch.maximum(self.x_max, xd.max().float())
            if self.clip != "minmax":
                flat = xd.reshape(-1).float()
                stride = max(1, flat.numel() // _MAX_SAMPLES)
                self._samples.append(flat[::stride].cpu())
            return x
        if self.scale is None:
            raise RuntimeError("ActQuantizer used before calibration (call freeze())")
        return fake_quantize_asymmetric(x, self.scale, self.zero_point, self.bits)

    def freeze(self) -> None:
        if not torch.isfinite(self.x_min) or not torch.isfinite(self.x_max):
            raise RuntimeError("ActQuantizer saw no (finite) calibration values; is the layer "
                               "reached by the forward pass?")
        lo, hi = float(self.x_min), float(self.x_max)
        if self.clip != "minmax":
            v = torch.cat(self._samples).double()
            if self.clip == "percentile":
                hi = _kth_quantile(v, self.percentile / 100.0)
                lo = _kth_quantile(v, 1.0 - self.percentile / 100.0) if lo < 0 else 0.0
            else:
                lo, hi = _mse_range(v, min(lo, 0.0), max(hi, 0.0), self.bits)
        self.lo, self.hi = min(lo, 0.0), max(hi, 0.0)
        self.scale, self.zero_point = asymmetric_qparams(self.lo, self.hi, self.bits)
        self._samples = []
        self.observing = False

    def extra_repr(self) -> str:
        rng = "uncalibrated" if self.scale is None else \
            f"range=[{self.lo:.4g}, {self.hi:.4g}], scale={self.scale:.4g}, zero_point={self.zero_point}"
        return f"bits={self.bits}, clip={self.clip!r}, {rng}"


def _kth_quantile(v: torch.Tensor, q: float) -> float:
    """The ceil(q * n)-th smallest value (nearest-rank percentile; exact for any n)."""
    n = v.numel()
    k = min(n, max(1, math.ceil(q * n)))
    return float(torch.kthvalue(v, k).values)


def _mse_range(v: torch.Tensor, lo: float, hi: float, bits: int, steps: int = 100):
    """Among ``[a * lo, a * hi]``, a = k / steps (k = 1..steps), the range with the least
    squared quantization error on the values ``v``."""
    best, best_err = (lo, hi), float("inf")
    for k in range(steps, 0, -1):
        a = k / steps
        scale, zp = asymmetric_qparams(a * lo, a * hi, bits)
        err = float((fake_quantize_asymmetric(v, scale, zp, bits) - v).pow(2).sum())
        if err < best_err:
            best, best_err = (a * lo, a * hi), err
    return best


class QuantLayer(nn.Module):
    """A Conv/Linear with fake-quantized weights and (optionally) a quantized input.

    ``layer``'s weight is replaced by its dequantized values; ``weight_int`` and
    ``weight_scale`` (buffers) hold the integer codes and scales; ``act`` is the
    :class:`ActQuantizer` of the input (None: the input stays float).
    """

    def __init__(self, layer: nn.Module, weight_bits: Optional[int], per_channel: bool,
                 act: Optional[ActQuantizer]):
        super().__init__()
        self.layer = layer
        self.weight_bits, self.per_channel = weight_bits, per_channel
        if weight_bits is not None:
            w_hat, q, scale = quantize_weight(layer.weight, weight_bits, per_channel=per_channel)
            with torch.no_grad():
                layer.weight.copy_(w_hat)
            self.register_buffer("weight_int", q)
            self.register_buffer("weight_scale", scale)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        return self.layer(x)

    def extra_repr(self) -> str:
        return f"weight_bits={self.weight_bits}, per_channel={self.per_channel}"


# ---------------------------------------------------------------------------- BN folding
def fold_conv_bn(layer: nn.Module, bn: _BatchNorm) -> nn.Module:
    """A copy of ``layer`` (Conv/Linear) with the eval-mode ``bn`` that follows it folded in:
    ``W' = s * W`` (per output channel), ``b' = s * (b - mu) + beta``, ``s = gamma / sqrt(var + eps)``.
    """
    if not isinstance(layer, _QUANT_TYPES):
        raise TypeError(f"can only fold BatchNorm into Conv/Linear, got {type(layer).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm without running statistics cannot be folded")
    out_ch = layer.weight.shape[0]
    if bn.num_features != out_ch:
        raise ValueError(f"BatchNorm has {bn.num_features} features, the layer {out_ch} outputs")
    compute = torch.float64
    w = layer.weight.detach().to(compute)
    mu, var = bn.running_mean.to(compute), bn.running_var.to(compute)
    gamma = bn.weight.detach().to(compute) if bn.weight is not None else torch.ones_like(mu)
    beta = bn.bias.detach().to(compute) if bn.bias is not None else torch.zeros_like(mu)
    s = gamma / torch.sqrt(var + bn.eps)
    b = layer.bias.detach().to(compute) if layer.bias is not None else torch.zeros_like(mu)
    new = copy.deepcopy(layer)
    if new.bias is None:
        new.bias = nn.Parameter(torch.zeros(out_ch, dtype=layer.weight.dtype,
                                            device=layer.weight.device))
    with torch.no_grad():
        new.weight.copy_((w * s.reshape((-1,) + (1,) * (w.dim() - 1))).to(layer.weight.dtype))
        new.bias.copy_((s * (b - mu) + beta).to(layer.weight.dtype))
    return new


def _set_submodule(root: nn.Module, qualname: str, module: nn.Module) -> None:
    parent, _, leaf = qualname.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) in which every BatchNorm that directly and solely
    consumes a Conv/Linear output is folded into it and replaced by ``nn.Identity``.

    The pairs are found on the ``torch.fx`` graph of the model (the model must be traceable);
    a BatchNorm fed by anything else (e.g. a sum) is left in place.
    """
    import torch.fx

    model = copy.deepcopy(model).eval()
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as e:  # noqa: BLE001 - re-raised with advice
        raise RuntimeError(f"fold_bn: torch.fx could not trace {type(model).__name__} ({e}); "
                           "pass fold_bn=False to quantize without folding") from e
    uses: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            uses[node.target] = uses.get(node.target, 0) + 1
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        bn = model.get_submodule(node.target)
        if not isinstance(bn, _BatchNorm) or not node.args:
            continue
        src = node.args[0]
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module"):
            continue
        layer = model.get_submodule(src.target)
        if not isinstance(layer, _QUANT_TYPES) or len(src.users) != 1:
            continue
        if uses[src.target] != 1 or uses[node.target] != 1 or not bn.track_running_stats:
            continue
        _set_submodule(model, src.target, fold_conv_bn(layer, bn))
        _set_submodule(model, node.target, nn.Identity())
    return model


# ---------------------------------------------------------------------------- the model
def _calibration_batches(calibration_images, batch_size: int) -> List[torch.Tensor]:
    if isinstance(calibration_images, torch.Tensor):
        if calibration_images.dim() < 2:
            raise ValueError("calibration_images must be a batch [N, ...], got shape "
                             f"{tuple(calibration_images.shape)}")
        batches = [calibration_images[i:i + batch_size]
                   for i in range(0, calibration_images.shape[0], batch_size)]
    elif isinstance(calibration_images, Iterable):
        batches = list(calibration_images)
        if not all(isinstance(b, torch.Tensor) for b in batches):
            raise TypeError("calibration_images: every batch must be a tensor")
    else:
        raise TypeError("calibration_images must be a tensor [N, ...] or an iterable of tensors, "
                        f"got {type(calibration_images).__name__}")
    batches = [b for b in batches if b.dim() > 0 and b.shape[0] > 0]
    if not batches:
        raise ValueError("calibration_images is empty: give at least one image to calibrate the "
                         "activation ranges on")
    for b in batches:
        if not torch.is_floating_point(b):
            raise TypeError(f"calibration images must be floating point, got {b.dtype}")
        if not torch.isfinite(b).all():
            raise ValueError("calibration images contain NaN or inf")
    return batches


def quantize_model(model: nn.Module, calibration_images: Union[torch.Tensor, Sequence[torch.Tensor]],
                   *, weight_bits: Optional[int] = 8, act_bits: Optional[int] = 8,
                   per_channel: bool = True, act_clip: str = "minmax", percentile: float = 99.99,
                   fold_bn: bool = True, quantize_input: bool = False,
                   batch_size: int = 256) -> nn.Module:
    """A fake-quantized copy of ``model`` (the module docstring gives the scheme).

    ``calibration_images``: a tensor ``[N, C, H, W]`` in the model's input space (normalised)
    or an iterable of such batches; ZeroQ's distilled data, real images or noise.
    ``weight_bits``/``act_bits``: integers in [2, 16], or None to keep weights/activations in
    float. ``per_channel``: per-output-channel weight scales (else one per tensor).
    ``act_clip``: ``"minmax"``, ``"percentile"`` (with ``percentile``) or ``"mse"``.
    The returned model is in eval mode, with gradients off, and carries ``quant_config``.
    """
    weight_bits = _check_bits(weight_bits, "weight_bits")
    act_bits = _check_bits(act_bits, "act_bits")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if act_clip not in ACT_CLIPS:
        raise ValueError(f"act_clip must be one of {ACT_CLIPS}, got {act_clip!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    batches = _calibration_batches(calibration_images, batch_size)
    qmodel = fold_batchnorm(model) if fold_bn else copy.deepcopy(model).eval()
    qmodel.requires_grad_(False)
    targets = [(n, m) for n, m in qmodel.named_modules() if isinstance(m, _QUANT_TYPES)]
    if not targets:
        raise ValueError(f"model {type(model).__name__} has no Conv/Linear layer to quantize")
    device = next(qmodel.parameters()).device
    wrappers: List[QuantLayer] = []
    for name, layer in targets:
        act = ActQuantizer(act_bits, act_clip, percentile).to(device) if act_bits is not None else None
        q = QuantLayer(layer, weight_bits, per_channel, act)
        _set_submodule(qmodel, name, q)
        wrappers.append(q)
    # calibration: weight-quantized model, float activations, observers record; find the
    # layers fed by the network input (their quantizer is dropped unless quantize_input)
    fed_by_input = set()
    current = {}

    def pre_hook(mod, inputs):
        x = inputs[0]
        # the input itself or a view of it (e.g. flattened for an MLP)
        if x.data_ptr() == current["ptr"] and x.numel() == current["numel"]:
            fed_by_input.add(id(mod))

    handles = [w.register_forward_pre_hook(pre_hook) for w in wrappers]
    try:
        with torch.no_grad():
            for b in batches:
                b = b.to(device).contiguous()
                current["ptr"], current["numel"] = b.data_ptr(), b.numel()
                qmodel(b)
    finally:
        for h in handles:
            h.remove()
    for w in wrappers:
        if w.act is None:
            continue
        if id(w) in fed_by_input and not quantize_input:
            w.act = None
            continue
        w.act.freeze()
    qmodel.quant_config = {"weight_bits": weight_bits, "act_bits": act_bits,
                           "per_channel": per_channel, "act_clip": act_clip,
                           "percentile": percentile if act_clip == "percentile" else None,
                           "fold_bn": fold_bn, "quantize_input": quantize_input,
                           "calibration_images": sum(int(b.shape[0]) for b in batches),
                           "layers": len(wrappers)}
    return qmodel.eval()
