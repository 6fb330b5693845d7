"""Heads, DINO / iBOT / KoLeo losses and teacher centering against plain reference formulas."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from dinov2.loss import (
    DINOLoss,
    KoLeoLoss,
    SoftmaxCenter,
    dino_pair_count,
    iBOTPatchLoss,
    masked_patch_weights,
    sinkhorn_knopp,
)
from dinov2.models.head import DINOHead, WeightNormLinear


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- head
def test_head_structure_names_and_init():
    head = DINOHead(in_dim=48, out_dim=300, hidden_dim=64, bottleneck_dim=24, nlayers=3)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(48, 64), (64, 64), (64, 24)]
    assert sum(isinstance(m, torch.nn.GELU) for m in head.mlp) == 2
    assert isinstance(head.last_layer, WeightNormLinear)
    assert head.last_layer.weight.shape == (300, 24)
    names = [n for n, _ in head.named_parameters()]
    assert [n for n in names if "last_layer" in n] == ["last_layer.weight", "last_layer.weight_g"]
    fixed = DINOHead(48, 300, 64, 24, last_layer_gain="fixed")
    assert [n for n, _ in fixed.named_parameters() if "last_layer" in n] == ["last_layer.weight"]
    for m in linears:
        # trunc_normal_(std=0.02) with the default [-2, 2] bounds, like the reference.
        assert 0.018 < m.weight.std().item() < 0.022
        assert torch.count_nonzero(m.bias) == 0
    no_bias = DINOHead(48, 300, 64, 24, nlayers=2, mlp_bias=False)
    assert all(m.bias is None for m in no_bias.mlp if isinstance(m, torch.nn.Linear))
    one = DINOHead(48, 300, 64, 24, nlayers=1)
    assert len(one.mlp) == 1 and one.mlp[0].out_features == 24


def test_head_use_bn_layout_and_no_weight_decay():
    from dinov2.train.param_groups import no_weight_decay

    head = DINOHead(48, 300, 64, 24, nlayers=3, use_bn=True)
    # The reference use_bn layout: Linear → BatchNorm1d → GELU, twice, then the bottleneck Linear.
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "BatchNorm1d", "GELU"] * 2 + ["Linear"]
    x = torch.randn(16, 48, generator=_gen()) * 5 + 3
    hidden = head.mlp[1](head.mlp[0](x))  # batch statistics in training mode: zero mean, unit variance
    torch.testing.assert_close(hidden.mean(0), torch.zeros(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden.var(0, unbiased=False), torch.ones(64), atol=1e-3, rtol=0)
    # BatchNorm weights are 1-D: no decay under either reference rule; the [out, 1] gain decays under both.
    for rule in ("dinov2", "dino"):
        decay = {n for n, p in head.named_parameters() if not no_weight_decay("dino_head." + n, p, rule)}
        assert decay == {"mlp.0.weight", "mlp.3.weight", "mlp.6.weight", "last_layer.weight", "last_layer.weight_g"}


def test_head_matches_torch_weight_norm_with_unit_gain():
    torch.manual_seed(0)
    head = DINOHead(32, 500, 64, 16)
    ref = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(16, 500, bias=False))
    with torch.no_grad():
        ref.parametrizations.weight.original1.copy_(head.last_layer.weight)  # v
        ref.parametrizations.weight.original0.fill_(1.0)  # g
    x = torch.randn(10, 32)
    bottleneck = head.mlp(x)
    expected = ref(bottleneck / bottleneck.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(head(x), expected, atol=1e-6, rtol=1e-5)
    # Logits are cosines between a unit vector and unit prototypes.
    assert head(x).abs().max() <= 1.0 + 1e-5
    # A learned gain scales each prototype's logits as torch's weight norm does.
    with torch.no_grad():
        g = torch.rand(500, 1) + 0.5
        head.last_layer.weight_g.copy_(g)
        ref.parametrizations.weight.original0.copy_(g)
    torch.testing.assert_close(head(x), ref(bottleneck / bottleneck.norm(dim=-1, keepdim=True)), atol=1e-6, rtol=1e-5)


def test_head_scale_invariance_and_gradients():
    torch.manual_seed(1)
    head = DINOHead(16, 40, 32, 8, last_layer_gain="fixed")
    x = torch.randn(6, 16)
    out = head(x)
    with torch.no_grad():
        head.last_layer.weight.mul_(torch.rand(40, 1) * 10 + 0.1)  # rescale each prototype
    torch.testing.assert_close(head(x), out, atol=1e-6, rtol=1e-5)
    head(x).pow(2).sum().backward()
    w, g = head.last_layer.weight, head.last_layer.weight.grad
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    # Weight-norm gradients are orthogonal to each row's direction (g is fixed, not trained).
    assert (w * g).sum(dim=1).abs().max() < 1e-5


def test_head_split_equals_slicing_the_full_scores_values_and_gradients():
    # The trainer scores CLS tokens and masked patches in one head call with split_at (no slicing of
    # the big [N, K] scores); it must give exactly what slicing the full output gives, gradients too.
    torch.manual_seed(4)
    head = DINOHead(16, 40, 32, 8)
    x = torch.randn(9, 16, requires_grad=True)
    target_a, target_b = torch.randn(4, 40), torch.randn(5, 40)
    full = head(x)
    ((full[:4] * target_a).sum() + (full[4:] ** 2 * target_b).sum()).backward()
    ref_x, ref_w = x.grad.clone(), head.last_layer.weight.grad.clone()
    x.grad = None
    head.zero_grad()
    a, b = head(x, split_at=4)
    torch.testing.assert_close(a, full[:4])
    torch.testing.assert_close(b, full[4:])
    ((a * target_a).sum() + (b ** 2 * target_b).sum()).backward()
    torch.testing.assert_close(x.grad, ref_x)
    torch.testing.assert_close(head.last_layer.weight.grad, ref_w)
    empty_a, all_b = head(x, split_at=0)
    assert empty_a.shape == (0, 40) and all_b.shape == (9, 40)


def test_head_half_precision_inputs():
    torch.manual_seed(2)
    head = DINOHead(16, 40, 32, 8)
    x = torch.randn(4, 16)
    ref = head(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=0)
    out16 = head.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16.float()).all()


def test_head_state_dict_round_trip_and_reference_keys():
    torch.manual_seed(3)
    head = DINOHead(16, 40, 32, 8)
    fresh = DINOHead(16, 40, 32, 8)
    fresh.load_state_dict(head.state_dict())
    x = torch.randn(3, 16)
    torch.testing.assert_close(fresh(x), head(x))
    # Reference-style weight-norm keys (g == 1) load into the same layer.
    sd = head.state_dict()
    sd["last_layer.weight_v"] = sd.pop("last_layer.weight") * 3.0
    sd["last_layer.weight_g"] = torch.ones(40, 1)
    other = DINOHead(16, 40, 32, 8)
    other.load_state_dict(sd)
    torch.testing.assert_close(other(x), head(x), atol=1e-6, rtol=1e-5)
    # A gain other than 1 loads into a learned-gain head (and scales its logits), not into a fixed one.
    sd["last_layer.weight_g"] = torch.full((40, 1), 2.0)
    learned = DINOHead(16, 40, 32, 8)
    learned.load_state_dict(sd)
    torch.testing.assert_close(learned(x), 2.0 * head(x), atol=1e-6, rtol=1e-5)
    with pytest.raises(RuntimeError, match="gain is not 1"):
        DINOHead(16, 40, 32, 8, last_layer_gain="fixed").load_state_dict(sd)
    sd["last_layer.weight_g"] = torch.ones(40, 1)
    fixed = DINOHead(16, 40, 32, 8, last_layer_gain="fixed")
    fixed.load_state_dict(sd)
    torch.testing.assert_close(fixed(x), head(x), atol=1e-6, rtol=1e-5)


def test_head_bad_input():
    with pytest.raises(ValueError, match="nlayers"):
        DINOHead(8, 10, nlayers=0)
    with pytest.raises(ValueError, match="last dim 8"):
        DINOHead(8, 10, 16, 4)(torch.randn(2, 7))


# ----------------------------------------------------------------------------- DINO loss
def _dino_reference(students, teachers, temp, n_global):
    """Explicit double loop over (student crop, teacher crop) pairs, skipping same views."""
    total, pairs = 0.0, 0
    for i, s in enumerate(students):
        for j, t in enumerate(teachers):
            if i < n_global and i == j:
                continue
            log_p = torch.log_softmax(s.double() / temp, dim=-1)
            per_sample = [-(t[b].double() * log_p[b]).sum() for b in range(s.shape[0])]
            total += sum(per_sample) / len(per_sample)
            pairs += 1
    return total / pairs, pairs


def _teacher_probs(n, b, k, seed):
    return [torch.softmax(torch.randn(b, k, generator=_gen(seed + i)) / 0.3, dim=-1) for i in range(n)]


@pytest.mark.parametrize("n_local", [0, 3])
def test_dino_loss_matches_pair_loop(n_local):
    b, k = 5, 17
    students = [torch.randn(b, k, generator=_gen(10 + i)) for i in range(2 + n_local)]
    teachers = _teacher_probs(2, b, k, 100)
    loss = DINOLoss(student_temp=0.1)(students, teachers)
    expected, pairs = _dino_reference(students, teachers, 0.1, n_global=2)
    assert pairs == dino_pair_count(2 + n_local, 2, 2) == 2 + 2 * n_local
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # Tensor inputs [n_crops*B, K] give the same value; "sum" is mean * pairs.
    loss_t = DINOLoss()(torch.cat(students), torch.cat(teachers))
    assert loss_t.item() == pytest.approx(loss.item(), rel=1e-6)
    loss_sum = DINOLoss()(students, teachers, reduction="sum")
    assert loss_sum.item() == pytest.approx(loss.item() * pairs, rel=1e-6)


@pytest.mark.parametrize("n_local", [0, 3])
def test_dino_loss_gradients_match_the_pair_loop_for_tensor_and_list_inputs(n_local):
    b, k = 4, 23
    base = torch.randn((2 + n_local) * b, k, generator=_gen(30), dtype=torch.float64)
    teachers = _teacher_probs(2, b, k, 200)
    ref_in = base.clone().requires_grad_(True)
    expected, _ = _dino_reference(list(ref_in.split(b)), teachers, 0.1, n_global=2)
    expected.backward()
    for as_tensor in (True, False):
        x = base.float().requires_grad_(True)
        loss = DINOLoss(student_temp=0.1)(x if as_tensor else list(x.split(b)), teachers)
        loss.backward()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        assert torch.allclose(x.grad.double(), ref_in.grad, rtol=1e-4, atol=1e-7), as_tensor


def test_dino_loss_local_only_and_no_same_view_rule():
    b, k = 4, 11
    teachers = _teacher_probs(2, b, k, 200)
    locals_ = [torch.randn(b, k, generator=_gen(30 + i)) for i in range(3)]
    loss = DINOLoss()(locals_, teachers, n_global_student_crops=0)
    expected, pairs = _dino_reference(locals_, teachers, 0.1, n_global=0)
    assert pairs == 6 and loss.item() == pytest.approx(expected.item(), rel=1e-5)

    # Student global crop 0 must not see teacher crop 0: its gradient ignores that target.
    s0 = torch.randn(b, k, generator=_gen(40), requires_grad=True)
    s1 = torch.randn(b, k, generator=_gen(41))
    grads = []
    for t0 in (teachers[0], torch.softmax(torch.randn(b, k, generator=_gen(42)), dim=-1)):
        s0.grad = None
        DINOLoss()([s0, s1], [t0, teachers[1]]).backward()
        grads.append(s0.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    assert torch.isfinite(grads[0]).all() and grads[0].abs().sum() > 0


def test_dino_loss_low_precision_and_errors():
    b, k = 3, 9
    students = [torch.randn(b, k, generator=_gen(50 + i)) for i in range(4)]
    teachers = _teacher_probs(2, b, k, 300)
    ref = DINOLoss()(students, teachers)
    for dtype in (torch.bfloat16, torch.float16):
        s = [x.to(dtype).requires_grad_() for x in students]
        out = DINOLoss()(s, [t.to(dtype) for t in teachers])
        assert out.dtype == torch.float32
        assert out.item() == pytest.approx(ref.item(), rel=2e-2)
        out.backward()
        assert all(torch.isfinite(x.grad.float()).all() for x in s)
    with pytest.raises(ValueError, match="student crop 1"):
        DINOLoss()([students[0], torch.randn(b, k + 1)], teachers)
    with pytest.raises(ValueError, match="no valid"):
        DINOLoss()([students[0]], teachers[:1])
    with pytest.raises(ValueError, match="not a multiple"):
        DINOLoss()(torch.randn(7, k), torch.cat(teachers))
    with pytest.raises(ValueError, match="student_temp"):
        DINOLoss(student_temp=0.0)


# ----------------------------------------------------------------------------- iBOT loss
def _ibot_reference(student_all, teacher_all, masks, temp, divide_by_all_images):
    """Per image: mean CE over its masked patches; summed over images."""
    total, masked_images = 0.0, 0
    for img in range(masks.shape[0]):
        idx = [p for p in range(masks.shape[1]) if masks[img, p]]
        if not idx:
            continue
        masked_images += 1
        ces = []
        for p in idx:
            log_p = torch.log_softmax(student_all[img, p].double() / temp, dim=-1)
            ces.append(-(teacher_all[img, p].double() * log_p).sum())
        total += sum(ces) / len(ces)
    return total / (masks.shape[0] if divide_by_all_images else masked_images)


def test_ibot_loss_weighting_matches_reference_loop():
    n_img, n_patch, k = 6, 10, 13
    masks = torch.zeros(n_img, n_patch, dtype=torch.bool)
    masks[0, [1, 2, 3]] = True
    masks[2, [0]] = True
    masks[3, :7] = True  # images 1, 4, 5 are not masked
    student_all = torch.randn(n_img, n_patch, k, generator=_gen(60))
    teacher_all = torch.softmax(torch.randn(n_img, n_patch, k, generator=_gen(61)) / 0.2, dim=-1)
    weights = masked_patch_weights(masks)
    assert weights.shape == (11,)
    torch.testing.assert_close(weights[:3], torch.full((3,), 1 / 3))
    assert weights[3].item() == 1.0
    torch.testing.assert_close(weights[4:], torch.full((7,), 1 / 7))

    s, t = student_all[masks], teacher_all[masks]
    loss = iBOTPatchLoss(0.1)(s, t, weights)
    expected = _ibot_reference(student_all, teacher_all, masks, 0.1, divide_by_all_images=False)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss_ref = iBOTPatchLoss(0.1).forward_masked(s, t, masks)
    expected_ref = _ibot_reference(student_all, teacher_all, masks, 0.1, divide_by_all_images=True)
    assert loss_ref.item() == pytest.approx(expected_ref.item(), rel=1e-5)

    # Padded gathers (fixed upper bound of rows) are cut back to the real count.
    pad_s = torch.cat([s, torch.randn(5, k)])
    pad_t = torch.cat([t, torch.softmax(torch.randn(5, k), dim=-1)])
    padded = iBOTPatchLoss(0.1).forward_masked(pad_s, pad_t, masks, n_masked_patches=s.shape[0])
    assert padded.item() == pytest.approx(loss_ref.item(), rel=1e-6)


def test_ibot_loss_gradients_empty_and_errors():
    masks = torch.zeros(2, 5, dtype=torch.bool)
    masks[1, 1:4] = True
    s = torch.randn(3, 7, generator=_gen(70)).to(torch.bfloat16).requires_grad_()
    t = torch.softmax(torch.randn(3, 7, generator=_gen(71)), dim=-1).to(torch.bfloat16)
    loss = iBOTPatchLoss()(s, t, masked_patch_weights(masks))
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(s.grad.float()).all() and s.grad.float().abs().sum() > 0
    # Nothing masked: zero loss that still backpropagates.
    empty = torch.zeros(0, 7, requires_grad=True)
    zero = iBOTPatchLoss()(empty, torch.zeros(0, 7), torch.zeros(0))
    zero.backward()
    assert zero.item() == 0.0
    with pytest.raises(ValueError, match="must all match"):
        iBOTPatchLoss()(torch.randn(3, 7), torch.randn(3, 7), torch.ones(2))
    with pytest.raises(ValueError, match="bool"):
        masked_patch_weights(torch.ones(2, 3))


# ----------------------------------------------------------------------------- KoLeo
def _koleo_reference(x: np.ndarray, eps: float = 1e-8) -> float:
    """Explicit nearest-neighbour distances in float64."""
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)
    logs = []
    for i in range(len(x)):
        nearest = min(np.linalg.norm(x[i] - x[j]) for j in range(len(x)) if j != i)
        logs.append(math.log(nearest + eps))
    return -sum(logs) / len(logs)


def test_koleo_matches_nearest_neighbour_loop_per_chunk():
    feats = torch.randn(12, 8, generator=_gen(80))
    koleo = KoLeoLoss()
    loss = koleo(feats)
    assert loss.item() == pytest.approx(_koleo_reference(feats.numpy().astype(np.float64)), rel=1e-5)
    chunked = koleo(feats, n_chunks=2)
    expected = sum(_koleo_reference(c.numpy().astype(np.float64)) for c in feats.chunk(2))
    assert chunked.item() == pytest.approx(expected, rel=1e-5)
    # Scale invariance (features are normalised) and fp32 compute for bf16 inputs.
    assert koleo(feats * 7.0).item() == pytest.approx(loss.item(), rel=1e-5)
    low = koleo(feats.to(torch.bfloat16))
    assert low.dtype == torch.float32 and low.item() == pytest.approx(loss.item(), rel=2e-2)
    assert koleo.guard_counts == {"duplicates": 0, "batch_lt_2": 0}


def test_koleo_gradient_pushes_neighbours_apart():
    feats = torch.randn(6, 4, generator=_gen(81), requires_grad=True)
    KoLeoLoss()(feats).backward()
    assert torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0
    with torch.no_grad():
        stepped = feats - 0.05 * feats.grad
    assert KoLeoLoss()(stepped).item() < KoLeoLoss()(feats).item()


def test_koleo_duplicates_are_finite_and_warn_once():
    base = torch.randn(5, 6, generator=_gen(82))
    feats = torch.cat([base, base[:2]]).requires_grad_()  # two exact duplicate pairs
    koleo = KoLeoLoss()
    with pytest.warns(RuntimeWarning, match="duplicate"):
        loss = koleo(feats)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(feats.grad).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # second trigger: counted, not warned again
        koleo(feats.detach())
    assert koleo.guard_counts["duplicates"] == 2
    # All rows identical (collapsed features) is also finite.
    same = torch.ones(4, 3, requires_grad=True)
    with pytest.warns(RuntimeWarning):
        collapsed = KoLeoLoss()(same)
    collapsed.backward()
    assert torch.isfinite(collapsed) and torch.isfinite(same.grad).all()


def test_koleo_batch_of_one_is_zero_and_finite():
    one = torch.randn(1, 5, requires_grad=True)
    koleo = KoLeoLoss()
    with pytest.warns(RuntimeWarning, match="no nearest neighbour"):
        loss = koleo(one)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(one.grad).all()
    # Two chunks of one row each (batch 2 split per crop).
    two = torch.randn(2, 5, requires_grad=True)
    assert koleo(two, n_chunks=2).item() == 0.0
    assert koleo.guard_counts["batch_lt_2"] == 3
    with pytest.raises(ValueError, match="chunks"):
        koleo(torch.randn(5, 3), n_chunks=2)


# ----------------------------------------------------------------------------- Sinkhorn-Knopp
def _sinkhorn_numpy(logits: np.ndarray, temp: float, n_iter: int) -> np.ndarray:
    """The algorithm written out plainly on the K x B matrix, float64."""
    q = np.exp(logits.astype(np.float64) / temp).T  # K x B
    k, b = q.shape
    q = q / q.sum()
    for _ in range(n_iter):
        for r in range(k):
            q[r, :] = q[r, :] / q[r, :].sum() / k
        for c in range(b):
            q[:, c] = q[:, c] / q[:, c].sum() / b
    return (q * b).T


@pytest.mark.parametrize("n_iter", [0, 1, 3])
def test_sinkhorn_matches_numpy(n_iter):
    logits = torch.randn(16, 40, generator=_gen(90))
    out = sinkhorn_knopp(logits, teacher_temp=0.5, n_iterations=n_iter)
    expected = _sinkhorn_numpy(logits.numpy(), 0.5, n_iter)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-7)
    if n_iter > 0:
        torch.testing.assert_close(out.sum(dim=1), torch.ones(16))


def test_sinkhorn_balances_prototypes_and_is_stable():
    logits = torch.randn(32, 8, generator=_gen(91)) * 2
    logits[:, 0] += 3  # one prototype dominates the raw softmax
    balanced = sinkhorn_knopp(logits, 0.5, n_iterations=200)
    torch.testing.assert_close(balanced.sum(dim=0), torch.full((8,), 32 / 8), atol=1e-4, rtol=0)
    # Shifting all logits is a no-op, even far past exp overflow (exp(4096 / 0.04)).  Logits
    # on a 1/64 grid so that the shifted values are exact in fp32.
    logits = torch.round(logits * 64) / 64
    base = sinkhorn_knopp(logits, 0.04)
    shifted = sinkhorn_knopp(logits + 4096, 0.04)
    assert torch.isfinite(shifted).all()
    torch.testing.assert_close(shifted, base, atol=1e-6, rtol=1e-4)
    # Huge spreads underflow some entries but never produce NaN; rows still sum to 1.
    spread = sinkhorn_knopp(logits * 1e3, 0.04)
    assert torch.isfinite(spread).all()
    torch.testing.assert_close(spread.sum(dim=1), torch.ones(32))
    # bf16 logits are computed in fp32.
    low = sinkhorn_knopp(logits.to(torch.bfloat16), 0.5)
    assert low.dtype == torch.float32
    np.testing.assert_allclose(
        low.numpy(), _sinkhorn_numpy(logits.to(torch.bfloat16).float().numpy(), 0.5, 3), rtol=1e-5, atol=1e-7
    )
    with pytest.raises(ValueError, match="2-D"):
        sinkhorn_knopp(torch.randn(3), 0.1)
    with pytest.raises(ValueError, match="teacher_temp"):
        sinkhorn_knopp(torch.randn(3, 4), 0.0)


# ----------------------------------------------------------------------------- softmax centering
def test_softmax_center_probs_and_update():
    k = 12
    center = SoftmaxCenter(k, momentum=0.9)
    a = torch.randn(5, k, generator=_gen(100))
    b = torch.randn(7, k, generator=_gen(101))
    torch.testing.assert_close(center.probs(a, 0.07), torch.softmax(a / 0.07, dim=-1))
    center.update(a)
    expected = 0.1 * a.mean(dim=0, keepdim=True)
    torch.testing.assert_close(center.center, expected)
    torch.testing.assert_close(center.probs(b, 0.04), torch.softmax((b - expected) / 0.04, dim=-1))
    center.update(b.to(torch.bfloat16), async_op=True)  # applied lazily, here at state_dict()
    expected = 0.9 * expected + 0.1 * b.to(torch.bfloat16).float().mean(dim=0, keepdim=True)
    sd = center.state_dict()
    assert list(sd) == ["center"] and sd["center"].dtype == torch.float32
    torch.testing.assert_close(sd["center"], expected)
    restored = SoftmaxCenter(k)
    restored.load_state_dict(sd)
    torch.testing.assert_close(restored.probs(a, 0.07), center.probs(a, 0.07))
    with pytest.raises(ValueError, match="prototypes"):
        center.update(torch.randn(3, k + 1))
    with pytest.raises(ValueError, match="momentum"):
        SoftmaxCenter(k, momentum=1.5)
