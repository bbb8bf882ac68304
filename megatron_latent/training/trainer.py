"""The training loop: shared by both engines and blind to the method being trained.

Order of work: validate everything that can be checked cheaply (flags, world layout, data
paths, tokenizer, checkpoint compatibility), then initialise distributed state, build the
model and optimizer through the engine, restore a checkpoint, build data, and loop.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from ..arguments import describe, method_options
from ..config import ConfigError, count_parameters
from ..distributed import initialize_parallel
from ..flops import forward_flops_per_token
from ..methods.registry import MethodSpec, get_method
from ..models.specs import DOCUMENT_MASK_UNDER_TE
from . import checkpointing
from .checkpointing import TrainState
from .config import RunConfig
from .data import build_run_data, build_run_tokenizer, check_data
from .engines import Engine, make_engine
from .metrics import MetricsWriter, ThroughputWindow, device_peak_tflops, format_train_line
from .save_lock import lock_save_directory

logger = logging.getLogger(__name__)


@dataclass
class TrainSummary:
    """What a finished (or stopped) run reports."""

    iterations: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    train_loss: float | None = None
    validation: dict[str, float] = field(default_factory=dict)
    tokens_per_second: float | None = None
    stopped_by: str = "completed"
    history: list[dict[str, Any]] = field(default_factory=list)


def _print(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def select_device(run: RunConfig) -> torch.device:
    """The device this rank computes on: --device, else CUDA when visible."""
    choice = run.training.device
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())


def training_flops_per_token(run: RunConfig, spec: MethodSpec, options: Any) -> float:
    """Training FLOPs per token of the chosen method (3x forward; 4x with full recompute)."""
    model_config = spec.prepare_model_config(run.model, options)
    forward = spec.forward_flops_per_token(model_config, options, run.model.seq_length,
                                           run.parallel.tensor_model_parallel_size)
    return forward * (4.0 if run.training.recompute_granularity == "full" else 3.0)


def use_deterministic_algorithms() -> None:
    """--deterministic-mode: the same results for the same seed and data, run after run
    (slower). Also pins cuBLAS's workspace (needed before the first CUDA matmul) and keeps
    SDPA on its math kernel, whose backward does not accumulate with atomics."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)


def validate_run(run: RunConfig, spec: MethodSpec, world_size: int, device: torch.device) -> None:
    """Every check that needs no model: raises ConfigError naming the flag or path."""
    run.training.validate()
    run.optimizer.validate()
    run.evaluation.validate()
    run.parallel.validate(world_size)
    dp = run.parallel.data_parallel_size(world_size)
    run.training.num_microbatches(dp)
    schedule_samples(run, run.training.total_iters())
    run.model.validate(run.parallel.tensor_model_parallel_size)
    if run.parallel.pipeline_model_parallel_size > 1:
        if device.type != "cuda":
            raise ConfigError(
                "--pipeline-model-parallel-size > 1 needs the CUDA engine (megatron-core's "
                "pipeline schedules); the CPU engine runs PP=1")
        if not spec.supports_pipeline_parallel:
            raise ConfigError(spec.pipeline_refusal
                              or f"--method {spec.name} does not support PP > 1")
        if run.model.num_layers % run.parallel.pipeline_model_parallel_size:
            raise ConfigError(
                f"--num-layers {run.model.num_layers} is not divisible by "
                f"--pipeline-model-parallel-size {run.parallel.pipeline_model_parallel_size}")
    if run.parallel.sequence_parallel and run.model.seq_length % run.parallel.tensor_model_parallel_size:
        raise ConfigError("--seq-length must be divisible by TP under --sequence-parallel")
    if run.data.reset_attention_mask and run.model.attention_backend == "te":
        raise ConfigError(DOCUMENT_MASK_UNDER_TE)
    if run.training.fp16 and device.type != "cuda":
        raise ConfigError("--fp16 needs CUDA; use fp32 or --bf16 on the CPU")
    if run.training.use_distributed_optimizer and device.type != "cuda":
        raise ConfigError("--use-distributed-optimizer needs the CUDA engine")
    if run.checkpoint.save_interval is not None and run.checkpoint.save_interval <= 0:
        raise ConfigError("--save-interval must be positive")
    if run.checkpoint.save_interval and not run.checkpoint.save:
        raise ConfigError("--save-interval needs --save <directory>")
    keep = run.checkpoint.keep_last_checkpoints
    if keep is not None and keep < 1:
        raise ConfigError(f"--keep-last-checkpoints must be >= 1, got {keep}")
    if keep is not None and not run.checkpoint.save:
        raise ConfigError("--keep-last-checkpoints needs --save <directory>")
    if run.checkpoint.load and os.path.exists(run.checkpoint.load) and \
            not os.path.isdir(run.checkpoint.load):
        raise ConfigError(f"--load {run.checkpoint.load} is a file, not a checkpoint directory")
    if run.logging.log_interval <= 0:
        raise ConfigError("--log-interval must be positive")
    (spec.check_data or check_data)(run)


