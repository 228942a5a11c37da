"""The one config schema of the examples: every key, its type and its default, as dataclasses.

A YAML config (after ``_base_`` merging and ``key=value`` overrides, see ``config.load_config``) is checked against
the dataclass of its task (:class:`ClassificationConfig`, :class:`DetectionConfig`) by :func:`resolve`: an unknown
key is an error naming the closest valid key, a value of the wrong type is an error naming the key, a value
outside its range (``log_every: 0``, ``epochs: -1``, ``amp: fp8``; the ``metadata`` of the field:
:func:`at_least`, :func:`one_of`) is an error naming the key, and every missing key gets its default here.
``resolve`` returns a plain nested dict (what the trainers read, and what ``config.yaml`` in a run's output
holds), so no ``.get(key, default)`` is needed anywhere else.

Both tasks share :class:`TrainConfig` (the ``train`` section: loop, batch, optimizer, schedule, AMP, DDP, logging,
checkpoints) and the ``distill`` section (:class:`DistillConfig`: ``method``, a name from
``examples.common.methods.METHODS``, and one sub-section per loss). Batch size: ``train.batch_size`` is the
**global** batch in both tasks (all processes together; each process gets batch_size / world_size), and the
learning rate is ``train.lr * batch_size / train.base_batch`` (linear scaling).
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

__all__ = ["TrainConfig", "DistillConfig", "ClassificationConfig", "DetectionConfig", "resolve", "schema_keys",
           "ConfigError"]


class ConfigError(ValueError):
    """A config key is unknown or has a value of the wrong type or outside its range."""


def at_least(lo: float, *, strict: bool = False, at_most: Optional[float] = None) -> dict:
    """Field metadata: the value (each item of a list) must be >= ``lo`` (> with ``strict``) and <= ``at_most``;
    None passes where the type allows it."""
    return {"min": lo, "strict": strict, "max": at_most}


def one_of(*choices: str) -> dict:
    """Field metadata: the value must be one of ``choices``."""
    return {"choices": choices}


def _ranged(default, check: dict, **kw):
    return field(default=default, metadata=check, **kw)


# ------------------------------------------------------------------------------------------------ shared sections
@dataclass
class TrainConfig:
    """``train``: the common trainer (``examples.common.trainer``)."""
    device: str = _ranged("auto", one_of("auto", "cuda", "cpu"))
    seed: int = _ranged(0, at_least(0))
    amp: str = _ranged("none", one_of("none", "bf16", "fp16"))  # fp16 with a grad scaler
    epochs: int = _ranged(1, at_least(1))
    batch_size: int = _ranged(64, at_least(1))  # GLOBAL batch: all processes together
    base_batch: Optional[int] = _ranged(None, at_least(1))  # lr = lr * batch_size / base_batch (None: no scaling)
    lr: float = _ranged(0.1, at_least(0.0))
    optimizer: str = _ranged("sgd", one_of("sgd", "adamw"))
    momentum: float = _ranged(0.9, at_least(0.0))
    nesterov: bool = False
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = _ranged(0.0, at_least(0.0))
    scheduler: str = _ranged("multistep", one_of("multistep", "cosine"))  # x gamma at milestones | to min_lr_ratio
    milestones: List[int] = field(default_factory=list, metadata=at_least(0))   # epochs
    gamma: float = _ranged(0.1, at_least(0.0))
    min_lr_ratio: float = _ranged(0.0, at_least(0.0))
    warmup_epochs: float = _ranged(0.0, at_least(0.0))  # linear warm-up length in epochs ...
    warmup_iters: int = _ranged(0, at_least(0))       # ... or in iterations (not both)
    warmup_factor: float = _ranged(0.001, at_least(0.0, strict=True, at_most=1.0))  # lr factor, first warm-up step
    clip_grad_norm: Optional[float] = _ranged(None, at_least(0.0, strict=True))
    compile: bool = False
    channels_last: bool = True               # CUDA only
    sync_bn: bool = False                    # nn.SyncBatchNorm (CUDA)
    find_unused_parameters: bool = False
    progress: bool = True                    # tqdm bar on rank 0
    tensorboard: bool = True                 # TensorBoard events beside metrics.jsonl
    log_every: int = _ranged(20, at_least(1))  # iterations between logged (process-averaged) loss terms
    eval_every: int = _ranged(1, at_least(1))  # epochs between evaluations (and always after the last one)
    eval_batch_size: Optional[int] = _ranged(None, at_least(1))  # per process (None: the training batch)
    checkpoint_every: Optional[int] = _ranged(None, at_least(1))  # iterations between mid-epoch checkpoints
    steps_per_epoch: Optional[int] = _ranged(None, at_least(1))  # cap (smoke runs)
    stop_after_epochs: Optional[int] = _ranged(None, at_least(1))  # stop cleanly (checkpointed) after N epochs
    stop_after_iters: Optional[int] = _ranged(None, at_least(0))  # ... or iterations (0: checkpoint, stop)
    debug_exit_at_step: Optional[int] = _ranged(None, at_least(1))  # testing: os._exit(3) after this step
    # files loaded with full unpickling (weights_only=False), which can run code stored in them: list only files
    # you trust (``--trust-checkpoint FILE`` adds one); every other file loads with weights_only=True
    trusted_checkpoints: List[str] = field(default_factory=list)


@dataclass
class KDConfig:
    temperature: float = 4.0
    weight: float = 1.0


@dataclass
class DKDConfig:
    alpha: float = 1.0
    beta: float = 8.0
    temperature: float = 4.0
    weight: float = 1.0
    warmup_epochs: float = 0.0   # classification: factor min(epoch / warmup_epochs, 1), 1-based epoch
    warmup_iters: int = 0        # detection: factor min((iteration + 1) / warmup_iters, 1)


@dataclass
class NKDConfig:
    temperature: float = 1.0
    gamma: float = 1.5
    weight: float = 1.0


@dataclass
class FitNetConfig:
    weight: float = 1.0
    layer: str = "last"
    projector: Optional[str] = "conv1x1"


@dataclass
class WKDLConfig:
    cost: Any = None                      # class-distance file (or tensor); required by WKD-L
    kappa: float = 1.0                    # sharpening, wkd_kernels.sharpen (0: none)
    temperature: Optional[float] = None   # required
    weight: Optional[float] = None        # required: the loss's gamma
    decay_start: Optional[float] = None   # E0 of cosine_weight (classification); null: constant
    reg: float = 0.05
    num_iters: int = 10
    log_domain: bool = False


@dataclass
class WKDFConfig:
    weight: Optional[float] = None        # required: the loss factor
    mean_cov_ratio: float = 2.0
    grid: int = 1                         # the library's default; every ImageNet config states 4 explicitly
    projector: Optional[str] = "bottleneck"   # see wkd_kernels.losses.make_projector
    hidden_channels: int = 256
    layer: str = "last"
    decay_start: Optional[float] = None
    covariance: str = "diag"
    eps: float = 1e-5
    method: str = "newton_schulz"
    num_iters: Optional[int] = None
    path: str = "auto"


@dataclass
class DistillConfig:
    """``distill``: ``method`` picks the loss terms (``examples.common.methods``); only its sub-sections are read."""
    method: str = "ce"
    ce_weight: float = 1.0     # classification: factor of the cross-entropy term
    ban: bool = False          # classification: born-again self-KD (teacher of the student's architecture)
    kd: KDConfig = field(default_factory=KDConfig)
    dkd: DKDConfig = field(default_factory=DKDConfig)
    nkd: NKDConfig = field(default_factory=NKDConfig)
    fitnet: FitNetConfig = field(default_factory=FitNetConfig)
    wkd_l: WKDLConfig = field(default_factory=WKDLConfig)
    wkd_f: WKDFConfig = field(default_factory=WKDFConfig)


# ------------------------------------------------------------------------------------------------ classification
@dataclass
class ClsDataConfig:
    dataset: str = "imagenet"            # imagenet | cifar100 | folder | synthetic
    root: Optional[str] = None
    num_classes: int = _ranged(1000, at_least(1))
    input_size: int = _ranged(224, at_least(1))
    hflip: bool = True                   # folder: random horizontal flips in training
    workers: int = _ranged(8, at_least(0))  # per process
    synthetic_size: int = _ranged(256, at_least(1))
    synthetic_val_size: int = _ranged(64, at_least(1))
    synthetic_seed: int = 0
    synthetic_workers: int = 0


@dataclass
class ClsModelConfig:
    student: Optional[str] = None        # required
    teacher: Optional[str] = None
    teacher_checkpoint: Optional[str] = None
    student_checkpoint: Optional[str] = None
    student_init: Optional[str] = None
    allow_random_teacher: bool = False


@dataclass
class CostMatrixConfig:
    source: str = "logits"               # logits | pooled | features
    layer: str = "last"


@dataclass
class ClassificationConfig:
    data: ClsDataConfig = field(default_factory=ClsDataConfig)
    model: ClsModelConfig = field(default_factory=ClsModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    cost_matrix: CostMatrixConfig = field(default_factory=CostMatrixConfig)
    expected_top1: Optional[float] = None


# ------------------------------------------------------------------------------------------------ detection
@dataclass
class DetDataConfig:
    root: Optional[str] = None
    train_split: str = "train2017"
    val_split: str = "val2017"
    workers: int = 4
    flip_prob: float = 0.5
    max_train_images: Optional[int] = None
    max_val_images: Optional[int] = None


@dataclass
class DetModelConfig:
    train_min_size: Union[int, List[int]] = field(default_factory=lambda: [640, 672, 704, 736, 768, 800])
    test_min_size: int = 800
    max_size: int = 1333
    rcnn_kwargs: Dict[str, Any] = field(default_factory=dict)
    box_head_dim: int = 1024


@dataclass
class DetStudentConfig:
    arch: Optional[str] = None           # required
    backbone_checkpoint: Optional[str] = None
    trainable_backbone_layers: int = 3


@dataclass
class DetTeacherConfig:
    arch: Optional[str] = None           # required
    checkpoint: Optional[str] = None
    box_head_dim: Optional[int] = None
    allow_random_init: bool = False


@dataclass
class DetectionConfig:
    data: DetDataConfig = field(default_factory=DetDataConfig)
    model: DetModelConfig = field(default_factory=DetModelConfig)
    student: DetStudentConfig = field(default_factory=DetStudentConfig)
    teacher: Optional[DetTeacherConfig] = None
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    expected_map: Optional[float] = None
    out_dir: Optional[str] = None


# ------------------------------------------------------------------------------------------------ checking
def _strip_optional(tp):
    args = typing.get_args(tp)
    if typing.get_origin(tp) is Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else Union[tuple(rest)]), True
    return tp, False


def _type_ok(value, tp) -> bool:
    tp, optional = _strip_optional(tp)
    if value is None:
        return optional or tp is Any
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin is Union:
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if origin in (list, List):
        (item,) = typing.get_args(tp) or (Any,)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, item) for v in value)
    if origin in (dict, Dict):
        return isinstance(value, dict)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return isinstance(value, tp)


def _out_of_range(value, check) -> Optional[str]:
    """What is wrong with a well-typed ``value`` under the field metadata ``check`` (None: nothing)."""
    if value is None:
        return None
    if "choices" in check and value not in check["choices"]:
        return f"must be one of {', '.join(map(repr, check['choices']))}, got {value!r}"
    if "min" in check:
        lo, hi, strict = check["min"], check["max"], check["strict"]
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if (v <= lo if strict else v < lo) or (hi is not None and v > hi):
                rng = f"{'>' if strict else '>='} {lo:g}" + (f" and <= {hi:g}" if hi is not None else "")
                return f"must be {rng}, got {value!r}"
    return None


def _type_name(tp) -> str:
    tp, optional = _strip_optional(tp)
    name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
    return f"{name} or null" if optional else name


# keys of the two former trainers' dialects -> their name here (named in the error instead of a look-alike)
RENAMED = {"base_lr": "lr", "lr_steps": "milestones", "lr_gamma": "gamma", "log_interval": "log_every",
           "eval_every_epochs": "eval_every", "checkpoint_interval": "checkpoint_every", "loss_weight": "weight"}


def _walk(cls, raw: dict, prefix: str, bad: list, wrong: list) -> dict:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key in raw:
        if key not in fields:
            close = [RENAMED[key]] if RENAMED.get(key) in fields else \
                difflib.get_close_matches(str(key), sorted(fields), n=1)
            name = f"{prefix}{key}"
            bad.append(f"`{name}`" + (f" (did you mean `{prefix}{close[0]}`?)" if close else ""))
    for name, f in fields.items():
        tp = hints[name]
        sub, optional = _strip_optional(tp)
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = f.default_factory()
        if name not in raw:
            value = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default
            out[name] = value
            continue
        value = raw[name]
        if dataclasses.is_dataclass(sub):
            if value is None and optional:
                out[name] = None
            elif isinstance(value, dict):
                out[name] = _walk(sub, value, f"{prefix}{name}.", bad, wrong)
            else:
                wrong.append(f"`{prefix}{name}` must be a mapping{' or null' if optional else ''}, got {value!r}")
            continue
        if not _type_ok(value, tp):
            wrong.append(f"`{prefix}{name}` must be {_type_name(tp)}, got {value!r}")
        else:
            problem = _out_of_range(value, f.metadata)
            if problem:
                wrong.append(f"`{prefix}{name}` {problem}")
        out[name] = float(value) if sub is float and isinstance(value, int) and not isinstance(value, bool) \
            else value
    return out


def resolve(schema, raw: dict, where: str = "config", prefix: str = "") -> dict:
    """``raw`` checked against the dataclass ``schema`` with every missing key defaulted; a new plain dict.
    ``prefix``: the dotted place of ``raw`` in the whole config (``"distill."``), for the messages.

    Raises:
        ConfigError naming every unknown key (with the closest valid one) and every value of the wrong type.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the config must be a mapping, got {type(raw).__name__}")
    bad, wrong = [], []
    out = _walk(schema, raw, prefix, bad, wrong)
    msgs = []
    if bad:
        msgs.append(f"unknown config key{'s' if len(bad) > 1 else ''} " + ", ".join(bad))
    msgs += wrong
    if msgs:
        raise ConfigError(f"{where}: " + "; ".join(msgs))
    return out


def schema_keys(schema, prefix: str = "") -> List[str]:
    """Every dotted key of ``schema`` (for documentation and tests)."""
    keys = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        sub, _ = _strip_optional(hints[f.name])
        if dataclasses.is_dataclass(sub):
            keys += schema_keys(sub, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys
