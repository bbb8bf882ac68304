"""The CUDA engine: NCCL and megatron-core's own training machinery.

megatron-core DistributedDataParallel (contiguous grad buffers, overlapped bucketed reduce),
its optimizer (`get_megatron_optimizer`: fp32 main params for bf16/fp16, dynamic loss scale,
clipping, optional distributed optimizer that shards state over data-parallel ranks), and its
forward/backward schedules (`get_forward_backward_func`, pipelined when PP > 1). Losses are
per-token sums with `calculate_per_token_loss`; each micro-batch counts as one "token" there and
its loss is scaled by (micro-batches in the global batch) / (the global batch's loss-mask sum),
so `finalize_model_grads` turns the sum into the mean over the global batch's weighted tokens:
the same objective as the CPU engine, also for fractional loss masks (megatron-core counts
tokens as integers).
"""

from __future__ import annotations

import math
import os
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from torch import Tensor

from ...config import ConfigError
from ...models.hf_gpt_neox import load_canonical, model_to_canonical
from ...models.language_model import (
    RuntimeOptions,
    gradient_accumulation_fusion_available,
    rope_fusion_available,
)
from ..config import RunConfig
from .base import (
    SUMMED_AUX_LOSS,
    Engine,
    EvalResult,
    NonFiniteLossError,
    StepResult,
    any_rank_has_nonfinite,
    is_finite,
    split_model_output,
)

try:  # standard weight-decay exclusions (biases, 1-D params) when this release has them
    from megatron.core.optimizer import get_standard_config_overrides
except ImportError:  # pragma: no cover - older megatron-core
    get_standard_config_overrides = None

DISTRIB_OPTIM_FILE = "distrib_optim.pt"

#: fp16's first dynamic loss scale per loss token. Megatron-LM starts at 2^32 on a per-token
#: *mean* loss and halves it on each overflow (GPT runs settle near 2^13-2^17: about 15
#: skipped iterations). Here the micro-batch loss is a per-token *sum*, whose gradients are
#: tokens-per-micro-batch times larger, so 2^32 would mean ~30 skipped iterations at 16k
#: tokens. Starting at 2^16 per token begins inside the usual settled range.
INITIAL_LOSS_SCALE_PER_TOKEN = 2.0**16


def initial_loss_scale(tokens_per_microbatch: int) -> float:
    """The default first fp16 loss scale for a per-token-sum loss over
    `tokens_per_microbatch` tokens: 2^16 / tokens, rounded down to a power of two, >= 1."""
    scale = INITIAL_LOSS_SCALE_PER_TOKEN / max(tokens_per_microbatch, 1)
    return float(2.0 ** max(0, math.floor(math.log2(scale)))) if scale >= 1 else 1.0


def cuda_runtime_options(run: RunConfig) -> RuntimeOptions:
    """How the CUDA engine runs the model: precision, layout, and the fusions that are exact
    for Pythia and available here (weight-gradient accumulation into fp32 main grads, which
    needs apex's kernel for megatron-core's own linears; transformer-engine's fused rotary,
    which handles partial rotary — the unrotated dims pass through — but takes one set of
    positions for the whole batch, so not with --reset-position-ids). Bias-GeLU fusion stays
    off: it is the tanh approximation, not Pythia's exact GeLU."""
    training = run.training
    return RuntimeOptions(
        tensor_model_parallel_size=run.parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=run.parallel.pipeline_model_parallel_size,
        sequence_parallel=run.parallel.sequence_parallel,
        params_dtype=(torch.bfloat16 if training.bf16 else
                      torch.float16 if training.fp16 else torch.float32),
        bf16=training.bf16,
        fp16=training.fp16,
        recompute_granularity=training.recompute_granularity,
        recompute_num_layers=training.recompute_num_layers,
        use_cpu_initialization=False,
        document_mask=run.data.reset_attention_mask,
        gradient_accumulation_fusion=gradient_accumulation_fusion_available(),
        apply_rope_fusion=rope_fusion_available() and not run.data.reset_position_ids,
    )


