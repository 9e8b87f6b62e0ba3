"""User data: an ``.npz`` file, an image folder, or any ``torch.utils.data.Dataset``.

All three produce a `RealDataset` (see `pydistill_ext.data.dataset`). Without an explicit test
split, a deterministic class-balanced split is drawn with ``seed`` (``test_fraction`` of each
class goes to the test split), independent of any global RNG state.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pydistill_ext.data.dataset import RealDataset, balanced_split, build_dataset, check_labels

__all__ = ["from_npz", "from_folder", "from_torch_dataset", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_SMALL_C = (1, 3, 4)
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def _is_gray(im) -> bool:
    """True for greyscale modes and for palette images whose palette is all grey."""
    if im.mode in _GRAY_MODES:
        return True
    if im.mode in ("P", "PA"):
        pal = im.getpalette() or []
        return len(pal) >= 3 and all(pal[i] == pal[i + 1] == pal[i + 2] for i in range(0, len(pal) - 2, 3))
    return False


def _check_fraction(test_fraction: float, what: str) -> float:
    f = float(test_fraction)
    if not 0.0 <= f < 1.0:
        raise ValueError(f"{what}: test_fraction must be in [0, 1), got {test_fraction}")
    return f


def _split_and_build(name, x, y, test_x, test_y, *, class_names, num_classes, test_fraction, seed,
                     normalize, zca, zca_eps, source, what) -> RealDataset:
    """Shared tail: draw the split when no test split is given, then `build_dataset`."""
    if len(x) != len(y):
        raise ValueError(f"{what}: {len(x)} images but {len(y)} labels")
    if len(x) == 0:
        raise ValueError(f"{what}: the dataset is empty (no images)")
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if num_classes is not None and num_classes != len(class_names):
            raise ValueError(f"{what}: num_classes={num_classes} but {len(class_names)} class_names")
        num_classes = len(class_names)
    y = check_labels(y, what=f"{what} (labels)", num_classes=num_classes)
    if test_x is None:
        test_fraction = _check_fraction(test_fraction, what)
        k = num_classes if num_classes is not None else int(y.max()) + 1
        tr, te = balanced_split(y, k, seed=seed, test_fraction=test_fraction)
        x, test_x, test_y, y = x[tr], x[te], y[te], y[tr]
    else:
        if len(test_x) != len(test_y):
            raise ValueError(f"{what}: {len(test_x)} test images but {len(test_y)} test labels")
        test_y = check_labels(test_y, what=f"{what} (test labels)", num_classes=num_classes)
        if num_classes is None:
            num_classes = int(max(y.max(), test_y.max() if test_y.size else 0)) + 1
    return build_dataset(name, x, y, test_x, test_y, class_names=class_names, num_classes=num_classes,
                         normalize=normalize, zca=zca, zca_eps=zca_eps, source=source)


def _to_nchw(arr: np.ndarray, what: str) -> np.ndarray:
    """[N,H,W] -> [N,1,H,W]; [N,H,W,C] (C in 1,3,4) -> [N,C,H,W]; [N,C,H,W] (C in 1,3,4) kept."""
    if arr.ndim == 3:
        return arr[:, None]
    if arr.ndim == 4:
        first, last = arr.shape[1], arr.shape[-1]
        if last in _SMALL_C and first not in _SMALL_C:
            return arr.transpose(0, 3, 1, 2)
        if first in _SMALL_C:
            return arr
    raise ValueError(f"{what}: cannot interpret images of shape {arr.shape}: expected [N, H, W], "
                     f"[N, H, W, C] or [N, C, H, W] with C in 1, 3 or 4")


# ---------------------------------------------------------------------- npz
def _open_npz(path: Path):
    f = np.load(path, allow_pickle=False)
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not an .npz archive (np.load gave a {type(f).__name__}); save it with "
                         f"numpy.savez(path, images=..., labels=...)")
    return f


def from_npz(path: str | os.PathLike, *, test_fraction: float = 0.2, seed: int = 0, normalize: bool = True,
             zca: bool = False, zca_eps: float = 0.1, name: str | None = None) -> RealDataset:
    """Load a dataset from an ``.npz`` file.

    Keys: ``images`` and ``labels`` (required), ``test_images`` + ``test_labels`` (optional, both
    or neither), ``class_names`` (optional string array). Images are uint8 (0..255) or float in
    [0, 1], shaped [N, H, W], [N, H, W, C] or [N, C, H, W] (C in 1, 3, 4). Without a test split,
    ``test_fraction`` of each class (seeded by ``seed``) becomes the test split.
    """
    path = Path(path).expanduser()
    what = str(path)
    if not path.is_file():
        raise FileNotFoundError(f"from_npz: no such file: {path}")
    try:
        with _open_npz(path) as f:
            files = set(f.files)
            missing = [k for k in ("images", "labels") if k not in files]
            if missing:
                raise ValueError(f"{what}: missing key(s) {missing}; expected 'images' and 'labels' "
                                 f"(optional 'test_images', 'test_labels', 'class_names'); found {sorted(files)}")
            if ("test_images" in files) != ("test_labels" in files):
                have = "test_images" if "test_images" in files else "test_labels"
                raise ValueError(f"{what}: has {have!r} but not its partner; give both 'test_images' "
                                 f"and 'test_labels' or neither")
            arrs = {k: f[k] for k in ("images", "labels", "test_images", "test_labels") if k in files}
            class_names = None
            if "class_names" in files:
                try:
                    cn = f["class_names"]
                except ValueError as e:
                    raise ValueError(f"{what}: 'class_names' must be a string array (not an object array): {e}") from e
                class_names = [str(c) for c in np.atleast_1d(cn).tolist()]
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ValueError(f"{what}: cannot read the .npz file ({e})") from e
    except ValueError as e:
        if str(e).startswith(what):
            raise
        raise ValueError(f"{what}: cannot read the .npz file ({e})") from e
    x = _to_nchw(arrs["images"], f"{what} ('images')")
    tx = _to_nchw(arrs["test_images"], f"{what} ('test_images')") if "test_images" in arrs else None
    return _split_and_build(name or path.stem, x, arrs["labels"], tx, arrs.get("test_labels"),
                            class_names=class_names, num_classes=None, test_fraction=test_fraction,
                            seed=seed, normalize=normalize, zca=zca, zca_eps=zca_eps, source=what, what=what)


# ---------------------------------------------------------------------- folder
def _image_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def _class_dirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan(d: Path) -> list[tuple[str, list[Path]]]:
    classes = _class_dirs(d)
    if not classes:
        loose = _image_files(d)
        hint = (f" ({len(loose)} image files lie directly in it; put each class in its own sub-folder)"
                if loose else "")
        raise ValueError(f"{d}: no class sub-folders found{hint}; expected one sub-folder per class "
                         f"holding image files ({', '.join(IMAGE_EXTENSIONS)})")
    out = []
    for c in classes:
        files = _image_files(c)
        if not files:
            raise ValueError(f"{c}: class folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        out.append((c.name, files))
    return out


def from_folder(path: str | os.PathLike, *, test_fraction: float = 0.2, seed: int = 0, normalize: bool = True,
                zca: bool = False, zca_eps: float = 0.1, name: str | None = None) -> RealDataset:
    """Load an image folder: one sub-folder per class (sorted names give labels 0, 1, ...).

    If the folder holds exactly ``train`` and ``test`` sub-folders, each is such a class folder
    tree and they are used as the splits (test classes must also exist in train). Images
    (png/jpg/jpeg/bmp/gif/webp) are read with Pillow, converted to L when all are greyscale,
    otherwise to RGB, and must all have the same size.
    """
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover
        raise ImportError("from_folder needs Pillow: pip install Pillow") from e
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"from_folder: no such folder: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"from_folder: not a folder: {root}")

    sub = {p.name for p in _class_dirs(root)}
    if sub == {"train", "test"}:
        train_classes = _scan(root / "train")
        class_names = [c for c, _ in train_classes]
        test_classes = [] if not _class_dirs(root / "test") else _scan(root / "test")
        for c, _ in test_classes:
            if c not in class_names:
                raise ValueError(f"{root / 'test' / c}: test class {c!r} has no train folder "
                                 f"(train classes: {', '.join(class_names)})")
        index = {c: i for i, c in enumerate(class_names)}
        splits = {"train": [(index[c], f) for c, fs in train_classes for f in fs],
                  "test": [(index[c], f) for c, fs in test_classes for f in fs]}
    else:
        classes = _scan(root)
        class_names = [c for c, _ in classes]
        splits = {"train": [(i, f) for i, (_, fs) in enumerate(classes) for f in fs], "test": None}

    # pass 1: headers only (size, mode)
    ref = None
    gray = True
    for items in splits.values():
        for _, f in items or ():
            try:
                with Image.open(f) as im:
                    size, is_gray = im.size, _is_gray(im)
            except Exception as e:
                raise ValueError(f"{f}: cannot read image file ({type(e).__name__}: {e})") from e
            if ref is None:
                ref = (f, size)
            elif size != ref[1]:
                raise ValueError(f"{f}: image size {size[0]}x{size[1]} differs from {ref[0]} "
                                 f"({ref[1][0]}x{ref[1][1]}); all images must have the same size")
            gray &= is_gray
    mode = "L" if gray else "RGB"
    W, H = ref[1]
    C = 1 if gray else 3

    # pass 2: decode
    def decode(items):
        x = np.empty((len(items), H, W, C), dtype=np.uint8)
        for j, (_, f) in enumerate(items):
            try:
                with Image.open(f) as im:
                    arr = np.asarray(im.convert(mode), dtype=np.uint8)
            except Exception as e:
                raise ValueError(f"{f}: cannot read image file ({type(e).__name__}: {e})") from e
            x[j] = arr.reshape(H, W, C)
        return x.transpose(0, 3, 1, 2), np.array([c for c, _ in items], dtype=np.int64)

    x, y = decode(splits["train"])
    tx, ty = decode(splits["test"]) if splits["test"] is not None else (None, None)
    return _split_and_build(name or root.name, x, y, tx, ty, class_names=class_names, num_classes=None,
                            test_fraction=test_fraction, seed=seed, normalize=normalize, zca=zca,
                            zca_eps=zca_eps, source=str(root), what=str(root))


# ---------------------------------------------------------------------- torch Dataset
def _item_to_chw(img, what: str) -> np.ndarray | torch.Tensor:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None
    if isinstance(img, torch.Tensor):
        t = img.detach().cpu()
        if t.dim() == 2:
            t = t.unsqueeze(0)
        if t.dim() != 3:
            raise ValueError(f"{what}: image tensor must be [C, H, W] or [H, W], got {tuple(t.shape)}")
        return t
    if Image is not None and isinstance(img, Image.Image):
        im = img.convert("L") if _is_gray(img) else img.convert("RGB")
        a = np.asarray(im, dtype=np.uint8)
        return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    if isinstance(img, np.ndarray):
        if img.ndim == 2:
            return img[None]
        if img.ndim == 3:
            return _to_nchw(img[None], what)[0]
        raise ValueError(f"{what}: image array must be [H, W], [H, W, C] or [C, H, W], got {img.shape}")
    raise TypeError(f"{what}: image must be a torch.Tensor, PIL.Image or numpy array, got {type(img).__name__}")


def _label_value(lab, what: str):
    if isinstance(lab, (torch.Tensor, np.ndarray)):
        count = lab.size if isinstance(lab, np.ndarray) else lab.numel()
        if count != 1:
            raise ValueError(f"{what}: label must be a scalar, got shape {tuple(lab.shape)}")
        return lab.reshape(-1)[0].item()
    if isinstance(lab, (bool, np.bool_)) or not isinstance(lab, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what}: label must be an integer, got {lab!r}")
    return lab


def _gather(ds, arg: str) -> tuple[torch.Tensor, np.ndarray]:
    try:
        n = len(ds)
    except TypeError as e:
        raise TypeError(f"from_torch_dataset({arg}=...): the dataset must define __len__ and __getitem__") from e
    if n == 0:
        raise ValueError(f"from_torch_dataset({arg}=...): the dataset is empty")
    imgs, labels = [], []
    for i in range(n):
        item = ds[i]
        where = f"from_torch_dataset({arg}=...), item {i}"
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise ValueError(f"{where}: expected an (image, label) pair, got {type(item).__name__}")
        im = _item_to_chw(item[0], where)
        if imgs and tuple(im.shape) != tuple(imgs[0].shape):
            raise ValueError(f"{where}: image shape {tuple(im.shape)} differs from item 0's "
                             f"{tuple(imgs[0].shape)} (C, H, W)")
        imgs.append(im)
        labels.append(_label_value(item[1], where))
    tensors = [torch.from_numpy(np.array(a)) if isinstance(a, np.ndarray) else a for a in imgs]
    if all(t.dtype == torch.uint8 for t in tensors):
        x = torch.stack(tensors)
    else:
        conv = []
        for i, t in enumerate(tensors):
            if t.dtype == torch.uint8:
                conv.append(t.float() / 255.0)
            elif t.is_floating_point():
                conv.append(t.float())
            else:
                raise ValueError(f"from_torch_dataset({arg}=...), item {i}: images must be uint8 (0..255) "
                                 f"or float in [0, 1], got {t.dtype}")
        x = torch.stack(conv)
    return x, np.asarray(labels)


def from_torch_dataset(train, test=None, *, num_classes: int | None = None,
                       class_names: Sequence[str] | None = None, test_fraction: float = 0.2, seed: int = 0,
                       normalize: bool = True, zca: bool = False, zca_eps: float = 0.1,
                       name: str = "torch_dataset") -> RealDataset:
    """Materialise a map-style ``torch.utils.data.Dataset`` yielding ``(image, label)``.

    Images: tensors [C, H, W] / [H, W], PIL images or numpy arrays ([H, W], [H, W, C], [C, H, W]),
    uint8 (0..255) or float in [0, 1]. Without `test`, a seeded class-balanced split is drawn.
    `class_names` defaults to ``train.classes`` when that is a list of the right length.
    """
    x, y = _gather(train, "train")
    tx, ty = _gather(test, "test") if test is not None else (None, None)
    if tx is not None and tuple(tx.shape[1:]) != tuple(x.shape[1:]):
        raise ValueError(f"from_torch_dataset: test images are {tuple(tx.shape[1:])} but train images are "
                         f"{tuple(x.shape[1:])} (C, H, W)")
    if class_names is None:
        cls = getattr(train, "classes", None)
        if isinstance(cls, (list, tuple)) and cls and (num_classes is None or len(cls) == num_classes):
            if all(isinstance(c, str) for c in cls):
                class_names = list(cls)
    return _split_and_build(name, x, y, tx, ty, class_names=class_names, num_classes=num_classes,
                            test_fraction=test_fraction, seed=seed, normalize=normalize, zca=zca,
                            zca_eps=zca_eps, source=f"torch Dataset {type(train).__name__}",
                            what=f"from_torch_dataset({name!r})")
