"""Run configuration: what `pretrain.py` resolved from presets and Megatron-style flags.

Each dataclass holds one concern; `RunConfig` gathers them and is what the trainer,
the engines and the checkpoint files see (never an argparse namespace).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError, ModelConfig
from ..distributed import ParallelConfig


@dataclass
class OptimizerSettings:
    """AdamW and the learning-rate schedule (megatron-core's OptimizerParamScheduler)."""

    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_decay_style: str = "cosine"
    lr_warmup_fraction: float | None = 0.01
    lr_warmup_iters: int = 0
    lr_warmup_samples: int = 0
    lr_decay_iters: int | None = None
    lr_decay_samples: int | None = None
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0

    def validate(self) -> None:
        """Raise ConfigError naming the first flag whose value cannot train."""
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if not self.min_lr >= 0:
            raise ConfigError(f"--min-lr must be >= 0, got {self.min_lr}")
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr {self.min_lr} is larger than --lr {self.lr}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        for flag, beta in (("--adam-beta1", self.adam_beta1), ("--adam-beta2", self.adam_beta2)):
            if not 0 <= beta < 1:
                raise ConfigError(f"{flag} must be in [0, 1), got {beta}")
        if not self.adam_eps > 0:
            raise ConfigError(f"--adam-eps must be positive, got {self.adam_eps}")
        if not self.clip_grad >= 0:
            raise ConfigError(f"--clip-grad must be >= 0 (0 = no clipping), got {self.clip_grad}")
        if self.lr_warmup_fraction is not None and not 0 <= self.lr_warmup_fraction < 1:
            raise ConfigError(
                f"--lr-warmup-fraction must be in [0, 1), got {self.lr_warmup_fraction}")
        for flag, value in (("--lr-warmup-iters", self.lr_warmup_iters),
                            ("--lr-warmup-samples", self.lr_warmup_samples),
                            ("--lr-decay-iters", self.lr_decay_iters),
                            ("--lr-decay-samples", self.lr_decay_samples)):
            if value is not None and value < 0:
                raise ConfigError(f"{flag} must be >= 0, got {value}")


@dataclass
class TrainingSettings:
    """Batching, length, precision and the engine-level switches."""

    micro_batch_size: int = 4
    global_batch_size: int = 32
    train_iters: int | None = None
    train_samples: int | None = None
    seed: int = 1234
    bf16: bool = False
    fp16: bool = False
    loss_scale: float | None = None
    #: None: chosen from the micro-batch size (see engines/megatron.initial_loss_scale).
    initial_loss_scale: float | None = None
    recompute_granularity: str | None = None
    recompute_num_layers: int = 1
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = True
    device: str = "auto"
    exit_on_nan: bool = False
    deterministic: bool = False
    exit_interval: int | None = None
    exit_duration_in_mins: float | None = None
    num_workers: int = 1

    def num_microbatches(self, data_parallel_size: int) -> int:
        """Gradient-accumulation steps: global = micro x DP x accumulation."""
        per_step = self.micro_batch_size * data_parallel_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} is not divisible by "
                f"--micro-batch-size {self.micro_batch_size} x data-parallel size "
                f"{data_parallel_size}"
            )
        return self.global_batch_size // per_step

    def total_iters(self) -> int:
        if self.train_iters is not None:
            return self.train_iters
        if self.train_samples is not None:
            return math.ceil(self.train_samples / self.global_batch_size)
        raise ConfigError("one of --train-iters or --train-samples is required")

    def validate(self) -> None:
        """Raise ConfigError naming the first flag whose value cannot train."""
        for flag, value in (("--micro-batch-size", self.micro_batch_size),
                            ("--global-batch-size", self.global_batch_size),
                            ("--train-iters", self.train_iters),
                            ("--train-samples", self.train_samples),
                            ("--exit-interval", self.exit_interval),
                            ("--recompute-num-layers", self.recompute_num_layers)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if self.num_workers < 0:
            raise ConfigError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.seed < 0:
            raise ConfigError(f"--seed must be >= 0, got {self.seed}")
        if self.exit_duration_in_mins is not None and not self.exit_duration_in_mins > 0:
            raise ConfigError(
                f"--exit-duration-in-mins must be positive, got {self.exit_duration_in_mins}")
        if self.bf16 and self.fp16:
            raise ConfigError("--bf16 and --fp16 exclude each other")


@dataclass
class CheckpointSettings:
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    finetune: bool = False
    no_load_optim: bool = False
    no_load_rng: bool = False
    no_save_optim: bool = False
    exit_signal_handler: bool = True
    #: Keep only this many newest checkpoints under --save (None keeps all).
    keep_last_checkpoints: int | None = None


@dataclass
class EvalSettings:
    eval_interval: int | None = 1000
    eval_iters: int = 10

    def validate(self) -> None:
        if self.eval_iters < 0:
            raise ConfigError(f"--eval-iters must be >= 0, got {self.eval_iters}")
        if self.eval_interval is not None and self.eval_interval < 1:
            raise ConfigError(f"--eval-interval must be >= 1, got {self.eval_interval}")


@dataclass
class LoggingSettings:
    log_interval: int = 100
    tensorboard_dir: str | None = None
    wandb_project: str | None = None
    wandb_exp_name: str | None = None
    wandb_save_dir: str | None = None
    metrics_file: str | None = None
    log_memory: bool = True


@dataclass
class TokenizerSettings:
    tokenizer_type: str | None = None
    tokenizer_model: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None


@dataclass
class DataSettings:
    """Where training tokens come from (Megatron's flags); resolved by megatron_latent.data."""

    data_path: list[str] | None = None
    split: str = "969,30,1"
    train_data_path: list[str] | None = None
    valid_data_path: list[str] | None = None
    test_data_path: list[str] | None = None
    data_cache_path: str | None = None
    mock_data: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False


@dataclass
class RunConfig:
    """Everything one training run was asked to do."""

    model: ModelConfig
    method: str = "vanilla"
    method_args: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    data: DataSettings = field(default_factory=DataSettings)
    tokenizer: TokenizerSettings = field(default_factory=TokenizerSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable record of the run (stored in every checkpoint)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        def build(kind, data):
            names = {f.name for f in dataclasses.fields(kind)}
            return kind(**{k: v for k, v in (data or {}).items() if k in names})

        return cls(
            model=build(ModelConfig, values["model"]),
            method=values.get("method", "vanilla"),
            method_args=dict(values.get("method_args") or {}),
            preset=values.get("preset"),
            parallel=build(ParallelConfig, values.get("parallel")),
            training=build(TrainingSettings, values.get("training")),
            optimizer=build(OptimizerSettings, values.get("optimizer")),
            data=build(DataSettings, values.get("data")),
            tokenizer=build(TokenizerSettings, values.get("tokenizer")),
            checkpoint=build(CheckpointSettings, values.get("checkpoint")),
            evaluation=build(EvalSettings, values.get("evaluation")),
            logging=build(LoggingSettings, values.get("logging")),
        )
