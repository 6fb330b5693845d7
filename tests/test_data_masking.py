"""iBOT block masks and batch collation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dinov2.data.collate import collate_data_and_cast
from dinov2.data.masking import MaskingGenerator


def _components(mask: np.ndarray) -> list[int]:
    """Sizes of 4-connected components of True cells."""
    seen = np.zeros_like(mask)
    sizes = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        stack, n = [(y, x)], 0
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            n += 1
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        sizes.append(n)
    return sizes


def test_mask_generator_blocks_and_counts():
    gen = MaskingGenerator((16, 16), min_num_patches=4, max_num_patches=128, min_aspect=0.3)
    rng = np.random.default_rng(0)
    reached = 0
    for target in [0, 3, 4, 20, 64, 128]:
        for _ in range(20):
            m = gen(target, rng=rng)
            assert m.shape == (16, 16) and m.dtype == bool
            n = int(m.sum())
            assert n <= target  # never overshoots
            reached += target >= 4 and n >= 0.75 * target
            if target < 4:
                assert n == 0  # no block below the minimum size
            assert all(s >= 4 for s in _components(m))
    assert reached >= 0.95 * 4 * 20  # almost always close to the target


def test_mask_generator_is_seeded():
    gen = MaskingGenerator(14)
    a = gen(50, rng=np.random.default_rng(3))
    b = gen(50, rng=np.random.default_rng(3))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, gen(50, rng=np.random.default_rng(4)))


def _fake_samples(batch: int, n_local: int, g: int, l: int):
    out = []
    for b in range(batch):
        out.append({
            "global_crops": [torch.full((3, g, g), 10.0 * b + c) for c in range(2)],
            "local_crops": [torch.full((3, l, l), 100.0 + 10 * b + c) for c in range(n_local)],
        })
    return out


def test_collate_shapes_order_and_masks():
    B, nL, g, l, patch = 6, 3, 56, 28, 14
    grid = g // patch
    gen = MaskingGenerator(grid, max_num_patches=0.5 * grid * grid)
    out = collate_data_and_cast(_fake_samples(B, nL, g, l), (0.1, 0.5), 0.5, torch.bfloat16,
                                n_tokens=grid * grid, mask_generator=gen, rng=np.random.default_rng(0))
    assert out["collated_global_crops"].shape == (2 * B, 3, g, g)
    assert out["collated_global_crops"].dtype == torch.bfloat16
    assert out["collated_local_crops"].shape == (nL * B, 3, l, l)
    # Crop-major order: index c * B + b is crop c of sample b.
    assert out["collated_global_crops"][1 * B + 4, 0, 0, 0].item() == 41.0
    assert out["collated_local_crops"][2 * B + 3, 0, 0, 0].item() == 132.0
    masks = out["collated_masks"]
    assert masks.shape == (2 * B, grid * grid) and masks.dtype == torch.bool
    assert torch.equal(out["mask_indices_list"], masks.flatten().nonzero().flatten())
    assert out["n_masked_patches"].tolist() == [int(masks.sum())]
    per_image = masks.sum(-1)
    w = out["masks_weight"]
    assert w.shape == (int(masks.sum()),)
    expected = (1.0 / per_image.clamp(min=1).float()).unsqueeze(-1).expand_as(masks)[masks]
    assert torch.allclose(w, expected)
    # Each masked image's weights sum to 1.
    sums = torch.zeros(2 * B).index_add_(0, masks.nonzero()[:, 0], w)
    assert torch.allclose(sums[per_image > 0], torch.ones(int((per_image > 0).sum())))


def test_mask_statistics_reference_defaults():
    # ViT-/14 at 224: 16 x 16 patches, half the global crops masked, ratios spread over [0.1, 0.5].
    B, grid = 32, 16
    N = grid * grid
    gen = MaskingGenerator(grid, max_num_patches=0.5 * N)
    rng = np.random.default_rng(1)
    masked_frac, ratios = [], []
    for _ in range(10):
        out = collate_data_and_cast(_fake_samples(B, 0, 8, 8), (0.1, 0.5), 0.5, torch.float32,
                                    n_tokens=N, mask_generator=gen, rng=rng)
        m = out["collated_masks"]
        counts = m.sum(-1)
        masked_frac.append(float((counts > 0).float().mean()))
        r = counts[counts > 0].float() / N
        ratios += r.tolist()
        assert out["upperbound"] >= int(m.sum())
        assert counts.max() <= 0.5 * N
    assert all(f == pytest.approx(0.5, abs=0.04) for f in masked_frac)  # half of the 2B crops
    ratios = np.array(ratios)
    assert ratios.min() >= 0.1 * 0.8 and ratios.max() <= 0.5
    assert np.mean(ratios) == pytest.approx(0.3, abs=0.04)  # spread evenly over [0.1, 0.5]
    # The masked crops are scattered, not always the first ones.
    first_half = out["collated_masks"][:B].sum(-1) > 0
    assert 0 < int(first_half.sum()) < B
