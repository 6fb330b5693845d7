"""Student / EMA-teacher pair with DINO + iBOT heads and the DINOv2 objective.

``student`` and ``teacher`` are ``nn.ModuleDict``s with ``backbone``, ``dino_head`` and, when the
iBOT head is separate, ``ibot_head``; their parameter names are the names used in checkpoints and
parameter groups.  The objective per step (local batch of B images, 2 global + n_local crops):

* DINO: cross-entropy between the student's head outputs on all crops and the teacher's centred
  outputs on the two global crops (no same-view pairs), averaged over pairs;
* iBOT: the student sees its global crops with masked patches replaced by the mask token and
  predicts the teacher's centred patch outputs (teacher sees the unmasked crops) on those patches;
* KoLeo (weight 0.1) on the student's backbone CLS of each global crop chunk.

Teacher targets are centred by Sinkhorn-Knopp (3 iterations) or softmax centering (EMA center).

Sharding (``parallelize``) follows the torchtitan order: activation checkpointing → compile →
``fully_shard`` per block → ``fully_shard`` on each root module; the teacher is sharded the same
way, so its EMA update is a local ``_foreach`` over matching shards.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dinov2.loss.centering import SoftmaxCenter, sinkhorn_knopp
from dinov2.loss.dino import DINOLoss
from dinov2.loss.ibot import iBOTPatchLoss, masked_patch_weights
from dinov2.loss.koleo import KoLeoLoss
from dinov2.models.checkpoint import load_pretrained
from dinov2.models.config import build_backbone  # noqa: F401  (re-exported for the trainer)
from dinov2.models.head import DINOHead
from dinov2.train.config import Centering, ClipRule, HeadConfig, LossConfig, ModelConfig, Precision
from dinov2.train.metrics import feature_std, mean_entropy, prototype_usage_entropy


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a (possibly DTensor) parameter, as a plain tensor sharing storage."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


@dataclass
class StepOutput:
    loss: torch.Tensor  # total (differentiable)
    terms: dict[str, torch.Tensor]  # detached loss terms (0-d, on the device)
    stats: dict[str, torch.Tensor]  # monitors (teacher entropy, feature std, ...); only when asked for


@dataclass
class MaskLayout:
    """iBOT masks of the global crops, with the flat indices of the masked patches and their loss
    weights computed on the host (by the collate, or here from CPU masks), so gathering the masked
    tokens by index needs no device→host sync the way ``tokens[masks]`` does."""

    masks: torch.Tensor  # [n_images, n_patches] bool, on the device
    indices: torch.Tensor  # [n_masked] long: row-major positions (the order of tokens[masks])
    weights: torch.Tensor  # [n_masked] float: 1 / (#masked patches of the image)

    @property
    def count(self) -> int:
        return int(self.indices.shape[0])  # a shape: known on the host

    def gather(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.flatten(0, 1).index_select(0, self.indices)

    @staticmethod
    def from_batch(batch: dict[str, Any], device: torch.device) -> MaskLayout:
        masks = batch["collated_masks"].flatten(1).bool()
        idx, weights = batch.get("mask_indices_list"), batch.get("masks_weight")
        if idx is None or weights is None:
            host = masks.cpu()  # no-op (no sync) for the loaders' CPU masks
            idx = host.flatten().nonzero().flatten()
            weights = masked_patch_weights(host)
        return MaskLayout(masks.to(device, non_blocking=True), idx.to(device, non_blocking=True),
                          weights.to(device, non_blocking=True))


class SSLMetaArch(nn.Module):
    """``teacher_source``: a frozen teacher (``backbone`` + heads, see dinov2.train.distill) that
    produces the targets instead of the EMA teacher; ``self.teacher`` is then the student's EMA."""

    def __init__(self, model: ModelConfig, head: HeadConfig, loss: LossConfig, global_crop_size: int,
                 teacher_source: nn.ModuleDict | None = None):
        super().__init__()
        self.loss_cfg = loss
        self.use_ibot = loss.ibot_weight > 0
        self.use_koleo = loss.koleo_weight > 0
        self.separate_ibot_head = self.use_ibot and head.ibot_separate_head

        def make(drop_path: float) -> nn.ModuleDict:
            backbone = build_backbone(model, global_crop_size, drop_path)
            d = backbone.embed_dim
            kw = dict(use_bn=head.use_bn, last_layer_init=head.last_layer_init, last_layer_gain=head.last_layer_gain)
            mods = {
                "backbone": backbone,
                "dino_head": DINOHead(d, head.dino_out_dim, head.dino_hidden_dim, head.dino_bottleneck_dim,
                                      head.dino_nlayers, **kw),
            }
            if self.separate_ibot_head:
                mods["ibot_head"] = DINOHead(d, head.ibot_out_dim, head.ibot_hidden_dim, head.ibot_bottleneck_dim,
                                             head.ibot_nlayers, **kw)
            return nn.ModuleDict(mods)

        self.student = make(model.drop_path_rate)
        self.teacher = make(0.0)  # the teacher never drops paths
        if model.pretrained:
            pre = load_pretrained(model.pretrained)
            missing, unexpected = self.student["backbone"].load_state_dict(pre.state_dict(), strict=False)
            if unexpected or [k for k in missing if "mask_token" not in k]:
                raise ValueError(f"model.pretrained {model.pretrained}: does not fit the configured backbone "
                                 f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad_(False)

        self.dino_loss = DINOLoss(loss.student_temp)
        self.ibot_loss = iBOTPatchLoss(loss.student_temp)
        self.koleo_loss = KoLeoLoss(lazy_guards=True)
        self.frozen_teacher = teacher_source  # not in checkpoints: rebuilt from its file on every start
        if teacher_source is not None:
            teacher_source.eval()
            teacher_source.requires_grad_(False)
        self.centers = nn.ModuleDict()
        if loss.centering == Centering.softmax:
            self.centers["dino"] = SoftmaxCenter(head.dino_out_dim, loss.center_momentum)
            if self.use_ibot:
                out = head.ibot_out_dim if self.separate_ibot_head else head.dino_out_dim
                self.centers["ibot"] = SoftmaxCenter(out, loss.center_momentum)
        self.num_layers = len(self.student["backbone"].blocks)
        self.autocast_dtype: torch.dtype | None = None  # set by parallelize for non-FSDP low precision

    # ------------------------------------------------------------------ state
    def center_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: c.center for k, c in self.centers.items()}

    def load_center_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, c in self.centers.items():
            c.center.copy_(state[k])

    # ---------------------------------------------------------------- targets
    def _center(self, name: str, logits: torch.Tensor, temp: float) -> torch.Tensor:
        if self.loss_cfg.centering == Centering.sinkhorn_knopp:
            return sinkhorn_knopp(logits, temp, self.loss_cfg.sinkhorn_iterations)
        center = self.centers[name]
        probs = center.probs(logits, temp)
        center.update(logits)
        return probs

    @torch.no_grad()
    def _teacher_targets(self, global_crops: torch.Tensor, masks: MaskLayout | None, temp: float):
        teacher = self.teacher if self.frozen_teacher is None else self.frozen_teacher
        out = teacher["backbone"](global_crops, is_training=True)
        cls = out["x_norm_clstoken"]
        masked = masks.gather(out["x_norm_patchtokens"]) if masks is not None else None
        if masked is not None and not self.separate_ibot_head:
            # One head call for CLS and masked patches (shared head), then split.
            cls_logits, patch_logits = teacher["dino_head"](torch.cat([cls, masked]), split_at=cls.shape[0])
        else:
            cls_logits = teacher["dino_head"](cls)
            patch_logits = teacher["ibot_head"](masked) if masked is not None else None
        cls_probs = self._center("dino", cls_logits.float(), temp)
        patch_probs = self._center("ibot", patch_logits.float(), temp) if patch_logits is not None else None
        return cls, cls_probs, patch_probs

    # ------------------------------------------------------------------- step
    def forward_loss(self, batch: dict[str, Any], teacher_temp: float, with_stats: bool = True) -> StepOutput:
        device = next(self.student.parameters()).device
        global_crops = batch["collated_global_crops"].to(device, non_blocking=True)
        local_crops = batch.get("collated_local_crops")
        if local_crops is not None and local_crops.numel() == 0:
            local_crops = None
        if local_crops is not None:
            local_crops = local_crops.to(device, non_blocking=True)
        n_global = 2
        if global_crops.shape[0] % n_global:
            raise ValueError(f"global crops batch {global_crops.shape[0]} is not 2 × batch size")
        masks = MaskLayout.from_batch(batch, device) if self.use_ibot else None

        with self._autocast(device):
            t_cls, t_cls_probs, t_patch_probs = self._teacher_targets(global_crops, masks, teacher_temp)

            images = [global_crops] + ([local_crops] if local_crops is not None else [])
            mask_list = [masks.masks if masks is not None else None] + ([None] if local_crops is not None else [])
            outs = self.student["backbone"](images, mask_list, is_training=True)
            s_cls_g = outs[0]["x_norm_clstoken"]
            s_cls_all = torch.cat([s_cls_g] + ([outs[1]["x_norm_clstoken"]] if local_crops is not None else []))
            s_masked = masks.gather(outs[0]["x_norm_patchtokens"]) if masks is not None else None
            if s_masked is not None and not self.separate_ibot_head:
                s_cls_logits, s_patch_logits = self.student["dino_head"](torch.cat([s_cls_all, s_masked]),
                                                                         split_at=s_cls_all.shape[0])
            else:
                s_cls_logits = self.student["dino_head"](s_cls_all)
                s_patch_logits = self.student["ibot_head"](s_masked) if s_masked is not None else None

        terms: dict[str, torch.Tensor] = {}
        total = s_cls_logits.new_zeros((), dtype=torch.float32)
        if self.loss_cfg.dino_weight > 0:
            dino = self.dino_loss(s_cls_logits.float(), list(t_cls_probs.chunk(n_global)))
            terms["dino_loss"] = dino.detach()
            total = total + self.loss_cfg.dino_weight * dino
        if self.use_ibot:
            if masks.count > 0:
                ibot = self.ibot_loss(s_patch_logits.float(), t_patch_probs, masks.weights,
                                      n_images=masks.masks.shape[0])
            else:  # no masked patch on this rank: keep the head in the graph with a zero term
                ibot = s_patch_logits.float().sum() * 0.0
            terms["ibot_loss"] = ibot.detach()
            total = total + self.loss_cfg.ibot_weight * ibot
        if self.use_koleo:
            koleo = self.koleo_loss(s_cls_g.float(), n_chunks=n_global)
            terms["koleo_loss"] = koleo.detach()
            total = total + self.loss_cfg.koleo_weight * koleo
        terms["total_loss"] = total.detach()

        stats: dict[str, torch.Tensor] = {}
        if with_stats:  # monitors cost kernels: only on the steps that log them
            with torch.no_grad():
                stats = {
                    "teacher_entropy": mean_entropy(t_cls_probs),
                    "teacher_usage_entropy": prototype_usage_entropy(t_cls_probs),
                    "teacher_feature_std": feature_std(t_cls),
                    "student_feature_std": feature_std(s_cls_g),
                    "n_masked_patches": total.new_full((), float(masks.count if masks is not None else 0)),
                    "max_entropy": total.new_full((), math.log(t_cls_probs.shape[1])),
                }
        return StepOutput(total, terms, stats)

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return torch.autocast(device_type=device.type, enabled=False)
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    # -------------------------------------------------------------------- EMA
    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        s_params, t_params = [], []
        for (sn, sp), (tn, tp) in zip(self.student.named_parameters(), self.teacher.named_parameters()):
            if sn != tn:
                raise RuntimeError(f"student/teacher parameter mismatch: {sn} vs {tn}")
            s_params.append(_local(sp.detach()))
            t_params.append(_local(tp))
        # t ← t + (1 - m)(s - t): one pass over the parameters (mul_ + add_ took two).
        torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)

    # ------------------------------------------------------------- gradients
    def last_layer_params(self) -> list[nn.Parameter]:
        return [p for n, p in self.student.named_parameters() if "last_layer" in n]

    def clip_gradients(self, max_norm: float, rule: ClipRule | str = ClipRule.per_module) -> dict[str, torch.Tensor]:
        """Clip with ``rule`` (``max_norm <= 0``: no clipping); returns each module's pre-clip norm (0-d
        tensors on the device: reading them is left to the trainer's sync steps)."""
        rule = ClipRule(rule)
        norms = {}
        for name, module in self.student.items():
            params = [p for p in module.parameters() if p.grad is not None]
            if not params:
                continue
            if rule is ClipRule.per_parameter:
                norm = clip_per_parameter_(params, max_norm).square().sum().sqrt()
            elif max_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            if hasattr(norm, "full_tensor"):
                norm = norm.full_tensor()
            norms[f"grad_norm_{name}"] = norm
        return norms


