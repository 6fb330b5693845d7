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
