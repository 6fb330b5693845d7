"""64-bit DCT perceptual hash and Hamming distance.

The hash survives re-encoding, small resizes and mild colour changes, so exact
and near-exact copies can be found cheaply before (or beside) embedding search.

Recipe: grey image → 32×32 (box filter, i.e. area average) → 2-D DCT-II →
the 8×8 block of lowest frequencies *without* the DC row and column
(coefficients [1:9, 1:9]) → one bit per coefficient: above the block's median.
Skipping row/column 0 drops the mean brightness and the pure horizontal/vertical
ramps, which carry little identity and shift with exposure.  Bits are packed
row-major, most significant first, and stored as a signed int64 (the same 64
bits; Parquet and Arrow have no unsigned 64-bit type that every reader handles).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

HASH_SIZE = 8  # 8×8 = 64 bits
DCT_SIZE = 32  # image side before the DCT


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II basis: ``C @ x`` transforms a length-``n`` signal."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    c = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    c[0, :] = np.sqrt(1.0 / n)
    return c


_DCT = _dct_matrix(DCT_SIZE)
# Bit weights, most significant bit first, as uint64 so the shift never overflows.
_WEIGHTS = (np.uint64(1) << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


def _grey32(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if image.mode != "L":
        image = image.convert("L")
    # BOX averages every source pixel into its cell: the most stable choice when
    # the same photo arrives at different sizes.
    small = image.resize((DCT_SIZE, DCT_SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64)


def phash_bits(image: Image.Image | np.ndarray) -> np.ndarray:
    """The 64 hash bits (bool, row-major over the 8×8 block)."""
    grey = _grey32(image)
    coeffs = _DCT @ grey @ _DCT.T  # separable 2-D DCT-II
    # Rounding removes float noise (~1e-13) so flat regions hash the same on every BLAS.
    block = np.round(coeffs[1 : HASH_SIZE + 1, 1 : HASH_SIZE + 1].ravel(), 6)
    return block > np.median(block)


def phash(image: Image.Image | np.ndarray) -> int:
    """64-bit DCT perceptual hash of ``image`` as a signed int64 value."""
    bits = phash_bits(image)
    value = np.uint64(np.sum(_WEIGHTS[bits], dtype=np.uint64))
    return int(value.view(np.int64))


def hamming(a, b):
    """Number of differing bits between hashes (ints or int64 arrays; broadcasts).

    Works on the signed int64 storage form: the bit pattern is what counts.
    Returns an int for scalar inputs, an int array otherwise.
    """
    x = np.asarray(a, dtype=np.int64).view(np.uint64) ^ np.asarray(b, dtype=np.int64).view(np.uint64)
    counts = np.bitwise_count(x).astype(np.int64)
    return int(counts) if counts.ndim == 0 else counts
