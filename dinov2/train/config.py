"""Typed training configuration (``dinov2 train -c configs/train/<name>.yaml key=value …``).

Loaded with :func:`dinov2.utils.config.load_config`, so unknown keys and wrong types (including a
value outside an enum's members) are errors naming the key.  Each section checks its own fields
(``errors()``); :meth:`TrainConfig.validate` only adds the checks that span sections.  This module
imports configuration only, never the trainer's runtime code, so every trainer module may import it.
Defaults are the DINOv2 ViT-S/14-style reference values (see reference-facts.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Sequence

from dinov2.data.loader import DataConfig
from dinov2.models.config import ModelConfig  # noqa: F401  (the model section, composed here)
from dinov2.models.head import LastLayerGain, LastLayerInit
from dinov2.run.config import Launcher, SlurmLauncherConfig
from dinov2.utils.config import ConfigError, load_config


class Centering(str, Enum):
    softmax = "softmax"
    sinkhorn_knopp = "sinkhorn_knopp"


class LrScaling(str, Enum):
    sqrt_wrt_1024 = "sqrt_wrt_1024"
    linear_wrt_256 = "linear_wrt_256"
    none = "none"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(str, Enum):
    auto = "auto"  # bf16 on CUDA, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class TeacherHeads(str, Enum):
    auto = "auto"  # checkpoint when the source holds heads that fit, else random_frozen
    checkpoint = "checkpoint"
    random_frozen = "random_frozen"


class WeightDecayExemption(str, Enum):
    """Which parameters get no weight decay."""

    dinov2 = "dinov2"  # DINOv2 reference: names ending ".bias" or containing "norm" / "gamma"; tokens and g decay
    dino = "dino"  # DINO reference: ".bias" or any 1-D tensor; tokens (3-D) and the [out, 1] gain decay
    dinov2_and_tokens = "dinov2_and_tokens"  # timm/MAE style: dinov2's set plus the tokens (the old default)


class FreezeMode(str, Enum):
    """How the head's last layer is held still during ``freeze_last_layer_epochs``."""

    # DINOv2 reference: LR 0 only.  The gradient stays (and counts in the clip norm), so AdamW's moments
    # and step count keep real statistics for the moment it thaws; LR 0 also stops the decoupled decay.
    lr_zero = "lr_zero"
    # DINO reference: the gradient is dropped after clipping, so AdamW skips the tensors: moments and step
    # count stay exactly as they were (zero) until the first unfrozen step.
    drop_grad = "drop_grad"


class ClipRule(str, Enum):
    """What one ``optim.clip_grad`` bound applies to."""

    per_module = "per_module"  # DINOv2 reference: one norm per student module (backbone, each head)
    per_parameter = "per_parameter"  # DINO reference: every parameter tensor on its own


class TeacherTempWarmup(str, Enum):
    per_iteration = "per_iteration"  # DINOv2 reference: one value per iteration
    per_epoch = "per_epoch"  # DINO reference: the value steps once per epoch (linspace over epochs)


@dataclass
class HeadConfig:
    dino_out_dim: int = 65536
    dino_hidden_dim: int = 2048
    dino_bottleneck_dim: int = 256
    dino_nlayers: int = 3
    # BatchNorm1d between the head MLP's layers (the reference DINOHead's use_bn; off in the
    # DINOv2 recipes).  Batch statistics are per rank (not synchronised); with the shared iBOT head
    # they are taken over the CLS and masked-patch rows together.
    use_bn: bool = False
    # Prototype layer (both heads): the references keep nn.Linear's init and (DINOv2; DINO with
    # norm_last_layer=False) learn the weight-norm gain g.  DINO's default norm_last_layer=True is "fixed".
    last_layer_init: LastLayerInit = LastLayerInit.linear_default
    last_layer_gain: LastLayerGain = LastLayerGain.learned
    ibot_separate_head: bool = False
    ibot_out_dim: int = 65536
    ibot_hidden_dim: int = 2048
    ibot_bottleneck_dim: int = 256
    ibot_nlayers: int = 3

    def errors(self) -> list[str]:
        return [f"head.{n} must be > 0" for n in ("dino_out_dim", "ibot_out_dim", "dino_nlayers", "ibot_nlayers")
                if getattr(self, n) <= 0]


