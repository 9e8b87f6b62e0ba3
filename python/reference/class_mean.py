"""Float64 oracles of class_mean / class_moments (REFERENCE.md 3: DM, DataDAM class means), and
the anchors' eager per-class loop that the benchmarks compare against."""
import torch


def class_mean(features, labels, num_classes):
    """Loop over classes; an empty class has mean 0. Computed in float64."""
    x = features.double()
    out = []
    for k in range(num_classes):
        rows = x[labels == k]
        out.append(rows.mean(0) if rows.shape[0] > 0 else x.new_zeros(x.shape[1]))
    return torch.stack(out) if out else x.new_zeros((0, x.shape[1]))


def class_moments(features, labels, num_classes):
    """(mean, biased variance) per class in float64; 0 for an empty class."""
    x = features.double()
    means, variances = [], []
    for k in range(num_classes):
        rows = x[labels == k]
        if rows.shape[0] == 0:
            means.append(x.new_zeros(x.shape[1]))
            variances.append(x.new_zeros(x.shape[1]))
        else:
            means.append(rows.mean(0))
            variances.append(rows.var(0, unbiased=False))
    if not means:
        return x.new_zeros((0, x.shape[1])), x.new_zeros((0, x.shape[1]))
    return torch.stack(means), torch.stack(variances)


def eager_class_mean(features, labels, num_classes):
    """The anchors' code (DM main_DM.py style): one masked mean per class."""
    return torch.stack([features[labels == c].mean(0) for c in range(num_classes)])
