"""Typed schemas for every config group.

Each YAML option under ``conf/<group>/`` extends one of these dataclasses (stored in
Hydra's ConfigStore under ``schema/<group>/<name>``), so a typo or a wrong type fails
at compose time with the full key named. This module imports neither torch nor
mlflow: ``python -m xp --cfg job`` must stay fast.

Nodes that end in a torch object (an optimizer, an LR scheduler phase, a dataset) are
flat: the ``_target_`` and its keyword arguments sit beside xp's own settings, which
are the fields of the base schema (``OptimConfig``, ``PhaseConfig``, ``DataConfig``).
``xp.run`` splits the two.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from xp.dist import Launcher


class Device(str, Enum):
    """Where a single-device run puts the model."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class StartMethod(str, Enum):
    """multiprocessing start method for DataLoader workers."""

    fork = "fork"
    spawn = "spawn"
    forkserver = "forkserver"


class Backend(str, Enum):
    """torch.distributed backend."""

    nccl = "nccl"
    gloo = "gloo"


class DType(str, Enum):
    """Floating-point precision of parameters or gradient reductions."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class NonFinite(str, Enum):
    """What a NaN or inf training loss does."""

    stop = "stop"
    skip = "skip"


class ScheduleExtension(str, Enum):
    """What the LR phases without ``end`` do when a resumed run is longer than it was."""

    restart = "restart"
    """A warm restart (SGDR): they start again over the added steps, from the base lr."""
    stretch = "stretch"
    """They take the windows this length gives them, as if it had been the length from the
    start; the lr moves to where that schedule is (Hugging Face's Trainer does this)."""
    hold = "hold"
    """They end where they ended; the lr holds at its last value (mmengine, Composer)."""


class Loss(str, Enum):
    """The loss of the supervised step, between the model's output and the targets."""

    cross_entropy = "cross_entropy"
    mse = "mse"
    l1 = "l1"
    bce_with_logits = "bce_with_logits"


class Mode(str, Enum):
    """Whether a larger or a smaller value of a metric is better."""

    max = "max"
    min = "min"


class TestCheckpoint(str, Enum):
    """Which checkpoint of a run ``test=`` evaluates."""

    best = "best"
    latest = "latest"


class AMP(str, Enum):
    """Automatic mixed precision of the forward pass."""

    off = "off"
    bf16 = "bf16"
    fp16 = "fp16"


# --------------------------------------------------------------------------- strategy


@dataclass
class CompileConfig:
    """``torch.compile`` of one method of the model."""

    enabled: bool = False
    """Compile the model (off by default: compilation costs seconds up front)."""
    target: str = "forward"
    """Name of the model method to compile."""
    mode: str | None = None
    """torch.compile mode (default, reduce-overhead, max-autotune); null: torch's default."""
    fullgraph: bool = False
    """Fail on graph breaks instead of falling back to eager."""
    dynamic: bool | None = None
    """Dynamic shapes; null lets torch decide."""


@dataclass
class AutoScaleLRConfig:
    """Linear LR scaling by the real batch size (Goyal et al., 2017)."""

    enabled: bool = False
    """Scale every param group's lr by world_size * batch_size / base_batch_size."""
    base_batch_size: int = 64
    """The total batch size the configured lr was tuned for."""


@dataclass
class StrategyConfig:
    """Settings every strategy shares: environment, compile and LR scaling."""

    _target_: str = MISSING
    launcher: Launcher | None = None
    """none, pytorch, slurm or mpi; null infers it from the environment."""
    cudnn_benchmark: bool = False
    """Let cuDNN pick the fastest kernels (off when randomness.deterministic)."""
    mp_start_method: StartMethod | None = None
    """Start method for worker processes; null keeps the platform's default."""
    threads_per_process: int | None = None
    """torch intra-op threads per process; null: the cores divided by local processes."""
    resource_limit: int = 4096
    """Raise the soft open-file limit to at least this (never above the hard limit)."""
    compile: CompileConfig = field(default_factory=CompileConfig)
    auto_scale_lr: AutoScaleLRConfig = field(default_factory=AutoScaleLRConfig)


@dataclass
class SingleDeviceStrategyConfig(StrategyConfig):
    """One process, one device."""

    _target_: str = "xp.strategy.SingleDeviceStrategy"
    device: Device = Device.auto
    """auto takes CUDA when available, else the CPU."""


@dataclass
class DistributedStrategyConfig(StrategyConfig):
    """Settings of every strategy over a torch.distributed process group."""

    device: Device = Device.auto
    """auto: one CUDA device per process (LOCAL_RANK) when available, else the CPU."""
    backend: Backend | None = None
    """null: nccl on CUDA, gloo on the CPU."""
    nproc_per_node: int = 1
    """Without a launcher (torchrun, srun, mpirun): start this many workers here."""
    master_port: int | None = None
    """Rendezvous port of the workers xp starts itself; null picks a free one."""
    timeout_s: float = 1800.0
    """How long a collective may wait for the other ranks before the run fails."""


@dataclass
class DDPStrategyConfig(DistributedStrategyConfig):
    """DistributedDataParallel: a full replica per process, gradients all-reduced."""

    _target_: str = "xp.strategy.DDPStrategy"
    find_unused_parameters: bool = False
    """Allow parameters that get no gradient in a step (slower: an extra graph traversal)."""
    static_graph: bool = False
    """Promise the graph is the same every step, so DDP can optimize its hooks."""
    gradient_as_bucket_view: bool = True
    """Gradients as views into the all-reduce buckets: saves a copy and memory."""
    broadcast_buffers: bool = True
    """Broadcast buffers (BatchNorm statistics) from rank 0 before each forward."""
    bucket_cap_mb: float = 25.0
    """Size of the gradient buckets that are all-reduced together."""
    sync_bn: bool = False
    """Convert BatchNorm layers to SyncBatchNorm (statistics over all ranks)."""


@dataclass
class FSDPStrategyConfig(DistributedStrategyConfig):
    """FSDP2 (torch.distributed.fsdp.fully_shard): parameters, gradients and optimizer
    state sharded over the ranks of a 1-D device mesh."""

    _target_: str = "xp.strategy.FSDPStrategy"
    shard_modules: list[str] = field(default_factory=list)
    """Module class names to shard one by one (e.g. [Block]); the root is always sharded."""
    reshard_after_forward: bool = True
    """Free gathered parameters after forward (less memory, one more all-gather in backward)."""
    param_dtype: DType | None = None
    """Compute dtype of gathered parameters (mixed precision); null keeps fp32."""
    reduce_dtype: DType | None = None
    """dtype of gradient reduce-scatter; null: param_dtype."""
    cpu_offload: bool = False
    """Keep sharded parameters, gradients and optimizer state on the CPU."""
    activation_checkpointing: list[str] = field(default_factory=list)
    """Module class names whose activations are recomputed in backward instead of stored."""


@dataclass
class DeepSpeedStrategyConfig(DistributedStrategyConfig):
    """DeepSpeed ZeRO through deepspeed.initialize, with xp's optimizer and LR schedule."""

    _target_: str = "xp.strategy.DeepSpeedStrategy"
    zero_stage: int = 2
    """1: optimizer state, 2: + gradients, 3: + parameters partitioned over ranks."""
    precision: DType = DType.fp32
    """fp32, or bf16/fp16 mixed precision managed by DeepSpeed (instead of optim.amp)."""
    offload_optimizer: bool = False
    """Optimizer state in CPU memory (ZeRO-Offload)."""
    offload_param: bool = False
    """Parameters in CPU memory (ZeRO-3 only)."""
    config: dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed config entries merged over the ones xp derives."""


# --------------------------------------------------------------------------- optim


@dataclass
class ClipGradConfig:
    """Gradient clipping; at most one of max_norm and max_value."""

    max_norm: float | None = None
    """Clip the total gradient norm to this (torch.nn.utils.clip_grad_norm_)."""
    norm_type: float = 2.0
    """The p of the p-norm used with max_norm."""
    max_value: float | None = None
    """Clip every gradient element to [-max_value, max_value]."""


@dataclass
class ParamGroupConfig:
    """Multipliers for the parameters under one module name prefix."""

    lr_mult: float = 1.0
    decay_mult: float = 1.0


@dataclass
class ParamwiseConfig:
    """Per-parameter optimizer options (mmengine's paramwise_cfg)."""

    bias_decay_mult: float = 1.0
    """Weight-decay multiplier for biases; 0 turns decay off for them."""
    norm_decay_mult: float = 1.0
    """Weight-decay multiplier for normalization layers (BatchNorm, LayerNorm, GroupNorm...)."""
    custom: dict[str, ParamGroupConfig] = field(default_factory=dict)
    """Module name prefix -> multipliers, e.g. {backbone: {lr_mult: 0.1}}; longest prefix wins."""


@dataclass
class OptimConfig:
    """One optimizer and its wrapper. Subclasses add the torch optimizer's arguments."""

    _target_: str = MISSING
    _partial_: bool = True
    accumulative_counts: int = 1
    """Micro-batches whose gradients add up before one optimizer step."""
    clip_grad: ClipGradConfig = field(default_factory=ClipGradConfig)
    amp: AMP = AMP.off
    """off, bf16 or fp16 (fp16 adds a gradient scaler)."""
    paramwise: ParamwiseConfig = field(default_factory=ParamwiseConfig)
    params: str | None = None
    """With several optimizers: the submodule whose parameters this one owns."""


@dataclass
class SGDConfig(OptimConfig):
    _target_: str = "torch.optim.SGD"
    lr: float = 0.05
    momentum: float = 0.9
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False


@dataclass
class AdamConfig(OptimConfig):
    _target_: str = "torch.optim.Adam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False


@dataclass
class AdamWConfig(OptimConfig):
    _target_: str = "torch.optim.AdamW"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    amsgrad: bool = False


@dataclass
class MultiOptimConfig:
    """Several named optimizers for one model (mmengine's OptimWrapperDict)."""

    optimizers: dict[str, OptimConfig] = field(default_factory=dict)
    """Name -> optimizer; each names the submodule it owns in `params`."""


# --------------------------------------------------------------------------- scheduler


@dataclass
class PhaseConfig:
    """One torch LR scheduler, active over the window [begin, end).

    A schedule is a mapping of named phases (``scheduler.warmup``, ``scheduler.cosine``).
    Phases whose windows follow each other chain (torch's SequentialLR); phases whose
    windows overlap multiply (torch's ChainedScheduler).
    """

    _target_: str = MISSING
    _partial_: bool = True
    begin: int = 0
    """First epoch (or step, when not by_epoch) of the window."""
    end: int | None = None
    """End of the window, exclusive; null: the end of training."""
    by_epoch: bool = True
    """Step at the end of each epoch, or after each optimizer step."""
    convert_to_iter_based: bool = False
    """Give an epoch-based phase the same shape, stepped smoothly after each optimizer step."""


@dataclass
class ConstantLRConfig(PhaseConfig):
    _target_: str = "torch.optim.lr_scheduler.ConstantLR"
    factor: float = 1.0


@dataclass
class StepLRConfig(PhaseConfig):
    _target_: str = "torch.optim.lr_scheduler.StepLR"
    step_size: int = 1
    gamma: float = 0.1


@dataclass
class MultiStepLRConfig(PhaseConfig):
    _target_: str = "torch.optim.lr_scheduler.MultiStepLR"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1


@dataclass
class CosineAnnealingLRConfig(PhaseConfig):
    _target_: str = "torch.optim.lr_scheduler.CosineAnnealingLR"
    eta_min: float = 0.0


@dataclass
class LinearLRConfig(PhaseConfig):
    _target_: str = "torch.optim.lr_scheduler.LinearLR"
    start_factor: float = 1.0 / 3
    end_factor: float = 1.0


class AnnealStrategy(str, Enum):
    cos = "cos"
    linear = "linear"


@dataclass
class OneCycleLRConfig(PhaseConfig):
    _target_: str = "torch.optim.lr_scheduler.OneCycleLR"
    by_epoch: bool = False
    max_lr: float | None = None
    """Peak lr; null: each param group's configured lr."""
    pct_start: float = 0.3
    anneal_strategy: AnnealStrategy = AnnealStrategy.cos
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    three_phase: bool = False
    cycle_momentum: bool = True


# --------------------------------------------------------------------------- others


@dataclass
class RandomnessConfig:
    """Seeds and determinism."""

    seed: int | None = 0
    """Base seed; null draws one at random, logs it and records it on the run."""
    diff_rank_seed: bool = False
    """Give each rank seed + rank instead of the same seed."""
    deterministic: bool = False
    """torch deterministic algorithms, cuDNN deterministic, CUBLAS_WORKSPACE_CONFIG."""


@dataclass
class DataConfig:
    """Loader settings. Subclasses add the dataset factory's arguments."""

    _target_: str = MISSING
    batch_size: int = 64
    """Samples per batch per process."""
    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    drop_last: bool = False
    """Drop the last incomplete training batch of each epoch."""


@dataclass
class DigitsDataConfig(DataConfig):
    """scikit-learn's bundled digits: 1,797 8x8 images, no download."""

    _target_: str = "xp.data.digits"
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    """Share held out for ``test=<run>``; 0 gives no test split."""
    split_seed: int = 0
    """Seed of the fixed train/val/test split (independent of randomness.seed)."""
    as_images: bool = False
    """Shape each sample as a 1x8x8 image instead of 64 features."""


@dataclass
class DatasetsConfig(DataConfig):
    """Datasets named by ``_target_``s: ``data.train``, ``data.val`` and ``data.test``."""

    _target_: str = "xp.data.Datasets"
    train: Any = MISSING
    """The training dataset: a node with a ``_target_`` (any map-style Dataset)."""
    val: Any = None
    test: Any = None


@dataclass
class ModelConfig:
    _target_: str = MISSING


@dataclass
class MLPConfig(ModelConfig):
    _target_: str = "xp.model.MLP"
    in_features: int = 64
    hidden_sizes: list[int] = field(default_factory=lambda: [128, 128])
    num_classes: int = 10
    dropout: float = 0.1
    norm: bool = True
    """LayerNorm after each hidden layer."""


@dataclass
class TaskConfig:
    """What the step does when the model defines no ``train_step``/``val_step``.

    The batch is ``(inputs, targets)`` or a dict holding ``input_key`` and ``target_key``;
    the loss compares ``model(inputs)`` with the targets, and the metrics are updated
    with the same two at validation and test.
    """

    loss: Loss = Loss.cross_entropy
    ignore_index: int = -100
    """Targets equal to this are left out of cross-entropy and of the built-in metrics."""
    input_key: str = "inputs"
    """The model's input in a dict batch."""
    target_key: str = "targets"
    """The targets in a dict batch."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Name -> metric (a ``_target_`` node): anything with ``update(outputs, targets)``,
    ``compute()`` and ``reset()``, e.g. ``xp.metric.Accuracy`` or a torchmetrics metric.
    Logged as ``val/<name>`` and ``test/<name>``."""


@dataclass
class CheckpointConfig:
    """When to save checkpoints, how many to keep, and which one is the best."""

    interval_epochs: int = 1
    """Save a checkpoint every this many epochs (and always at the end); 0 turns it off."""
    interval_steps: int = 0
    """Also save every this many optimizer steps; 0 turns it off."""
    keep: int = 3
    """How many of the newest checkpoints to keep (the best one is kept besides); 0 keeps all."""
    async_save: bool = False
    """Write checkpoints in the background: training stalls only for a CPU copy."""
    monitor: str | None = None
    """A validation metric (e.g. ``val/acc``): a new best value saves a checkpoint, kept as
    the best beside the newest ones and tagged on the MLflow run."""
    mode: Mode = Mode.max
    """Whether a larger (max) or smaller (min) ``monitor`` value is better."""


@dataclass
class EarlyStoppingConfig:
    """``xp.callback.EarlyStopping``: end the run FINISHED when a validation metric stops
    improving (the MLflow run is tagged ``xp.stopped_early`` with why)."""

    _target_: str = "xp.callback.EarlyStopping"
    monitor: str = "val/loss"
    """A metric validation logs."""
    mode: Mode = Mode.min
    """min: smaller is better; max: larger is better."""
    patience: int = 3
    """Validations in a row without an improvement before the run ends."""
    min_delta: float = 0.0
    """The least change of ``monitor`` that counts as an improvement."""


@dataclass
class EMAConfig:
    """``xp.callback.EMA``: an exponential moving average of the parameters, saved in every
    checkpoint and exported by ``xp export ... ema=true``."""

    _target_: str = "xp.callback.EMA"
    decay: float = 0.999
    """Weight of the old average in each update, in [0, 1)."""
    every_n_steps: int = 1
    """Update the average every this many optimizer steps."""
    validate_with_ema: bool = True
    """Validation and ``test=`` evaluate the average instead of the training weights."""


@dataclass
class SweepConfig:
    """How a multirun (``-m``) treats its jobs (see xp.sweep)."""

    fresh: bool = False
    """Run every job anew, even where the same config already FINISHED or was KILLED."""
    direction: Mode | None = None
    """Whether the sweep maximizes or minimizes ``trainer.objective``; null: min when its
    name holds ``loss`` or ``error``, else max."""


@dataclass
class TrainerConfig:
    """How long to train, and how often to validate, log and checkpoint."""

    max_epochs: int | None = 20
    """Epochs to train; with max_steps too, training stops at whichever comes first."""
    max_steps: int | None = None
    """Optimizer steps to train."""
    val_interval_epochs: int = 1
    """Validate every this many epochs (and always at the end); 0 turns it off."""
    log_interval_steps: int = 10
    """Log train/loss, train/lr and throughput every this many optimizer steps."""
    objective: str = "val/acc"
    """The metric returned to Hydra (and its sweepers) at the end."""
    progress_bar: bool | None = None
    """A progress bar over steps; null: only when stderr is a terminal."""
    progress_interval_s: float = 30.0
    """Where stderr is not a terminal (a log file, CI, Slurm, nohup) and no bar is drawn: a
    progress line in the log every this many seconds (step, epoch, loss, step/s, ETA);
    0 turns it off."""
    nonfinite: NonFinite = NonFinite.stop
    """A NaN/inf loss: stop (checked every log step) or skip that batch (checked every step)."""
    extend_schedule: ScheduleExtension = ScheduleExtension.restart
    """A run resumed with a longer max_epochs/max_steps: the LR phases without ``end`` start
    again over the added steps (restart), are stretched to the new end (stretch), or stay
    ended, the lr holding (hold)."""


class ServerDownAtStart(str, Enum):
    """What a run does when its MLflow server does not answer as it starts."""

    buffer = "buffer"
    stop = "stop"


@dataclass
class TrackingConfig:
    """MLflow tracking."""

    enabled: bool = True
    tracking_uri: str | None = None
    """null: $MLFLOW_TRACKING_URI, else sqlite:///<launch dir>/outputs/mlflow.db."""
    log_checkpoints: bool = True
    """Upload the kept checkpoints as artifacts at the end of the run."""
    checkpoint_artifact_max_mb: float = 512.0
    """Larger checkpoints are recorded by their location (tag) instead of uploaded."""
    system_metrics: bool = False
    """MLflow's own system metrics (CPU, memory, GPU where present)."""
    flush_interval_s: float = 2.0
    """How often buffered metrics are written, in the background."""
    close_timeout_s: float = 120.0
    """At the end of a run, how long to wait for a store that takes no writes (a server
    that is down or does not answer) before giving up: the process then exits non-zero
    with the run RUNNING in MLflow and says what is missing; ``python -m xp resume=<run
    id>`` completes it from the last checkpoint. A single upload (a large checkpoint)
    must also finish within this time: raise it for slow links."""
    server_down_at_start: ServerDownAtStart = ServerDownAtStart.buffer
    """An http(s) tracking server that does not answer as the run starts: ``buffer`` trains
    and keeps what the run records, as during an outage, and creates the run once the
    server answers (with its real start time); ``stop`` stops the run before its first
    step. Credentials the server refuses stop the run in both cases."""
    max_buffered_points: int = 1_000_000
    """Metric points kept in memory (about 170 bytes each, in the MLflow writer process)
    while the store does not take them; beyond this the oldest are dropped and counted
    (the checkpoints keep them, and ``resume=`` restores them)."""


@dataclass
class XPConfig:
    """The whole composed config."""

    experiment_name: str = "default"
    """Names the MLflow experiment and the folder under outputs/."""
    load_from: str | None = None
    """Start a NEW run from these weights only (a run id, run directory or checkpoint)."""
    load_from_strict: bool = True
    """``load_from``'s weights must fit the model exactly (every tensor, by name and shape),
    or the run stops before training and lists what does not match; false loads the
    tensors that match and logs the rest."""
    test: str | None = None
    """Evaluate a run (a run id, run directory or checkpoint) on the test split, without
    training, and log ``test/*`` onto that same MLflow run."""
    test_checkpoint: TestCheckpoint = TestCheckpoint.best
    """Which checkpoint ``test=`` evaluates: the best (the latest when the run tracked no
    best) or the latest."""
    target_allowlist: list[str] = field(default_factory=list)
    """Module prefixes (e.g. mypkg.) besides torch. and xp. that a restored config may build."""
    strategy: StrategyConfig = MISSING
    optim: Any = MISSING
    scheduler: dict[str, Any] = field(default_factory=dict)
    randomness: RandomnessConfig = field(default_factory=RandomnessConfig)
    # model and data are open nodes: a user's option passes its own keyword arguments to
    # its _target_; xp's options type-check themselves by extending their schemas, and
    # xp.run checks DataConfig's fields of any option when it builds them.
    model: Any = MISSING
    data: Any = MISSING
    task: TaskConfig = field(default_factory=TaskConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    callbacks: dict[str, Any] = field(default_factory=dict)
    """Name -> callback (a ``_target_`` node, xp.callback.Callback subclass), run in this
    order at the loop's events: ``+callbacks=early_stopping``, ``~callbacks.ema``."""


SCHEMAS: dict[str, dict[str, type]] = {
    "strategy": {
        "single": SingleDeviceStrategyConfig,
        "ddp": DDPStrategyConfig,
        "fsdp": FSDPStrategyConfig,
        "deepspeed": DeepSpeedStrategyConfig,
    },
    "optim": {
        "sgd": SGDConfig,
        "adam": AdamConfig,
        "adamw": AdamWConfig,
        "multi": MultiOptimConfig,
    },
    "scheduler/phase": {
        "constant": ConstantLRConfig,
        "step": StepLRConfig,
        "multistep": MultiStepLRConfig,
        "cosine": CosineAnnealingLRConfig,
        "linear": LinearLRConfig,
        "onecycle": OneCycleLRConfig,
    },
    "randomness": {"randomness": RandomnessConfig},
    "data": {"data": DataConfig, "digits": DigitsDataConfig, "datasets": DatasetsConfig},
    "model": {"model": ModelConfig, "mlp": MLPConfig},
    "task": {"task": TaskConfig},
    "trainer": {"trainer": TrainerConfig},
    "checkpoint": {"checkpoint": CheckpointConfig},
    "tracking": {"mlflow": TrackingConfig},
    "callbacks": {"early_stopping": EarlyStoppingConfig, "ema": EMAConfig},
}


def register_schemas() -> None:
    """Store every schema under ``schema/<group>/<name>`` for YAML options to extend."""
    cs = ConfigStore.instance()
    cs.store(group="schema", name="config", node=XPConfig)
    for group, options in SCHEMAS.items():
        for name, node in options.items():
            cs.store(group=f"schema/{group}", name=name, node=node)