def clip_per_parameter_(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale each gradient by ``min(1, max_norm / (||g|| + 1e-6))`` (DINO's rule); returns the pre-clip norms.

    FSDP2 shards each gradient: local sums of squares are summed over ranks in one all-reduce, so every
    rank scales its shard by the coefficient of the whole tensor.  ``max_norm <= 0`` only measures.
    """
    grads = [_local(p.grad) for p in params]
    sq = torch.stack([n.float() for n in torch._foreach_norm(grads)]).square()
    if any(hasattr(p.grad, "_local_tensor") for p in params) and dist.is_initialized():
        dist.all_reduce(sq)
    norms = sq.sqrt()
    if max_norm > 0:
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, list(coef.to(grads[0].dtype).unbind()))  # stays on the device
    return norms


# ---------------------------------------------------------------- parallelize
def _checkpointed_forward(orig_forward, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(orig_forward, *args, use_reentrant=False, **kwargs)


def parallelize(arch: SSLMetaArch, device: torch.device, precision: Precision | str, use_fsdp: bool,
                activation_checkpointing: bool = False, compile_blocks: bool = False) -> None:
    """Move to ``device`` and apply AC → compile → FSDP2 (per block, then each root module)."""
    arch.to(device)
    precision = Precision(precision)
    if precision == Precision.auto:
        precision = Precision.bf16 if device.type == "cuda" else Precision.fp32
    low = {Precision.fp32: None, Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}[precision]

    for part in (arch.student, arch.teacher):
        blocks = part["backbone"].blocks
        for blk in blocks:
            if activation_checkpointing and part is arch.student:
                # Instance-level forward override keeps parameter names unchanged (no wrapper module).
                blk.forward = functools.partial(_checkpointed_forward, blk.forward)
            if compile_blocks:
                blk.compile()

    if use_fsdp and dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        mp = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32) if low is not None else None
        kw = {"mesh": mesh}
        if mp is not None:
            kw["mp_policy"] = mp
        for part in (arch.student, arch.teacher):
            # The teacher runs forward only (no backward to trigger resharding): its roots must
            # reshard after forward too, so the EMA update always sees matching local shards.
            reshard_root = part is arch.teacher
            for blk in part["backbone"].blocks:
                fully_shard(blk, **kw)
            for name, module in part.items():
                fully_shard(module, reshard_after_forward=reshard_root, **kw)
        # FSDP casts parameters itself; autocast stays on so fp32 islands (losses) stay fp32.
        arch.autocast_dtype = low
    else:
        if dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError("compute.fsdp=false with several processes is not supported (use FSDP2)")
        arch.autocast_dtype = low