class MegatronEngine(Engine):
    """Training on GPUs with megatron-core DDP, optimizer and pipeline schedules."""

    name = "megatron"

    def build(self) -> None:
        run = self.run
        training = run.training
        if training.bf16 and training.fp16:
            raise ConfigError("--bf16 and --fp16 are exclusive")
        pp = run.parallel.pipeline_model_parallel_size
        if pp > 1 and not self.method.supports_pipeline_parallel:
            raise ConfigError(self.method.pipeline_refusal
                              or f"method {self.method.name!r} does not support PP > 1")
        runtime = cuda_runtime_options(run)
        params_dtype = runtime.params_dtype
        model_config = self.method.prepare_model_config(run.model, self.method_options)
        model = self.method.build_model(
            model_config, runtime, self.device, self.method_options,
            parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage(),
        )
        self.bare_model = model
        config = model.config
        config.calculate_per_token_loss = True
        if training.bf16 or training.fp16:
            model = Float16Module(config, model)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=training.overlap_grad_reduce,
            use_distributed_optimizer=training.use_distributed_optimizer,
            check_for_nan_in_grad=False,
        )
        self.ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
        self.model_chunks = [self.ddp]
        opt = run.optimizer
        self.optimizer_config = OptimizerConfig(
            optimizer="adam",
            lr=opt.lr,
            min_lr=opt.min_lr,
            weight_decay=opt.weight_decay,
            adam_beta1=opt.adam_beta1,
            adam_beta2=opt.adam_beta2,
            adam_eps=opt.adam_eps,
            clip_grad=opt.clip_grad,
            bf16=training.bf16,
            fp16=training.fp16,
            params_dtype=params_dtype,
            loss_scale=training.loss_scale,
            initial_loss_scale=(
                training.initial_loss_scale if training.initial_loss_scale is not None
                else initial_loss_scale(training.micro_batch_size * run.model.seq_length)),
            use_distributed_optimizer=training.use_distributed_optimizer,
        )
        overrides = (get_standard_config_overrides(self.optimizer_config)
                     if get_standard_config_overrides else None)
        self.optimizer = get_megatron_optimizer(self.optimizer_config, self.model_chunks,
                                                config_overrides=overrides)
        config.no_sync_func = self.ddp.no_sync
        if training.overlap_grad_reduce:
            config.grad_sync_func = self.ddp.start_grad_sync
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss
        self.transformer_config = config
        self.forward_backward = get_forward_backward_func()

    # -- schedule callbacks ------------------------------------------------------------------
    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        inputs = self.batch_inputs(batch)
        output = model(**inputs)
        loss_mask = batch["loss_mask"].to(self.device, non_blocking=True)
        return output, partial(self._loss, loss_mask, self._objective_scale)

    def _set_objective_scale(self, microbatches: list[dict[str, Tensor]]) -> None:
        """(micro-batches over DP) / (loss-mask sum over DP), for `_loss`."""
        local = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in microbatches:
            local[0] += batch["loss_mask"].double().sum().to(self.device)
        local[1] = len(microbatches)
        dist.all_reduce(local, group=parallel_state.get_data_parallel_group())
        if local[0].item() <= 0:
            raise ConfigError("a global batch has no tokens with loss (check --eod-mask-loss)")
        self._objective_scale = local[1].item() / local[0].item()

    @staticmethod
    def _loss(loss_mask: Tensor, scale: float, output: Any):
        per_token, aux = split_model_output(output)
        mask = loss_mask.float()
        lm_sum = (per_token.float() * mask).sum()
        tokens = mask.sum()
        objective = lm_sum
        for key, value in aux.items():
            if key.endswith(SUMMED_AUX_LOSS):  # a sum, normalised like the LM loss sum
                objective = objective + value.float()
            elif key.endswith("_loss"):
                objective = objective + value.float() * tokens
        report = {"lm loss": torch.stack([lm_sum.detach(), tokens.detach()])}
        for key, value in aux.items():
            total = value.detach().float()
            if not key.endswith(SUMMED_AUX_LOSS):
                total = total * tokens
            report[key] = torch.stack([total, tokens.detach()])
        one = torch.ones((), dtype=torch.int, device=mask.device)
        return objective * scale, one, report

    def _run_schedule(self, microbatches, forward_only: bool):
        seq_length = microbatches[0]["tokens"].shape[1]
        return self.forward_backward(
            forward_step_func=self._forward_step,
            data_iterator=iter(microbatches),
            model=self.model_chunks,
            num_microbatches=len(microbatches),
            seq_length=seq_length,
            micro_batch_size=microbatches[0]["tokens"].shape[0],
            decoder_seq_length=seq_length,
            forward_only=forward_only,
        )

    def _reduce_reports(self, reports: list[dict[str, Tensor]]) -> dict[str, tuple[float, float]]:
        """Sum (value, tokens) pairs over micro-batches and DP; share from the last stage."""
        keys = sorted({key for report in reports for key in report}) if reports else []
        keys_list = [keys]
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            last = parallel_state.get_pipeline_model_parallel_last_rank()
            dist.broadcast_object_list(keys_list, src=last,
                                       group=parallel_state.get_pipeline_model_parallel_group())
        keys = keys_list[0]
        totals = torch.zeros(len(keys), 2, dtype=torch.float64, device=self.device)
        for report in reports:
            for index, key in enumerate(keys):
                if key in report:
                    totals[index] += report[key].double()
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(totals, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        return {key: (totals[i, 0].item(), totals[i, 1].item()) for i, key in enumerate(keys)}

    # -- the step ---------------------------------------------------------------------------
    def _gradient_buffers(self) -> list[Tensor]:
        """The DDP wrappers' contiguous gradient buffers (every parameter's gradient)."""
        return [buffer.grad_data for chunk in self.model_chunks
                for buffer in [*chunk.buffers, *getattr(chunk, "expert_parallel_buffers", [])]]

    def train_step(self, microbatches: list[dict[str, Tensor]]) -> StepResult:
        for chunk in self.model_chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        self._set_objective_scale(microbatches)
        reports = self._run_schedule(microbatches, forward_only=False)
        reduced = self._reduce_reports(reports)
        lm_sum, tokens = reduced.get("lm loss", (float("nan"), 0.0))
        lm_loss = lm_sum / max(tokens, 1.0)
        aux = {k: v / max(t, 1.0) for k, (v, t) in reduced.items() if k != "lm loss"}
        # fp16's loss scaler finds Inf/NaN gradients itself (it skips the step and lowers the
        # scale). Without one (bf16, fp32) megatron-core's optimizer would apply them: a NaN
        # norm is never clipped. So the step is skipped here, as the CPU engine does and as
        # Megatron-LM's --check-for-nan-in-loss-and-grad stops it.
        grad_norm_value: float | None = None
        if self.run.training.fp16:  # megatron-core's fp16 optimizer always has a loss scaler
            update_successful, grad_norm, _ = self.optimizer.step()
            finite = math.isfinite(lm_loss)  # an overflow skip is fp16's normal dynamics
        else:
            finite = math.isfinite(lm_loss) and not any_rank_has_nonfinite(
                self._gradient_buffers(), self.device)
            update_successful, grad_norm = False, None
            if finite:
                update_successful, grad_norm, _ = self.optimizer.step()
        if grad_norm is not None:
            grad_norm_value = float(grad_norm)
        nan = not finite or not is_finite(grad_norm_value)
        if nan and self.run.training.exit_on_nan:
            raise NonFiniteLossError(
                f"non-finite loss {lm_loss} / grad norm {grad_norm_value} (--exit-on-nan)")
        return StepResult(
            lm_loss=lm_loss, aux=aux, grad_norm=grad_norm_value,
            skipped=not update_successful, nan=nan, tokens=int(tokens),
            loss_scale=float(self.optimizer.get_loss_scale().item()),
        )

    @torch.no_grad()
    def evaluate(self, microbatches: list[dict[str, Tensor]]) -> EvalResult:
        for chunk in self.model_chunks:
            chunk.eval()
        self._objective_scale = 1.0  # forward only: the reports carry the sums
        reports = self._run_schedule(microbatches, forward_only=True)
        for chunk in self.model_chunks:
            chunk.train()
        lm_sum, tokens = self._reduce_reports(reports).get("lm loss", (0.0, 0.0))
        return EvalResult(lm_sum, int(tokens))

    # -- state ----------------------------------------------------------------------------
    def unwrapped_model(self) -> torch.nn.Module:
        return self.bare_model

    def model_state(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu().clone() for k, v in model_to_canonical(self.bare_model).items()}

    def load_model_state(self, shard: dict[str, Tensor]) -> None:
        load_canonical(self.bare_model, shard)

    def optimizer_state(self, directory: str) -> dict[str, Any]:
        if self.run.training.use_distributed_optimizer:
            # Gathered onto data-parallel rank 0, so a resume may use another DP size.
            self.optimizer.save_parameter_state(os.path.join(directory, DISTRIB_OPTIM_FILE))
        return {"kind": "megatron", "distributed": self.run.training.use_distributed_optimizer,
                "state_dict": self.optimizer.state_dict()}

    def load_optimizer_state(self, state: dict[str, Any], directory: str) -> None:
        if state.get("kind") != "megatron":
            raise ConfigError(
                f"checkpoint optimizer state is {state.get('kind')!r}, written by another "
                "engine; resume with --no-load-optim (or --finetune)")
        if bool(state.get("distributed")) != self.run.training.use_distributed_optimizer:
            raise ConfigError(
                "checkpoint and run disagree on --use-distributed-optimizer; resume with "
                "the same setting or with --no-load-optim")
        self.optimizer.load_state_dict(state["state_dict"])
        if self.run.training.use_distributed_optimizer:
            self.optimizer.load_parameter_state(os.path.join(directory, DISTRIB_OPTIM_FILE))

    def after_weights_loaded_without_optimizer(self) -> None:
        self.optimizer.reload_model_params()
