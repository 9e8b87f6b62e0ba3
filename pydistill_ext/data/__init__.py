"""Real datasets for distillation: built-in sets, user data, preprocessing and ZCA whitening.

    from pydistill_ext.data import load_dataset
    ds = load_dataset("cifar10", zca=True)          # or "digits", "mnist", "fashion_mnist",
    ds = load_dataset("my_data.npz")                # a path to an .npz file or an image folder
    x, y = ds.train_images, ds.train_labels         # float32 [N,C,H,W] (model space), int64 [N]
    pixels = ds.to_pixels(x[:8])                    # back to [0, 1] for viewing

Data root: ``root=`` / ``--data-root`` / ``$PYDISTILL_DATA`` / ``../shared/data`` beside the
checkout. Cache (decoded CIFAR-10): ``$PYDISTILL_CACHE`` or ``~/.cache/pydistill_ext``.
``PYDISTILL_QUIET=1`` hides progress bars.
"""
from __future__ import annotations

import os
from pathlib import Path

from pydistill_ext.data.builtin import (CACHE_ENV, DATA_ENV, QUIET_ENV, default_data_root, get_loader,
                                        known_datasets)
from pydistill_ext.data.dataset import RealDataset
from pydistill_ext.data.user import IMAGE_EXTENSIONS, from_folder, from_npz, from_torch_dataset
from pydistill_ext.data.zca import ZCA

__all__ = ["load_dataset", "known_datasets", "RealDataset", "ZCA", "from_npz", "from_folder",
           "from_torch_dataset", "default_data_root", "DATA_ENV", "CACHE_ENV", "QUIET_ENV"]


def load_dataset(name_or_path: str | os.PathLike, *, root: str | os.PathLike | None = None, zca: bool = False,
                 zca_eps: float = 0.1, normalize: bool = True) -> RealDataset:
    """Load a built-in dataset by name, or user data from an ``.npz`` file or an image folder.

    Args:
        name_or_path: one of `known_datasets()` (case/'-' insensitive), or a path to an ``.npz``
            file (`from_npz`) or a class-per-sub-folder image folder (`from_folder`).
        root: data root for the file-backed built-in sets (default `default_data_root()`).
        zca: ZCA-whiten (fitted on the normalised train split) after normalising.
        zca_eps: ZCA regulariser (0.1 as in kornia / MTT).
        normalize: normalise each channel with the dataset's mean/std.
    """
    if isinstance(name_or_path, str):
        loader = get_loader(name_or_path)
        if loader is not None:
            return loader(root=root, normalize=normalize, zca=zca, zca_eps=zca_eps)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return from_folder(path, normalize=normalize, zca=zca, zca_eps=zca_eps)
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return from_npz(path, normalize=normalize, zca=zca, zca_eps=zca_eps)
        raise ValueError(f"load_dataset: unsupported file {path}: expected an .npz file or an image folder")
    raise ValueError(f"load_dataset: unknown dataset {str(name_or_path)!r}: expected one of "
                     f"{', '.join(known_datasets())}, or a path to an .npz file or an image folder "
                     f"(no such file or folder: {path.resolve()})")
