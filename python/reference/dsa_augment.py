"""Float64 oracle of the fused DSA op (pydistill_ext/ops/dsa_augment.py) and the per-sample
eager loop the benchmark compares against.

The oracle is the per-op pure-torch path of pydistill_ext/augment/dsa.py (brightness,
saturation, contrast as tensor arithmetic, crop by padded indexing, cutout by a mask, flip by
torch.flip, scale and rotate by F.affine_grid + F.grid_sample, one op after the other) run in
float64: no code is shared with the kernel (csrc/include/pydistill/dsa_taps.h).
"""
import torch

from pydistill_ext.augment.dsa import DSAOp, DSATransform, dsa_apply, dsa_params


def dsa_apply_ref(x, transform):
    """The transform applied op by op in float64 (returns float64)."""
    return dsa_apply(x.double(), transform, fused=False)


def dsa_augment_ref(x, *, seed, strategy, per_sample=False, mode="single", params=None):
    """dsa_augment's oracle: same parameters (dsa_params), float64 per-op path."""
    t = dsa_params(seed, x.shape, strategy=strategy, per_sample=per_sample, mode=mode,
                   params=params)
    return dsa_apply_ref(x, t)


def sample_transform(t, i):
    """The transform of sample i alone (a batch of one)."""
    ops = tuple(DSAOp(op.name, {k: v[i:i + 1] for k, v in op.values.items()}) for op in t.ops)
    return DSATransform(groups=t.groups, ops=ops, batch_size=1, height=t.height, width=t.width,
                        align_corners=t.align_corners)


def per_sample_eager(x, transform):
    """Each image transformed alone with the pure-torch path, as per-image augmentation
    pipelines do (torchvision-style transforms in a Dataset), then stacked. In x's dtype."""
    return torch.cat([dsa_apply(x[i:i + 1], sample_transform(transform, i), fused=False)
                      for i in range(x.shape[0])])