def check_vocab_against_checkpoint(run: RunConfig) -> None:
    """A tokenizer larger than the checkpoint's vocabulary cannot reuse its embeddings."""
    if not run.checkpoint.load:
        return
    stored = checkpointing.read_checkpoint_config(run.checkpoint.load)
    if stored is None:
        return
    saved = stored["model"]
    saved_vocab = saved["vocab_size"]
    if run.model.vocab_size > saved_vocab:
        raise ConfigError(
            f"tokenizer vocabulary ({run.model.vocab_size}) is larger than the checkpoint's "
            f"({saved_vocab}) in {run.checkpoint.load}")
    for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size"):
        if saved.get(name) != getattr(run.model, name):
            raise ConfigError(
                f"--load {run.checkpoint.load}: checkpoint has {name}={saved.get(name)}, this "
                f"run {getattr(run.model, name)}")
    if stored.get("method") != run.method and not run.checkpoint.finetune:
        raise ConfigError(
            f"--load {run.checkpoint.load} was trained with --method {stored.get('method')}; "
            f"this run uses --method {run.method} (add --finetune to start from its weights)")


def schedule_samples(run: RunConfig, total_iters: int) -> tuple[int, int]:
    """(warmup, decay) lengths in samples, from the Megatron-style LR flags."""
    opt = run.optimizer
    batch = run.training.global_batch_size
    decay = opt.lr_decay_samples or (opt.lr_decay_iters or total_iters) * batch
    if opt.lr_warmup_samples:
        warmup = opt.lr_warmup_samples
    elif opt.lr_warmup_iters:
        warmup = opt.lr_warmup_iters * batch
    else:
        warmup = int((opt.lr_warmup_fraction or 0.0) * decay)
    if warmup >= decay:
        raise ConfigError(f"LR warmup ({warmup} samples) must be shorter than LR decay "
                          f"({decay} samples): check --lr-warmup-* against --train-iters")
    return warmup, decay


def build_scheduler(run: RunConfig, optimizer, total_iters: int) -> OptimizerParamScheduler:
    """megatron-core's scheduler, stepped in samples as Megatron-LM does."""
    opt = run.optimizer
    warmup, decay = schedule_samples(run, total_iters)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=opt.lr, min_lr=opt.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=decay, lr_decay_style=opt.lr_decay_style, start_wd=opt.weight_decay,
        end_wd=opt.weight_decay, wd_incr_steps=decay, wd_incr_style="constant",
    )


class StopSignal:
    """Remembers SIGTERM / SIGUSR1 (Slurm preemption) so the loop can save and exit cleanly.

    A handler it replaces that recorded a signal in a ``received`` attribute (pretrain.py
    installs one at process start, so a signal during imports and set-up is kept) hands that
    signal over: the loop then saves and exits at its first check.
    """

    def __init__(self, enabled: bool):
        self.received: int | None = None
        self._previous = {}
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread
                    continue
                if self.received is None:
                    self.received = getattr(self._previous[sig], "received", None)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def any_rank(self, device: torch.device) -> bool:
        flag = torch.tensor([1 if self.received is not None else 0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Runs one RunConfig to completion (or to a clean stop)."""

    def __init__(self, run: RunConfig):
        self.run = run
        self.spec = get_method(run.method)
        self.options = method_options(run)

    def dry_run(self) -> str:
        """The resolved configuration, parameter and FLOP counts, without touching devices;
        refuses exactly what the real run would refuse before building a model."""
        run = self.run
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        validate_run(run, self.spec, world_size, select_device(run))
        if run.tokenizer.tokenizer_type:
            run.model.vocab_size = build_run_tokenizer(run).vocab_size
        tp = run.parallel.tensor_model_parallel_size
        run.model.validate(tp)
        check_vocab_against_checkpoint(run)
        counts = count_parameters(run.model, tp)
        vanilla = forward_flops_per_token(run.model, run.model.seq_length, tp).forward
        method_forward = self.spec.forward_flops_per_token(
            self.spec.prepare_model_config(run.model, self.options), self.options,
            run.model.seq_length, tp)
        extra = self.spec.extra_parameters(run.model, self.options)
        parameters = (f"parameters: {counts['total'] + extra:,} (non-embedding "
                      f"{counts['non_embedding'] + extra:,}; vocab padded to "
                      f"{counts['padded_vocab_size']})")
        if extra:
            parameters += (f"; the Pythia model {counts['total']:,}, {run.method} adds "
                           f"{extra:,}")
        lines = [describe(run), "", parameters,
                 f"FLOPs per token, vanilla: forward {vanilla:.4g}, training {3 * vanilla:.4g}",
                 f"FLOPs per token, {run.method}: forward {method_forward:.4g}, training "
                 f"{training_flops_per_token(run, self.spec, self.options):.4g} "
                 f"({method_forward / vanilla:.3f}x vanilla)"]
        if not self.spec.batches_are_gpt_samples:
            lines[-1] += (" per position the model executes (padding included; its batches "
                          "come from the method's own data)")
            lines.append(f"training steps: {run.training.total_iters()}; tokens per step are "
                         "set by the method's data flags")
            return "\n".join(lines)
        tokens = run.training.total_iters() * run.training.global_batch_size * run.model.seq_length
        lines.append(f"training tokens: {tokens:,} "
                     f"({run.training.total_iters()} iterations x "
                     f"{run.training.global_batch_size} x {run.model.seq_length})")
        return "\n".join(lines)

    # -- set-up ----------------------------------------------------------------------------
    def setup(self) -> None:
        run = self.run
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.device = select_device(run)
        validate_run(run, self.spec, world_size, self.device)
        self.tokenizer = build_run_tokenizer(run)
        run.model.vocab_size = int(self.tokenizer.vocab_size)
        run.model.validate(run.parallel.tensor_model_parallel_size)
        check_vocab_against_checkpoint(run)

        if run.training.deterministic:
            use_deterministic_algorithms()
        initialize_parallel(run.parallel, self.device, seed=run.training.seed)
        self.save_lock = lock_save_directory(run.checkpoint.save)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release what the run holds outside this process (the --save directory's lock)."""
        lock, self.save_lock = getattr(self, "save_lock", None), None
        if lock is not None:
            lock.release()

    def _build(self) -> None:
        run = self.run
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.num_microbatches = run.training.num_microbatches(self.dp_size)
        self.total_iters = run.training.total_iters()
        self.engine: Engine = make_engine(run, self.device, self.spec, self.options)
        self.engine.build()
        self.scheduler = build_scheduler(run, self.engine.optimizer, self.total_iters)
        self.state = TrainState()
        if run.checkpoint.load and checkpointing.read_tracker(run.checkpoint.load) is None:
            # As in Megatron-LM: --load == --save lets a requeued job resume, and the very
            # first launch (nothing saved yet) starts from scratch.
            _print(f"WARNING: --load {run.checkpoint.load} holds no checkpoint yet "
                   f"(no {checkpointing.TRACKER_FILE}); training from scratch")
        elif run.checkpoint.load:
            self.state = checkpointing.load_checkpoint(
                run.checkpoint.load, self.engine, self.scheduler,
                finetune=run.checkpoint.finetune,
                load_optimizer=not (run.checkpoint.no_load_optim or run.checkpoint.finetune),
                load_rng=not (run.checkpoint.no_load_rng or run.checkpoint.finetune),
            )
            if run.checkpoint.finetune:
                self.scheduler = build_scheduler(run, self.engine.optimizer, self.total_iters)
        if self.spec.build_data is not None:
            self.data = self.spec.build_data(run, self.tokenizer, self.options,
                                             self.state.consumed_train_samples,
                                             self.state.consumed_tokens, self.total_iters)
        else:
            self.data = build_run_data(run, self.tokenizer, self.state.consumed_train_samples,
                                       self.total_iters)
        self.flops_per_token = training_flops_per_token(run, self.spec, self.options)
        dtype = "bf16" if run.training.bf16 else "fp16" if run.training.fp16 else "fp32"
        self.peak_tflops = device_peak_tflops(self.device, dtype)
        rank0 = dist.get_rank() == 0
        metrics_file = run.logging.metrics_file or (
            os.path.join(run.checkpoint.save, "metrics.jsonl") if run.checkpoint.save else None)
        self.metrics = MetricsWriter(rank0, run.logging.tensorboard_dir, metrics_file,
                                     run.logging.wandb_project, run.logging.wandb_exp_name,
                                     run.logging.wandb_save_dir, run.to_dict())
        model = self.engine.unwrapped_model()
        local_params = sum(p.numel() for p in model.parameters())
        _print(f"> engine: {self.engine.name} on {self.device} | world {dist.get_world_size()} "
               f"(TP={run.parallel.tensor_model_parallel_size}, "
               f"PP={run.parallel.pipeline_model_parallel_size}, DP={self.dp_size}) | method "
               f"{run.method} | parameters on rank 0: {local_params:,} | micro-batches per "
               f"step: {self.num_microbatches}")

    # -- pieces of the loop ------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        results = {}
        for name, batches in self.data.validation():
            if not batches:
                continue
            outcome = self.engine.evaluate(batches)
            results[name] = outcome.loss
        return results

    def _log_validation(self, iteration: int, results: dict[str, float]) -> None:
        for name, loss in results.items():
            ppl = math.exp(min(loss, 50.0))
            label = "validation loss" if name == "validation" else f"validation loss ({name})"
            _print("-" * 100)
            _print(f" {label} at iteration {iteration} | lm loss value: {loss:.6E} | "
                   f"lm loss PPL: {ppl:.6E} |")
            _print("-" * 100)
            key = "validation" if name == "validation" else f"validation/{os.path.basename(name)}"
            self.metrics.write(iteration, {"lm_loss": loss, "ppl": ppl}, kind=key)

    def save(self) -> None:
        if not self.run.checkpoint.save:
            return
        started = time.perf_counter()
        path = checkpointing.save_checkpoint(
            self.run.checkpoint.save, self.state, self.engine, self.scheduler,
            self.run.to_dict(), save_optimizer=not self.run.checkpoint.no_save_optim)
        _print(f"> saved checkpoint {path} ({time.perf_counter() - started:.1f}s)")
        keep = self.run.checkpoint.keep_last_checkpoints
        if keep:
            for deleted in checkpointing.prune_checkpoints(self.run.checkpoint.save, keep,
                                                           self.state.iteration):
                _print(f"> deleted checkpoint {deleted} (--keep-last-checkpoints {keep})")

    # -- the loop ---------------------------------------------------------------------------
    def train(self) -> TrainSummary:
        run = self.run
        summary = TrainSummary()
        stop = StopSignal(run.checkpoint.exit_signal_handler)
        window = ThroughputWindow()
        started = time.time()
        global_batch = run.training.global_batch_size
        log_loss, log_aux, log_count = 0.0, {}, 0
        steps = self.data.train_steps()
        self.last_step_samples = global_batch  # a method's own data reports its own count
        try:
            while self.state.iteration < self.total_iters:
                try:
                    step = next(steps)
                except StopIteration:
                    summary.stopped_by = "data exhausted"
                    break
                result = self.engine.train_step(step.microbatches)
                self.last_step_samples = step.samples
                self.state.iteration += 1
                self.state.consumed_train_samples += step.samples
                self.state.consumed_tokens += step.tokens
                self.state.executed_tokens += step.flop_tokens
                self.scheduler.step(increment=global_batch)
                if result.skipped:
                    self.state.skipped_iterations += 1
                if result.nan:
                    self.state.nan_iterations += 1
                window.add(step.tokens, step.flop_tokens)
                if not result.nan:
                    log_loss += result.lm_loss
                    for key, value in result.aux.items():
                        log_aux[key] = log_aux.get(key, 0.0) + value
                    log_count += 1
                summary.history.append({"iteration": self.state.iteration,
                                        "lm_loss": result.lm_loss,
                                        "grad_norm": result.grad_norm, **result.aux})
                if self.state.iteration % run.logging.log_interval == 0:
                    self._log_train(result, window, log_loss, log_aux, log_count, summary)
                    log_loss, log_aux, log_count = 0.0, {}, 0
                interval = run.evaluation.eval_interval
                if interval and run.evaluation.eval_iters and self.state.iteration % interval == 0:
                    results = self.evaluate()
                    self._log_validation(self.state.iteration, results)
                    summary.validation = results
                save_interval = run.checkpoint.save_interval
                if save_interval and self.state.iteration % save_interval == 0:
                    self.save()
                if stop.any_rank(self.device):
                    _print(f"> received signal {stop.received or 'on another rank'}: saving "
                           "and exiting")
                    self.save()
                    summary.stopped_by = "signal"
                    return self._finish(summary)
                if run.training.exit_interval and \
                        self.state.iteration % run.training.exit_interval == 0:
                    self.save()
                    summary.stopped_by = "exit interval"
                    return self._finish(summary)
                if run.training.exit_duration_in_mins:
                    elapsed = torch.tensor([(time.time() - started) / 60.0], device=self.device)
                    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                    if elapsed.item() > run.training.exit_duration_in_mins:
                        self.save()
                        summary.stopped_by = "exit duration"
                        return self._finish(summary)
            if run.evaluation.eval_iters and (
                not run.evaluation.eval_interval
                or self.state.iteration % run.evaluation.eval_interval != 0
            ):
                results = self.evaluate()
                self._log_validation(self.state.iteration, results)
                summary.validation = results
            if run.checkpoint.save and (
                not run.checkpoint.save_interval
                or self.state.iteration % run.checkpoint.save_interval != 0
            ):
                self.save()
            return self._finish(summary)
        finally:
            stop.restore()
            self.metrics.close()
            self.close()

    def _log_train(self, result, window, loss_sum, aux_sums, count, summary) -> None:
        elapsed, iterations, tokens, flop_tokens = window.read_and_reset()
        tokens_per_second = tokens / max(elapsed, 1e-9)
        world = dist.get_world_size()
        tflops = self.flops_per_token * flop_tokens / max(elapsed, 1e-9) / world / 1e12
        mean_loss = loss_sum / count if count else float("nan")
        values = {
            "iteration": self.state.iteration,
            "train_iters": self.total_iters,
            "consumed_samples": self.state.consumed_train_samples,
            "consumed_tokens": self.state.consumed_tokens,
            "executed_tokens": self.state.executed_tokens,
            "ms_per_iteration": 1000.0 * elapsed / max(iterations, 1),
            "learning_rate": self.scheduler.get_lr(self.engine.optimizer.param_groups[0]),
            # samples of the last step: --global-batch-size, or a method's own unit (streams)
            "global_batch_size": self.last_step_samples,
            "lm_loss": mean_loss,
            "aux": {k: v / count for k, v in aux_sums.items()} if count else {},
            "loss_scale": result.loss_scale,
            "grad_norm": result.grad_norm,
            "skipped": self.state.skipped_iterations,
            "nan": self.state.nan_iterations,
            "tokens_per_second": tokens_per_second,
            "tflops_per_device": tflops,
            "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
            "memory": self.engine.memory_stats(),
        }
        _print(format_train_line(values))
        scalars = {
            "lm_loss": mean_loss, "learning_rate": values["learning_rate"],
            "grad_norm": result.grad_norm, "tokens_per_second": tokens_per_second,
            "tflops_per_device": tflops, "mfu": values["mfu"],
            "consumed_tokens": self.state.consumed_tokens,
            "skipped_iterations": self.state.skipped_iterations,
            "nan_iterations": self.state.nan_iterations,
            "loss_scale": result.loss_scale,
        }
        scalars.update(values["aux"])
        scalars.update(values["memory"])
        self.metrics.write(self.state.iteration, scalars)
        summary.tokens_per_second = tokens_per_second

    def _finish(self, summary: TrainSummary) -> TrainSummary:
        summary.iterations = self.state.iteration
        summary.consumed_samples = self.state.consumed_train_samples
        summary.consumed_tokens = self.state.consumed_tokens
        if summary.history:
            summary.train_loss = summary.history[-1]["lm_loss"]
        return summary


def pretrain(run: RunConfig) -> TrainSummary:
    """Set up and train; the function `pretrain.py` calls on every rank."""
    trainer = Trainer(run)
    trainer.setup()
    return trainer.train()
