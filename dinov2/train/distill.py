"""Distillation of a frozen large teacher into a smaller student (DINOv2 paper, "distillation").

Config (``distill.teacher_checkpoint: ""`` → normal SSL training)::

    distill:
      teacher_checkpoint: /ckpt/dinov2_vitg14_pretrain.pth   # official/exported .pth, or a run /
                                                              # ckpt folder of ours
      teacher_heads: auto        # auto | checkpoint | random_frozen

The objective is the usual DINO + iBOT + KoLeo, with the targets computed by the frozen teacher
(backbone + heads, never updated: no EMA, no gradient).  The student still keeps an EMA copy of
itself — in distillation mode ``arch.teacher`` *is* that student EMA (same shapes as the student,
updated by ``update_teacher`` as usual) — so checkpoints, evaluation during training and
``dinov2 export`` (which read ``teacher.backbone.*``) all see the student EMA, the model the paper
keeps.  The frozen teacher is a *teacher source* handed to ``SSLMetaArch(..., teacher_source=…)``
(built by :func:`load_frozen_teacher`); it lives in ``arch.frozen_teacher`` and is *not* written
into checkpoints: it is rebuilt deterministically from ``teacher_checkpoint`` on every (re)start.

Teacher heads (the teacher-side DINO / iBOT projection heads that produce the prototype scores):

* ``checkpoint`` — loaded from one of our training checkpoints (``teacher.dino_head.*`` and, if
  present, ``teacher.ibot_head.*``): the reference setting, where the teacher keeps its own frozen
  pretrained heads.  Their prototype count must equal ``head.dino_out_dim`` / ``head.ibot_out_dim``.
* ``random_frozen`` — for backbone-only files (official checkpoints have no heads): heads of the
  configured shape, initialised from a fixed seed (``train.seed``) and frozen.  Chosen over training
  the teacher heads jointly because a head trained without its own EMA/SSL signal can drift or
  collapse (nothing anchors it), whereas a fixed random MLP on the frozen teacher's features is a
  stable, information-preserving target: the centred, sharpened prototype scores keep the
  teacher's neighbourhood structure, which is what the student has to copy.  It is also
  reproducible on resume without storing anything.  The random head sees the teacher features
  *standardised over the global batch* (per dimension, CLS and patch tokens separately, sums
  all-reduced across ranks), so the random projection spreads the images by how they differ rather
  than by the features' common mean: with the supervised tiny teacher of bench/distill_learning.py
  the mutual information between image and target within a batch (prototype-usage entropy minus
  mean target entropy, teacher temperature 0.04) rose from 0.92 to 1.26 nats.
* ``auto`` — ``checkpoint`` when the teacher source is a run/checkpoint folder holding heads whose
  shapes fit, else ``random_frozen``.

The teacher's patch size must equal the student's when iBOT is on (the masked patch targets are
taken at the same grid positions).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dinov2.models.checkpoint import load_pretrained
from dinov2.models.formats.files import is_hf_folder
from dinov2.models.head import DINOHead
from dinov2.train.checkpoint import read_checkpoint_tensors, resolve_checkpoint
from dinov2.models.run_folder import run_hints
from dinov2.train.config import TeacherHeads, TrainConfig

log = logging.getLogger("dinov2.train.distill")


def _head_shape(state: dict[str, torch.Tensor]) -> tuple[int, int, int, int, int]:
    """(in_dim, out_dim, hidden_dim, bottleneck_dim, nlayers) of a DINOHead state dict."""
    # Linear weights only (2-D): a use_bn head also has 1-D BatchNorm weights under mlp.N.weight.
    idx = sorted(int(m.group(1)) for k, v in state.items()
                 if (m := re.fullmatch(r"mlp\.(\d+)\.weight", k)) and v.ndim == 2)
    if not idx:
        raise ValueError("head state has no mlp.*.weight tensors")
    first, last = state[f"mlp.{idx[0]}.weight"], state[f"mlp.{idx[-1]}.weight"]
    ll = state.get("last_layer.weight", state.get("last_layer.weight_v"))
    if ll is None:
        raise ValueError("head state has no last_layer.weight")
    hidden = first.shape[0] if len(idx) > 1 else 1
    return first.shape[1], ll.shape[0], hidden, last.shape[0], len(idx)


def batch_standardize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``(x - mean) / std`` per feature over the rows of the *global* batch (all ranks)."""
    xf = x.float()
    stats = torch.stack([xf.sum(0), (xf * xf).sum(0)])
    count = torch.tensor(float(x.shape[0]), device=x.device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stats)
        dist.all_reduce(count)
    if count < 2:  # a single row has no spread to standardise
        return x
    mean = stats[0] / count
    var = (stats[1] / count - mean * mean).clamp_min(0.0)
    return ((xf - mean) * torch.rsqrt(var + eps)).to(x.dtype)


