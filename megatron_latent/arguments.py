"""Megatron-LM style command-line flags -> RunConfig.

Only flags that do something here are accepted; their names and meanings follow Megatron-LM
where both have them. `--model <preset>` fills the shape and the published recipe; any flag
given explicitly wins over the preset.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any

from .config import PRESETS, ConfigError, ModelConfig, get_preset
from .distributed import ParallelConfig
from .methods.registry import available_methods, get_method
from .training.config import (
    CheckpointSettings,
    DataSettings,
    EvalSettings,
    LoggingSettings,
    OptimizerSettings,
    RunConfig,
    TokenizerSettings,
    TrainingSettings,
)

_MODEL_FLAGS = {
    "num_layers": "num_layers", "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads", "ffn_hidden_size": "ffn_hidden_size",
    "seq_length": "seq_length", "max_position_embeddings": "max_position_embeddings",
    "rotary_percent": "rotary_percent", "rotary_base": "rotary_base",
    "make_vocab_size_divisible_by": "make_vocab_size_divisible_by", "vocab_size": "vocab_size",
    "hidden_dropout": "hidden_dropout", "attention_dropout": "attention_dropout",
    "init_method_std": "init_method_std", "norm_epsilon": "layernorm_epsilon",
    "attention_backend": "attention_backend",
}


def build_parser() -> argparse.ArgumentParser:
    """The full flag set of pretrain.py, grouped as in Megatron-LM's --help."""
    parser = argparse.ArgumentParser(
        prog="pretrain.py",
        description="Pretrain a Pythia-architecture language model on megatron-core, with "
        "plain next-token training or a method that thinks beyond the next token. "
        "Launch with torchrun; flags follow Megatron-LM.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    add = parser.add_argument_group("model").add_argument
    add("--model", default=None,
        help=f"preset that fills shape and recipe: {', '.join(PRESETS)} (or 70m, 1b, ...)")
    add("--method", default="vanilla", help="training method: " + "; ".join(
        f"{name} ({get_method(name).description})" for name in available_methods()))
    add("--num-layers", type=int)
    add("--hidden-size", type=int)
    add("--num-attention-heads", type=int)
    add("--ffn-hidden-size", type=int, help="default 4 x hidden")
    add("--seq-length", type=int)
    add("--max-position-embeddings", type=int)
    add("--rotary-percent", type=float, help="fraction of each head rotated (Pythia: 0.25)")
    add("--rotary-base", type=int)
    add("--make-vocab-size-divisible-by", type=int, help="vocab padded to this x TP (128)")
    add("--vocab-size", type=int,
        help="unpadded vocabulary for --mock-data (otherwise the tokenizer's)")
    add("--hidden-dropout", type=float)
    add("--attention-dropout", type=float)
    add("--init-method-std", type=float, help="default Pythia small_init sqrt(2/(5h))")
    add("--norm-epsilon", type=float)
    add("--attention-backend", choices=["auto", "sdpa", "local", "te"],
        help="core attention: torch SDPA, megatron-core's own (CUDA), transformer-engine; "
        "auto = TE when importable on CUDA (TE linears with SDPA attention under "
        "--reset-attention-mask, whose per-document mask TE attention ignores), else SDPA")

    add = parser.add_argument_group("training").add_argument
    add("--micro-batch-size", type=int)
    add("--global-batch-size", type=int)
    add("--train-iters", type=int)
    add("--train-samples", type=int)
    add("--seed", type=int, default=None)
    add("--bf16", action="store_true")
    add("--fp16", action="store_true")
    add("--loss-scale", type=float, default=None, help="static fp16 loss scale (default dynamic)")
    add("--initial-loss-scale", type=float, default=None,
        help="first dynamic fp16 loss scale (default: 2^16 / tokens per micro-batch, as a "
             "power of two; the loss is a per-token sum, so this is 2^16 per token)")
    add("--recompute-granularity", choices=["full", "selective"], default=None)
    add("--recompute-num-layers", type=int, default=None)
    add("--use-distributed-optimizer", action="store_true",
        help="shard optimizer state across data-parallel ranks (CUDA engine)")
    add("--no-overlap-grad-reduce", dest="overlap_grad_reduce", action="store_false",
        default=None)
    add("--device", choices=["auto", "cpu", "cuda"], default=None,
        help="auto = CUDA engine when a GPU is visible, else the CPU engine")
    add("--exit-on-nan", action="store_true",
        help="stop at the first NaN/Inf loss or gradient (default: skip the step and count it)")
    add("--deterministic-mode", action="store_true",
        help="bit-reproducible runs (slower): torch's deterministic algorithms, a fixed cuBLAS "
             "workspace, and the math kernel for SDPA attention (the fused kernels' backward "
             "accumulates with atomics)")
    add("--exit-interval", type=int, default=None, help="exit after an iteration divisible by this")
    add("--exit-duration-in-mins", type=float, default=None)
    add("--num-workers", type=int, default=None, help="data loader worker processes")

    add = parser.add_argument_group("learning rate and optimizer").add_argument
    add("--lr", type=float)
    add("--min-lr", type=float,
        help="floor of the LR decay; default: the preset's fraction of --lr (Pythia: 10%%)")
    add("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root"])
    add("--lr-decay-iters", type=int)
    add("--lr-decay-samples", type=int)
    add("--lr-warmup-fraction", type=float)
    add("--lr-warmup-iters", type=int)
    add("--lr-warmup-samples", type=int)
    add("--weight-decay", type=float)
    add("--adam-beta1", type=float)
    add("--adam-beta2", type=float)
    add("--adam-eps", type=float)
    add("--clip-grad", type=float)

    add = parser.add_argument_group("distributed").add_argument
    add("--tensor-model-parallel-size", type=int, default=1)
    add("--pipeline-model-parallel-size", type=int, default=1)
    add("--sequence-parallel", action="store_true")

    add = parser.add_argument_group("data and tokenizer").add_argument
    add("--data-path", nargs="+", default=None,
        help="prefix(es) of .bin/.idx datasets, optionally weighted: 0.7 a 0.3 b")
    add("--split", default=None, help="train,valid,test proportions of --data-path (969,30,1)")
    add("--train-data-path", nargs="+", default=None)
    add("--valid-data-path", nargs="+", default=None)
    add("--test-data-path", nargs="+", default=None)
    add("--data-cache-path", default=None)
    add("--mock-data", action="store_true", help="synthetic tokens (megatron MockGPTDataset)")
    add("--reset-position-ids", action="store_true")
    add("--reset-attention-mask", action="store_true")
    add("--eod-mask-loss", action="store_true")
    add("--tokenizer-type", default=None,
        help="SentencePieceTokenizer, HuggingFaceTokenizer or GPT2BPETokenizer")
    add("--tokenizer-model", default=None)
    add("--vocab-file", default=None)
    add("--merge-file", default=None)

    add = parser.add_argument_group("checkpointing").add_argument
    add("--save", default=None, help="directory for checkpoints (iter_XXXXXXX/)")
    add("--load", default=None, help="directory to resume from (latest_checkpointed_iteration.txt)")
    add("--save-interval", type=int, default=None)
    add("--finetune", action="store_true",
        help="load weights only: iteration, optimizer and RNG start fresh")
    add("--no-load-optim", action="store_true")
    add("--no-load-rng", action="store_true")
    add("--no-save-optim", action="store_true")
    add("--keep-last-checkpoints", type=int, default=None, metavar="N",
        help="after each save, delete all but the N newest checkpoints under --save "
             "(default: keep all)")
    add("--no-exit-signal-handler", dest="exit_signal_handler", action="store_false",
        default=True, help="do not save and exit 0 on SIGTERM/SIGUSR1 (Slurm preemption)")

    add = parser.add_argument_group("evaluation").add_argument
    add("--eval-interval", type=int, default=None)
    add("--eval-iters", type=int, default=None)

    add = parser.add_argument_group("logging").add_argument
    add("--log-interval", type=int, default=None)
    add("--tensorboard-dir", default=None)
    add("--wandb-project", default=None, help="log to Weights & Biases (WANDB_MODE=offline works)")
    add("--wandb-exp-name", default=None)
    add("--wandb-save-dir", default=None)
    add("--metrics-file", default=None,
        help="JSONL of every logged step (default: <save>/metrics.jsonl)")
    add("--dry-run", action="store_true",
        help="print the resolved configuration, parameter and FLOP counts, then exit")

    for name in available_methods():
        spec = get_method(name)
        spec.add_arguments(parser.add_argument_group(f"method '{name}'"))
    return parser


def method_dests(method: str) -> list[str]:
    """The argparse destinations a method's own flags write to."""
    probe = argparse.ArgumentParser(add_help=False)
    get_method(method).add_arguments(probe.add_argument_group("probe"))
    return [action.dest for action in probe._actions]


def _pick(explicit: Any, preset_value: Any, default: Any) -> Any:
    if explicit is not None:
        return explicit
    if preset_value is not None:
        return preset_value
    return default


def resolve(args: argparse.Namespace) -> RunConfig:
    """Merge preset, explicit flags and defaults; raises ConfigError naming the flag."""
    preset = get_preset(args.model) if args.model else None
    recipe = preset.recipe if preset else None
    spec = get_method(args.method)

    model_values: dict[str, Any] = {}
    if preset:
        model_values.update(num_layers=preset.num_layers, hidden_size=preset.hidden_size,
                            num_attention_heads=preset.num_attention_heads,
                            seq_length=preset.seq_length, vocab_size=preset.vocab_size)
    for flag, field_name in _MODEL_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            model_values[field_name] = value
    if "seq_length" in model_values and args.max_position_embeddings is None:
        model_values["max_position_embeddings"] = model_values["seq_length"]
    missing = [f"--{name.replace('_', '-')}" for name in
               ("num_layers", "hidden_size", "num_attention_heads") if name not in model_values]
    if missing:
        raise ConfigError(f"give --model <preset> or all of {', '.join(missing)}")
    model = ModelConfig(**model_values)

    def r(name):
        return getattr(recipe, name) if recipe else None

    default_opt = OptimizerSettings()
    warmup_given = any(v is not None for v in (args.lr_warmup_fraction, args.lr_warmup_iters,
                                               args.lr_warmup_samples))
    lr = _pick(args.lr, r("lr"), default_opt.lr)
    if args.min_lr is not None:
        min_lr = args.min_lr
    else:  # keep the recipe's floor as a fraction of the peak (Pythia: 10%)
        base_lr = r("lr") or default_opt.lr
        min_lr = float(f"{lr * (r('min_lr') if recipe else default_opt.min_lr) / base_lr:.12g}")
    optimizer = OptimizerSettings(
        lr=lr,
        min_lr=min_lr,
        lr_decay_style=_pick(args.lr_decay_style, r("lr_decay_style"), default_opt.lr_decay_style),
        lr_warmup_fraction=(args.lr_warmup_fraction if warmup_given
                            else _pick(None, r("lr_warmup_fraction"), 0.01)),
        lr_warmup_iters=args.lr_warmup_iters or 0,
        lr_warmup_samples=args.lr_warmup_samples or 0,
        lr_decay_iters=args.lr_decay_iters,
        lr_decay_samples=args.lr_decay_samples,
        weight_decay=_pick(args.weight_decay, r("weight_decay"), default_opt.weight_decay),
        adam_beta1=_pick(args.adam_beta1, r("adam_beta1"), default_opt.adam_beta1),
        adam_beta2=_pick(args.adam_beta2, r("adam_beta2"), default_opt.adam_beta2),
        adam_eps=_pick(args.adam_eps, r("adam_eps"), default_opt.adam_eps),
        clip_grad=_pick(args.clip_grad, r("clip_grad"), default_opt.clip_grad),
    )
    default_train = TrainingSettings()
    train_iters = args.train_iters
    if train_iters is None and args.train_samples is None:
        train_iters = r("train_iters")
    training = TrainingSettings(
        micro_batch_size=_pick(args.micro_batch_size, r("micro_batch_size"),
                               default_train.micro_batch_size),
        global_batch_size=_pick(args.global_batch_size, r("global_batch_size"),
                                default_train.global_batch_size),
        train_iters=train_iters,
        train_samples=args.train_samples,
        seed=_pick(args.seed, None, default_train.seed),
        bf16=args.bf16,
        fp16=args.fp16,
        loss_scale=args.loss_scale,
        initial_loss_scale=_pick(args.initial_loss_scale, None, default_train.initial_loss_scale),
        recompute_granularity=args.recompute_granularity,
        recompute_num_layers=_pick(args.recompute_num_layers, None, 1),
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_grad_reduce=_pick(args.overlap_grad_reduce, None, True),
        device=_pick(args.device, None, "auto"),
        exit_on_nan=args.exit_on_nan,
        deterministic=args.deterministic_mode,
        exit_interval=args.exit_interval,
        exit_duration_in_mins=args.exit_duration_in_mins,
        num_workers=_pick(args.num_workers, None, 1),
    )
    config = RunConfig(
        model=model,
        method=spec.name,
        method_args={dest: getattr(args, dest) for dest in method_dests(spec.name)},
        preset=preset.name if preset else None,
        parallel=ParallelConfig(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            sequence_parallel=args.sequence_parallel,
        ),
        training=training,
        optimizer=optimizer,
        data=DataSettings(
            data_path=args.data_path,
            split=_pick(args.split, None, DataSettings.split),
            train_data_path=args.train_data_path,
            valid_data_path=args.valid_data_path,
            test_data_path=args.test_data_path,
            data_cache_path=args.data_cache_path,
            mock_data=args.mock_data,
            reset_position_ids=args.reset_position_ids,
            reset_attention_mask=args.reset_attention_mask,
            eod_mask_loss=args.eod_mask_loss,
        ),
        tokenizer=TokenizerSettings(
            tokenizer_type=args.tokenizer_type,
            tokenizer_model=args.tokenizer_model,
            vocab_file=args.vocab_file,
            merge_file=args.merge_file,
        ),
        checkpoint=CheckpointSettings(
            save=args.save, load=args.load, save_interval=args.save_interval,
            finetune=args.finetune, no_load_optim=args.no_load_optim,
            no_load_rng=args.no_load_rng, no_save_optim=args.no_save_optim,
            exit_signal_handler=args.exit_signal_handler,
            keep_last_checkpoints=args.keep_last_checkpoints,
        ),
        evaluation=EvalSettings(
            eval_interval=_pick(args.eval_interval, None, EvalSettings.eval_interval),
            eval_iters=_pick(args.eval_iters, None, EvalSettings.eval_iters),
        ),
        logging=LoggingSettings(
            log_interval=_pick(args.log_interval, None, LoggingSettings.log_interval),
            tensorboard_dir=args.tensorboard_dir,
            wandb_project=args.wandb_project,
            wandb_exp_name=args.wandb_exp_name,
            wandb_save_dir=args.wandb_save_dir,
            metrics_file=args.metrics_file,
        ),
    )
    return config


def parse_run_config(argv: Sequence[str] | None = None) -> tuple[RunConfig, argparse.Namespace]:
    """Parse flags into a RunConfig (argparse exits with usage on unknown flags)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return resolve(args), args
    except ConfigError as error:
        parser.error(str(error))
        raise  # unreachable; parser.error exits


def method_options(config: RunConfig) -> Any:
    """The chosen method's options object, rebuilt from the flags stored in the config."""
    spec = get_method(config.method)
    return spec.options_from_args(argparse.Namespace(**config.method_args))


def describe(config: RunConfig) -> str:
    """Human-readable resolved configuration, one `section.field: value` per line."""
    lines = []
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        if dataclasses.is_dataclass(value):
            for item in dataclasses.fields(value):
                lines.append(f"{section.name}.{item.name}: {getattr(value, item.name)}")
        elif isinstance(value, dict):
            for key, item in value.items():
                lines.append(f"{section.name}.{key}: {item}")
        else:
            lines.append(f"{section.name}: {value}")
    return "\n".join(lines)
