"""DINO / iBOT projection head: MLP -> L2 normalise -> weight-normalised prototypes."""
from __future__ import annotations

import math
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DINOHead", "WeightNormLinear"]


class WeightNormLinear(nn.Module):
    """Bias-free linear layer whose rows are rescaled to unit L2 norm in every forward.

    Equivalent to ``weight_norm(nn.Linear(in, out, bias=False))`` with the gain ``g``
    fixed at 1 (not trained).  The direction ``weight`` (``v`` in weight-norm terms)
    is a single ordinary parameter ``[out_features, in_features]``: FSDP2
    ``fully_shard`` shards it like any weight (the norm is taken after the
    all-gather, in the forward) and ``torch.distributed.checkpoint`` saves it as a
    plain tensor, with no parametrization hooks or derived ``weight`` to go stale.

    Loading a reference state dict with ``weight_v``/``weight_g`` keys is accepted
    when every ``g`` is 1 (the only value this layer can represent).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default
        self._register_load_state_dict_pre_hook(self._accept_weight_norm_keys)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, g=1 (fixed)"

    def normalized_weight(self) -> torch.Tensor:
        # Norm in fp32 (fp16 squares overflow / underflow).  torch._weight_norm is the fused kernel behind
        # nn.utils weight norm: one pass each way over the [out, in] matrix (65536 x 256 in the reference
        # heads), where norm + broadcast divide materialises several full-size temporaries in backward
        # (bench/RESULTS.md has the timing).  An all-zero row (training never
        # produces one) would give NaN, and the non-finite-loss guard then stops the run.
        w = self.weight.float()
        return torch._weight_norm(w, w.new_ones(w.shape[0], 1), 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast F.linear recasts both operands itself; otherwise follow x's dtype.
        return F.linear(x, self.normalized_weight().to(x.dtype))

    @staticmethod
    def _accept_weight_norm_keys(
        state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool, missing: list, unexpected: list,
        error_msgs: list,
    ) -> None:
        v_key, g_key = prefix + "weight_v", prefix + "weight_g"
        if v_key not in state_dict:
            return
        g = state_dict.pop(g_key, None)
        if g is not None and isinstance(g, torch.Tensor) and not torch.allclose(g.float(), torch.ones_like(g.float())):
            error_msgs.append(
                f"{g_key}: weight-norm gain is not 1 (min {g.min().item():.4g}, max {g.max().item():.4g}); "
                "this head keeps g fixed at 1 and cannot represent it"
            )
            return
        state_dict[prefix + "weight"] = state_dict.pop(v_key)


class DINOHead(nn.Module):
    """Projection head used by the DINO (CLS) and iBOT (patch) losses.

    ``nlayers``-layer MLP ``in_dim -> hidden_dim -> ... -> bottleneck_dim`` with GELU
    between layers, L2 normalisation, then ``last_layer`` (a :class:`WeightNormLinear`
    to ``out_dim`` prototypes).  MLP linears use truncated-normal(std 0.02) weights
    and zero biases.  Parameters of the last layer have "last_layer" in their name
    so the trainer can freeze them during the first epoch.
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
    ) -> None:
        super().__init__()
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
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # The prototype directions only need a scale-free init (rows are normalised);
        # truncated normal keeps one init rule for the whole head.
        nn.init.trunc_normal_(self.last_layer.weight, std=0.02)

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