@dataclass
class LossConfig:
    dino_weight: float = 1.0
    ibot_weight: float = 1.0  # 0 → no iBOT (no masking of the student's global crops)
    koleo_weight: float = 0.1  # 0 → no KoLeo
    centering: Centering = Centering.softmax
    center_momentum: float = 0.9
    sinkhorn_iterations: int = 3
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30.0
    # per_iteration (DINOv2) | per_epoch (DINO: the temperature steps once per epoch)
    teacher_temp_warmup: TeacherTempWarmup = TeacherTempWarmup.per_iteration

    def errors(self) -> list[str]:
        err = [f"loss.{n} must be >= 0" for n in ("dino_weight", "ibot_weight", "koleo_weight") if getattr(self, n) < 0]
        if self.dino_weight == 0 and self.ibot_weight == 0:
            err.append("loss.dino_weight and loss.ibot_weight are both 0: nothing to learn")
        return err


@dataclass
class OptimConfig:
    epochs: int = 100
    epoch_length: int = 1250  # OFFICIAL_EPOCH_LENGTH: iterations per "epoch"
    max_steps: int = 0  # > 0: stop after this many steps (schedules still span `epochs`)
    base_lr: float = 0.004
    lr_scaling: LrScaling = LrScaling.sqrt_wrt_1024
    min_lr: float = 1.0e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999
    clip_grad: float = 3.0  # 0 → no clipping
    clip_grad_rule: ClipRule = ClipRule.per_module  # per_module (DINOv2) | per_parameter (DINO)
    freeze_last_layer_epochs: float = 1.0
    freeze_last_layer_mode: FreezeMode = FreezeMode.lr_zero  # lr_zero (DINOv2) | drop_grad (DINO)
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    wd_exemption: WeightDecayExemption = WeightDecayExemption.dinov2  # dinov2 | dino | dinov2_and_tokens

    def errors(self) -> list[str]:
        err = []
        if self.epochs <= 0 or self.epoch_length <= 0:
            err.append("optim.epochs and optim.epoch_length must be > 0")
        if self.warmup_epochs > self.epochs:
            err.append("optim.warmup_epochs exceeds optim.epochs")
        return err


@dataclass
class ComputeConfig:
    device: Device = Device.auto
    precision: Precision = Precision.auto
    fsdp: bool = True  # shard with FSDP2 whenever a process group is up
    activation_checkpointing: bool = False
    compile: bool = False
    num_threads: int = 0  # torch intra-op threads; 0 → torch default
    deterministic: bool = False  # torch.use_deterministic_algorithms (CUDA needs CUBLAS env)

    def errors(self) -> list[str]:
        return ["compute.num_threads must be >= 0"] if self.num_threads < 0 else []


@dataclass
class CheckpointConfig:
    every_n_steps: int = 1250
    keep_last: int = 3  # 0 → keep all (the newest verified checkpoint is always kept)
    save_final: bool = True

    def errors(self) -> list[str]:
        err = ["checkpoint.every_n_steps must be > 0"] if self.every_n_steps <= 0 else []
        return err + (["checkpoint.keep_last must be >= 0"] if self.keep_last < 0 else [])


@dataclass
class EvalConfig:
    every_n_steps: int = 0  # 0 → only when called explicitly / at the end if at_end
    at_end: bool = False
    train_dir: str = ""
    val_dir: str = ""
    resize_size: int = 256
    crop_size: int = 224
    batch_size: int = 64
    num_workers: int = 0
    ks: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    temperature: float = 0.07
    linear: bool = False

    def errors(self) -> list[str]:
        if self.every_n_steps > 0 and not (self.train_dir and self.val_dir):
            return ["eval.every_n_steps > 0 needs eval.train_dir and eval.val_dir"]
        return []


@dataclass
class TrainSection:
    output_dir: str = ""
    seed: int = 0
    log_every: int = 1  # metrics row (and the only per-step host sync) every this many steps
    progress: bool = True  # tqdm bar on rank 0
    tensorboard: bool = True  # only if tensorboard is installed
    launcher: Launcher = Launcher.local

    def errors(self) -> list[str]:
        err = [] if self.output_dir else ["train.output_dir must be set (where checkpoints and metrics go)"]
        return err + (["train.log_every must be > 0"] if self.log_every <= 0 else [])


@dataclass
class HighResPhaseConfig:
    """Optional high-resolution finishing phase (dinov2.train.phases)."""

    steps: int = 0  # 0 → no high-resolution phase
    global_crops_size: int = 0  # 0 → 1.5 × the main phase's size, rounded to a patch multiple
    local_crops_size: int = 0  # 0 → main phase's size
    base_lr: float = 0.0  # 0 → the main schedule's LR at the end of the main phase (before scaling)
    min_lr: float = 1.0e-6
    warmup_steps: int = 0
    batch_size: int = 0  # per rank; 0 → main phase's batch size

    def errors(self) -> list[str]:
        if self.steps < 0:
            return [f"phases.highres.steps must be >= 0, got {self.steps}"]
        if self.steps == 0:
            return []
        err = [f"phases.highres.{n} must be >= 0" for n in
               ("global_crops_size", "local_crops_size", "batch_size", "warmup_steps") if getattr(self, n) < 0]
        if self.warmup_steps > self.steps:
            err.append(f"phases.highres.warmup_steps {self.warmup_steps} exceeds phases.highres.steps {self.steps}")
        if self.base_lr < 0 or self.min_lr < 0:
            err.append("phases.highres.base_lr and min_lr must be >= 0")
        return err


@dataclass
class PhasesConfig:
    highres: HighResPhaseConfig = field(default_factory=HighResPhaseConfig)

    def errors(self) -> list[str]:
        return self.highres.errors()


@dataclass
class DistillConfig:
    """Frozen-teacher distillation (dinov2.train.distill); "" → normal SSL training."""

    teacher_checkpoint: str = ""  # official/exported .pth, or a run / ckpt folder of ours
    teacher_heads: TeacherHeads = TeacherHeads.auto

    def errors(self) -> list[str]:
        if not self.teacher_checkpoint:
            return []
        p = Path(self.teacher_checkpoint)
        if not p.exists():
            return [f"distill.teacher_checkpoint {self.teacher_checkpoint} does not exist"]
        if self.teacher_heads == TeacherHeads.checkpoint and not p.is_dir():
            return [("distill.teacher_heads=checkpoint needs a run or checkpoint folder of ours as "
                     "distill.teacher_checkpoint (weight files have no heads)")]
        return []


@dataclass
class TrainConfig:
    train: TrainSection = field(default_factory=TrainSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    phases: PhasesConfig = field(default_factory=PhasesConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    slurm: SlurmLauncherConfig = field(default_factory=SlurmLauncherConfig)  # for train.launcher=slurm

    def validate(self) -> None:
        err: list[str] = []
        for section in (self.train, self.model, self.head, self.loss, self.optim, self.compute, self.checkpoint,
                        self.eval, self.phases, self.distill, self.slurm):
            err += section.errors()
        err += self._cross_section_errors()
        if err:
            raise ConfigError("invalid training config: " + "; ".join(err))
        if self.data.sources:
            self.data.validate()

    def _cross_section_errors(self) -> list[str]:
        err = []
        patch = self.model.patch_size
        crop = self.data.crops.global_crops_size
        if patch > 0 and crop % patch:
            err.append(f"global crop size {crop} is not a multiple of model.patch_size {patch}")
        if self.data.patch_size != patch:
            err.append(f"data.patch_size {self.data.patch_size} != model.patch_size {patch} "
                       "(the iBOT masks must use the model's patch grid)")
        if patch > 0 and self.eval.crop_size % patch:
            err.append(f"eval.crop_size {self.eval.crop_size} is not a multiple of model.patch_size")
        h = self.phases.highres
        if h.steps > 0 and patch > 0 and h.global_crops_size % patch:
            err.append(f"phases.highres.global_crops_size {h.global_crops_size} is not a multiple of "
                       f"model.patch_size {patch}")
        if h.steps > 0 and not self.checkpoint.save_final:
            err.append("phases.highres.steps > 0 needs checkpoint.save_final=true (phase 2 starts from the "
                       "main phase's final checkpoint)")
        return err

    @property
    def total_steps(self) -> int:
        full = self.optim.epochs * self.optim.epoch_length
        return min(full, self.optim.max_steps) if self.optim.max_steps > 0 else full

    @property
    def global_crop_size(self) -> int:
        return int(self.data.crops.global_crops_size)


def global_crop_size(cfg: TrainConfig) -> int:
    return cfg.global_crop_size


def load_train_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    return load_config(TrainConfig, path, overrides)
