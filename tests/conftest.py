import os
from pathlib import Path

import pytest

# Two cores here; keep torch from oversubscribing when tests spawn processes.
os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
SIGN_DIGITS = REPO.parent / "shared" / "data" / "sign-digits"


@pytest.fixture(scope="session")
def sign_digits() -> Path:
    if not SIGN_DIGITS.is_dir():
        pytest.skip(f"real photos not found at {SIGN_DIGITS} (team data folder ../shared/data/sign-digits)")
    return SIGN_DIGITS


def import_bench(name: str):
    """A module of bench/ (the learning tests run the benches at a small budget)."""
    import importlib
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "bench"))
