"""Typed training configuration (``dinov2 train -c configs/train/<name>.yaml key=value …``).

Loaded with :func:`dinov2.utils.config.load_config`, so unknown keys and wrong types are errors
naming the key; :meth:`TrainConfig.validate` checks cross-field constraints.
Defaults are the DINOv2 ViT-S/14-style reference values (see reference-facts.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from dinov2.data.loader import DataConfig
from dinov2.models.head import LastLayerGain, LastLayerInit
from dinov2.models.vit import POS_EMBED_INITS, ClsTokenInit
from dinov2.train.distill import DistillConfig, distill_config_errors
from dinov2.train.param_groups import FreezeMode, WeightDecayExemption
from dinov2.train.phases import PhasesConfig, phases_config_errors
from dinov2.train.schedules import TeacherTempWarmup
from dinov2.train.slurm import SlurmLauncherConfig
from dinov2.train.ssl_meta_arch import ClipRule
from dinov2.utils.config import ConfigError, load_config


@dataclass
class ModelConfig:
    arch: str = "vit_small"  # vit_tiny | vit_small | vit_base | vit_large | vit_giant2
    patch_size: int = 14
    img_size: int = 0  # position grid size; 0 → the global crop size
    # 0 / "" keep the arch's value (lets tiny configs shrink a named arch)
    embed_dim: int = 0
    depth: int = 0
    num_heads: int = 0
    ffn_layer: str = ""  # "" → arch default; mlp | swiglufused
    layerscale: Optional[float] = 1.0e-5  # null → no LayerScale (original DINO)
    num_register_tokens: int = 0
    drop_path_rate: float = 0.3
    drop_path_uniform: bool = True
    # trunc_normal (reference, std 0.02) | sincos (2-D sin-cos start, still learned; MoCo v3 / MAE).
    # Only the initial values differ: checkpoints keep the official layout either way.
    pos_embed_init: str = "trunc_normal"
    cls_token_init: ClsTokenInit = ClsTokenInit.small_normal  # small_normal (DINOv2) | trunc_normal (DINO)
    # Initialise the student (and teacher) backbone from a checkpoint (ours or official layout).
    pretrained: str = ""


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


@dataclass
class LossConfig:
    dino_weight: float = 1.0
    ibot_weight: float = 1.0  # 0 → no iBOT (no masking of the student's global crops)
    koleo_weight: float = 0.1  # 0 → no KoLeo
    centering: str = "softmax"  # softmax | sinkhorn_knopp
    center_momentum: float = 0.9
    sinkhorn_iterations: int = 3
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30.0
    # per_iteration (DINOv2) | per_epoch (DINO: the temperature steps once per epoch)
    teacher_temp_warmup: TeacherTempWarmup = TeacherTempWarmup.per_iteration


@dataclass
class OptimConfig:
    epochs: int = 100
    epoch_length: int = 1250  # OFFICIAL_EPOCH_LENGTH: iterations per "epoch"
    max_steps: int = 0  # > 0: stop after this many steps (schedules still span `epochs`)
    base_lr: float = 0.004
    lr_scaling: str = "sqrt_wrt_1024"  # sqrt_wrt_1024 | linear_wrt_256 | none
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


@dataclass
class ComputeConfig:
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    fsdp: bool = True  # shard with FSDP2 whenever a process group is up
    activation_checkpointing: bool = False
    compile: bool = False
    num_threads: int = 0  # torch intra-op threads; 0 → torch default
    deterministic: bool = False  # torch.use_deterministic_algorithms (CUDA needs CUBLAS env)


@dataclass
class CheckpointConfig:
    every_n_steps: int = 1250
    keep_last: int = 3  # 0 → keep all
    save_final: bool = True


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


@dataclass
class TrainSection:
    output_dir: str = ""
    seed: int = 0
    log_every: int = 1
    progress: bool = True  # tqdm bar on rank 0
    tensorboard: bool = True  # only if tensorboard is installed
    launcher: str = "local"  # local: train in this process (torchrun/srun for several) | slurm: submit via submitit


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
    phases: PhasesConfig = field(default_factory=PhasesConfig)  # high-resolution finishing (phases.py)
    distill: DistillConfig = field(default_factory=DistillConfig)  # frozen-teacher distillation (distill.py)
    slurm: SlurmLauncherConfig = field(default_factory=SlurmLauncherConfig)  # resources for train.launcher=slurm

    def validate(self) -> None:
        err = []
        if not self.train.output_dir:
            err.append("train.output_dir must be set (where checkpoints and metrics go)")
        if self.train.launcher not in ("local", "slurm"):
            err.append(f"train.launcher must be local|slurm, got {self.train.launcher!r}")
        if self.model.pos_embed_init not in POS_EMBED_INITS:
            err.append(f"model.pos_embed_init must be one of {'|'.join(POS_EMBED_INITS)}, "
                       f"got {self.model.pos_embed_init!r}")
        if self.loss.centering not in ("softmax", "sinkhorn_knopp"):
            err.append(f"loss.centering must be softmax|sinkhorn_knopp, got {self.loss.centering!r}")
        if self.compute.precision not in ("auto", "fp32", "bf16", "fp16"):
            err.append(f"compute.precision must be auto|fp32|bf16|fp16, got {self.compute.precision!r}")
        if self.compute.device not in ("auto", "cpu", "cuda"):
            err.append(f"compute.device must be auto|cpu|cuda, got {self.compute.device!r}")
        if self.optim.lr_scaling not in ("sqrt_wrt_1024", "linear_wrt_256", "none"):
            err.append(f"optim.lr_scaling must be sqrt_wrt_1024|linear_wrt_256|none, got {self.optim.lr_scaling!r}")
        if self.optim.epochs <= 0 or self.optim.epoch_length <= 0:
            err.append("optim.epochs and optim.epoch_length must be > 0")
        if self.optim.warmup_epochs > self.optim.epochs:
            err.append("optim.warmup_epochs exceeds optim.epochs")
        for name in ("dino_weight", "ibot_weight", "koleo_weight"):
            if getattr(self.loss, name) < 0:
                err.append(f"loss.{name} must be >= 0")
        if self.loss.dino_weight == 0 and self.loss.ibot_weight == 0:
            err.append("loss.dino_weight and loss.ibot_weight are both 0: nothing to learn")
        crop = _global_crop_size(self.data)
        if crop is not None and crop % self.model.patch_size:
            err.append(f"global crop size {crop} is not a multiple of model.patch_size {self.model.patch_size}")
        if self.data.patch_size != self.model.patch_size:
            err.append(f"data.patch_size {self.data.patch_size} != model.patch_size {self.model.patch_size} "
                       "(the iBOT masks must use the model's patch grid)")
        if self.checkpoint.every_n_steps <= 0:
            err.append("checkpoint.every_n_steps must be > 0")
        if self.eval.every_n_steps > 0 and not (self.eval.train_dir and self.eval.val_dir):
            err.append("eval.every_n_steps > 0 needs eval.train_dir and eval.val_dir")
        if self.eval.crop_size % self.model.patch_size:
            err.append(f"eval.crop_size {self.eval.crop_size} is not a multiple of model.patch_size")
        err += phases_config_errors(self) + distill_config_errors(self)
        if err:
            raise ConfigError("invalid training config: " + "; ".join(err))
        if self.data.sources:
            self.data.validate()

    @property
    def total_steps(self) -> int:
        full = self.optim.epochs * self.optim.epoch_length
        return min(full, self.optim.max_steps) if self.optim.max_steps > 0 else full


def _global_crop_size(data) -> int | None:
    crops = getattr(data, "crops", None)
    return getattr(crops, "global_crops_size", None) if crops is not None else None


def global_crop_size(cfg: TrainConfig) -> int:
    size = _global_crop_size(cfg.data)
    if size is None:
        raise ConfigError("data.crops.global_crops_size is missing")
    return int(size)


def load_train_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    return load_config(TrainConfig, path, overrides)