class FrozenRandomHead(nn.Module):
    """A seeded, frozen :class:`DINOHead` applied to batch-standardised teacher features."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    @property
    def out_dim(self) -> int:
        return self.head.out_dim

    def forward(self, x: torch.Tensor, split_at: int | None = None) -> torch.Tensor:
        if split_at is None:
            return self.head(batch_standardize(x))
        # CLS rows and masked-patch rows have different statistics: standardise each on its own.
        # (All ranks must call the all-reduce the same number of times, empty parts included.)
        z = torch.cat([batch_standardize(x[:split_at]), batch_standardize(x[split_at:])])
        return self.head(z, split_at=split_at)


def _head_from_state(state: dict[str, torch.Tensor], what: str) -> DINOHead:
    in_dim, out_dim, hidden, bottleneck, nlayers = _head_shape(state)
    use_bn = any(k.endswith("running_mean") for k in state)
    gain = "learned" if "last_layer.weight_g" in state else "fixed"
    head = DINOHead(in_dim, out_dim, hidden if nlayers > 1 else 2048, bottleneck, nlayers, use_bn=use_bn,
                    last_layer_gain=gain)
    head.load_state_dict(state, strict=True)
    log.info("distill: %s loaded from the teacher checkpoint (in %d, out %d)", what, in_dim, out_dim)
    return head


def load_frozen_teacher(cfg: TrainConfig, use_ibot: bool, separate_ibot_head: bool) -> nn.ModuleDict:
    """The frozen teacher: ``backbone``, ``dino_head`` and (if separate) ``ibot_head``.

    Draws no numbers from the global RNG (seeded heads use a forked one), so building it before the
    student leaves the student's initialisation as without distillation."""
    with torch.random.fork_rng(devices=[]):
        teacher = _load_frozen_teacher(cfg, use_ibot, separate_ibot_head)
    n_t = sum(p.numel() for p in teacher.parameters())
    log.info("distill: frozen teacher %.1fM params (the student EMA is what checkpoints and export keep)",
             n_t / 1e6)
    return teacher


def _load_frozen_teacher(cfg: TrainConfig, use_ibot: bool, separate_ibot_head: bool) -> nn.ModuleDict:
    d, h = cfg.distill, cfg.head
    src = Path(d.teacher_checkpoint)
    heads: dict[str, dict[str, torch.Tensor]] = {}
    if src.is_dir() and not is_hf_folder(src):  # a run / checkpoint folder of ours (with heads)
        tensors = read_checkpoint_tensors(src, "teacher.")
        # Head count / position-resize mode of the teacher run: its config, not the width's defaults.
        backbone = load_pretrained({k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")},
                                   **run_hints(resolve_checkpoint(src)))
        for name in ("dino_head", "ibot_head"):
            sub = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            if sub:
                heads[name] = sub
    else:
        backbone = load_pretrained(src)
    if use_ibot and backbone.patch_size != cfg.model.patch_size:
        raise ValueError(f"distill: teacher patch size {backbone.patch_size} != student model.patch_size "
                         f"{cfg.model.patch_size} (iBOT targets need the same patch grid; set loss.ibot_weight=0 "
                         f"to distil across patch sizes)")
    dim = backbone.embed_dim

    wanted = {"dino_head": h.dino_out_dim}
    if separate_ibot_head:
        wanted["ibot_head"] = h.ibot_out_dim
    mods: dict[str, nn.Module] = {"backbone": backbone}
    for name, out_dim in wanted.items():
        state = heads.get(name)
        fits = state is not None and _head_shape(state)[:2] == (dim, out_dim)
        if d.teacher_heads == TeacherHeads.checkpoint and not fits:
            raise ValueError(f"distill.teacher_heads=checkpoint: {src} has no teacher {name} with input dim {dim} "
                             f"and {out_dim} prototypes" + (f" (found {_head_shape(state)[:2]})" if state else ""))
        if fits and d.teacher_heads != TeacherHeads.random_frozen:
            mods[name] = _head_from_state(state, name)
        else:
            # Fixed seed, isolated from the training RNG: identical on every rank and every restart.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.train.seed * 7919 + (1 if name == "ibot_head" else 0) + 12345)
                # Frozen, so the row scale is irrelevant; this init keeps the seeded heads as they were.
                fixed = dict(last_layer_init="trunc_normal", last_layer_gain="fixed")
                if name == "dino_head":
                    head = DINOHead(dim, out_dim, h.dino_hidden_dim, h.dino_bottleneck_dim, h.dino_nlayers, **fixed)
                else:
                    head = DINOHead(dim, out_dim, h.ibot_hidden_dim, h.ibot_bottleneck_dim, h.ibot_nlayers, **fixed)
                mods[name] = FrozenRandomHead(head)
            log.info("distill: %s of the teacher is a frozen random head (seeded)", name)
    teacher = nn.ModuleDict(mods)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher

