"""DINO / iBOT projection head: MLP -> L2 normalise -> weight-normalised prototypes."""
from __future__ import annotations

import math
from enum import Enum
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DINOHead", "LastLayerGain", "LastLayerInit", "WeightNormLinear"]


class LastLayerInit(str, Enum):
    """Initial prototype directions (rows are normalised, so only their spread matters for AdamW)."""

    linear_default = "linear_default"  # both references: nn.Linear's default, U(+-1/sqrt(in)), row norm ~0.577
    trunc_normal = "trunc_normal"  # std 0.02 like the MLP, row norm ~0.02*sqrt(in): turns ~2-3x faster


class LastLayerGain(str, Enum):
    """The weight-norm magnitude ``g`` of the prototype layer."""

    learned = "learned"  # DINOv2 (always), DINO with norm_last_layer=False: a trained [out, 1] parameter, init 1
    fixed = "fixed"  # DINO with norm_last_layer=True (its default): g = 1, not a parameter


class WeightNormLinear(nn.Module):
    """Bias-free linear layer ``g * v / ||v||`` (row-wise), i.e. ``weight_norm(nn.Linear(in, out, bias=False))``.

    The direction ``weight`` (``v`` in weight-norm terms) is an ordinary parameter
    ``[out_features, in_features]``; with ``learn_gain`` the magnitude ``weight_g`` is a second one,
    ``[out_features, 1]`` and initialised to 1 (as both references fill it), otherwise ``g`` is
    fixed at 1.  FSDP2 ``fully_shard`` shards both like any weight (the norm is taken after the
    all-gather, in the forward) and ``torch.distributed.checkpoint`` saves them as plain tensors,
    with no parametrization hooks or derived ``weight`` to go stale.

    Reference state dicts (``weight_v``/``weight_g`` keys) load; a fixed-gain layer accepts them
    only when every ``g`` is 1 (the only value it can represent).
    """

    def __init__(self, in_features: int, out_features: int, learn_gain: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.learn_gain = learn_gain
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default
        self.weight_g = nn.Parameter(torch.ones(out_features, 1)) if learn_gain else None
        self._register_load_state_dict_pre_hook(self._accept_weight_norm_keys)

    def extra_repr(self) -> str:
        gain = "learned" if self.learn_gain else "1 (fixed)"
        return f"in_features={self.in_features}, out_features={self.out_features}, g={gain}"

    def normalized_weight(self) -> torch.Tensor:
        # Norm in fp32 (fp16 squares overflow / underflow).  torch._weight_norm is the fused kernel behind
        # nn.utils weight norm: one pass each way over the [out, in] matrix (65536 x 256 in the reference
        # heads), where norm + broadcast divide materialises several full-size temporaries in backward
        # (bench/RESULTS.md has the timing).  An all-zero row (training never
        # produces one) would give NaN, and the non-finite-loss guard then stops the run.
        w = self.weight.float()
        g = self.weight_g.float() if self.weight_g is not None else w.new_ones(w.shape[0], 1)
        return torch._weight_norm(w, g, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast F.linear recasts both operands itself; otherwise follow x's dtype.
        return F.linear(x, self.normalized_weight().to(x.dtype))

    def _accept_weight_norm_keys(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool, missing: list,
        unexpected: list, error_msgs: list,
    ) -> None:
        v_key, g_key = prefix + "weight_v", prefix + "weight_g"
        if v_key in state_dict:
            state_dict[prefix + "weight"] = state_dict.pop(v_key)
        if self.learn_gain or g_key not in state_dict:
            return  # a learned gain loads as its own parameter (missing → the usual strict error)
        g = state_dict.pop(g_key)
        if g is not None and isinstance(g, torch.Tensor) and not torch.allclose(g.float(), torch.ones_like(g.float())):
            error_msgs.append(
                f"{g_key}: weight-norm gain is not 1 (min {g.min().item():.4g}, max {g.max().item():.4g}); "
                "this head keeps g fixed at 1 and cannot represent it"
            )
            return


class DINOHead(nn.Module):
    """Projection head used by the DINO (CLS) and iBOT (patch) losses.

    ``nlayers``-layer MLP ``in_dim -> hidden_dim -> ... -> bottleneck_dim`` with GELU
    between layers, L2 normalisation, then ``last_layer`` (a :class:`WeightNormLinear`
    to ``out_dim`` prototypes).  MLP linears use truncated-normal(std 0.02) weights
    and zero biases; the prototype layer keeps ``nn.Linear``'s default init and a learned gain
    (both references' DINOv2 layout) unless ``last_layer_init`` / ``last_layer_gain`` say otherwise.
    Parameters of the last layer have "last_layer" in their name so the trainer can freeze them
    during the first epoch.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        mlp_bias: bool = True,
        use_bn: bool = False,
        last_layer_init: LastLayerInit | str = LastLayerInit.linear_default,
        last_layer_gain: LastLayerGain | str = LastLayerGain.learned,
    ) -> None:
        super().__init__()
        self.last_layer_init = LastLayerInit(last_layer_init)  # ValueError names a bad choice
        gain = LastLayerGain(last_layer_gain)
        if min(in_dim, out_dim, hidden_dim, bottleneck_dim) <= 0:
            raise ValueError(
                f"DINOHead: dimensions must be > 0 (in {in_dim}, out {out_dim}, hidden {hidden_dim}, "
                f"bottleneck {bottleneck_dim})"
            )
        if nlayers < 1:
            raise ValueError(f"DINOHead: nlayers must be >= 1, got {nlayers}")
        self.in_dim, self.out_dim, self.bottleneck_dim = in_dim, out_dim, bottleneck_dim
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(pairwise(dims)):
            if i > 0:
                if use_bn:  # the reference's use_bn layout: Linear → BatchNorm1d → GELU
                    layers.append(nn.BatchNorm1d(d_in))
                layers.append(nn.GELU())
            layers.append(nn.Linear(d_in, d_out, bias=mlp_bias))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, learn_gain=gain is LastLayerGain.learned)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # Rows are normalised in the forward, but their initial norm is the scale AdamW's fixed-size steps
        # act against: the references' nn.Linear default (row norm sqrt(1/3) ~ 0.577) turns the prototypes
        # ~1.8x (bottleneck 256) to 2.6x (128) slower than trunc-normal(0.02).
        if self.last_layer_init is LastLayerInit.linear_default:
            nn.init.kaiming_uniform_(self.last_layer.weight, a=math.sqrt(5))
        else:
            nn.init.trunc_normal_(self.last_layer.weight, std=0.02)
        if self.last_layer.weight_g is not None:
            nn.init.ones_(self.last_layer.weight_g)

    def forward_bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised bottleneck features ``[..., bottleneck_dim]``."""
        x = self.mlp(x)
        # fp16 cannot represent 1e-12: use a floor it can hold.
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        return F.normalize(x, p=2, dim=-1, eps=eps)

    def forward(self, x: torch.Tensor, split_at: int | None = None):
        """Prototype scores ``[N, out_dim]``; with ``split_at=n``, the pair (rows ``:n``, rows ``n:``).

        The split form serves callers that batch two kinds of tokens (CLS and masked patches) through
        one head call: the MLP runs once on all rows and the prototype layer once per part, so the
        large ``[N, out_dim]`` scores are never sliced (slicing makes autograd allocate and fill a
        full-size zero gradient per slice).  It is still one ``forward`` call, which FSDP2 hooks.
        """
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"DINOHead: expected features with last dim {self.in_dim}, got {tuple(x.shape)}")
        h = self.forward_bottleneck(x)
        if split_at is None:
            return self.last_layer(h)
        weight = self.last_layer.normalized_weight().to(h.dtype)
        return F.linear(h[:split_at], weight), F.linear(h[split_at:], weight)
