"""Fixtures shared by the method tests: sklearn digits and one BN teacher trained on it
(once per session: the BN-synthesis and ZeroQ tests both invert it)."""
import pytest

from pydistill_ext.data import load_dataset
from pydistill_ext.methods.squeeze import train_teacher


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="session")
def teacher_dir(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    r = train_teacher(digits, epochs=3, out_dir=out)
    assert r["test_accuracy"] > 0.8  # 3 epochs on 1,497 digits: 93 % (chance 10 %)
    return out
