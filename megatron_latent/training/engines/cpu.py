"""The CPU engine: gloo, torch-native DDP over the data-parallel group, AdamW, PP=1.

Loss reduction matches the CUDA engine: the optimised loss is the per-token mean over every
token of the global batch (all micro-batches, all data-parallel ranks), so gradients do not
depend on how the global batch is cut into micro-batches or ranks.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from ...config import ConfigError
from ...distributed import allreduce_sequence_parallel_grads
from ...models.hf_gpt_neox import load_canonical, model_to_canonical
from ...models.language_model import RuntimeOptions
from ...models.layers import ParallelResidualLayer
from .base import (
    SUMMED_AUX_LOSS,
    Engine,
    EvalResult,
    NonFiniteLossError,
    StepResult,
    split_model_output,
)
from .heap_release import HeapRelease


def _no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Megatron's rule: biases and 1-D parameters (norms) get no weight decay."""
    return name.endswith(".bias") or param.ndim == 1


def apply_activation_recompute(model: torch.nn.Module) -> int:
    """Recompute each transformer layer in backward instead of storing its activations
    (torch.utils.checkpoint; megatron's own checkpoint needs CUDA RNG state)."""
    count = 0
    for module in model.modules():
        if isinstance(module, ParallelResidualLayer) and not hasattr(module, "_plain_forward"):
            module._plain_forward = module.forward
            module.forward = partial(checkpoint, module._plain_forward, use_reentrant=False)
            count += 1
    return count


class CPUEngine(Engine):
    """Training on CPUs; what tests, laptops and `make demo` use."""

    name = "cpu"

    def build(self) -> None:
        run = self.run
        if run.parallel.pipeline_model_parallel_size > 1:
            raise ConfigError(
                "--pipeline-model-parallel-size > 1 needs the CUDA engine (megatron-core's "
                "pipeline schedules); the CPU engine runs PP=1"
            )
        if run.training.fp16:
            raise ConfigError("--fp16 needs CUDA; use fp32 or --bf16 on the CPU")
        runtime = RuntimeOptions(
            tensor_model_parallel_size=run.parallel.tensor_model_parallel_size,
            sequence_parallel=run.parallel.sequence_parallel,
            document_mask=run.data.reset_attention_mask,
        )
        model_config = self.method.prepare_model_config(run.model, self.method_options)
        self.model = self.method.build_model(model_config, runtime, self.device,
                                             self.method_options, True, True)
        if run.training.recompute_granularity == "full":
            apply_activation_recompute(self.model)
        self.dp_group = parallel_state.get_data_parallel_group()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.mp_group = parallel_state.get_model_parallel_group()
        if self.dp_size > 1:
            self.wrapped = DistributedDataParallel(self.model, process_group=self.dp_group,
                                                   broadcast_buffers=False)
        else:
            self.wrapped = self.model
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (no_decay if _no_weight_decay(name, param) else decay).append(param)
        opt = run.optimizer
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}],
            lr=opt.lr, betas=(opt.adam_beta1, opt.adam_beta2), eps=opt.adam_eps,
            weight_decay=opt.weight_decay,
        )
        self._autocast = (
            partial(torch.autocast, "cpu", dtype=torch.bfloat16) if run.training.bf16
            else nullcontext
        )
        self.heap = HeapRelease()

    # -- helpers -----------------------------------------------------------------------
    def _all_reduce_dp(self, tensor: Tensor) -> Tensor:
        if self.dp_size > 1:
            dist.all_reduce(tensor, group=self.dp_group)
        return tensor

    def _grad_norm(self) -> float:
        """Global L2 norm of the gradients, counting TP-replicated parameters once."""
        total = torch.zeros((), dtype=torch.float64)
        for param in self.model.parameters():
            if param.grad is not None and param_is_not_tensor_parallel_duplicate(param):
                total += param.grad.detach().double().pow(2).sum()
        if dist.get_world_size(self.mp_group) > 1:
            dist.all_reduce(total, group=self.mp_group)
        return math.sqrt(total.item())

    def _clip(self, grad_norm: float) -> None:
        clip = self.run.optimizer.clip_grad
        if clip and clip > 0:
            coefficient = clip / (grad_norm + 1e-6)
            if coefficient < 1.0:
                for param in self.model.parameters():
                    if param.grad is not None:
                        param.grad.mul_(coefficient)

    # -- the step ----------------------------------------------------------------------
    def train_step(self, microbatches: list[dict[str, Tensor]]) -> StepResult:
        self.wrapped.train()
        local_tokens = sum(batch["loss_mask"].sum() for batch in microbatches).double()
        global_tokens = self._all_reduce_dp(local_tokens.reshape(1)).item()
        if global_tokens <= 0:
            raise ConfigError("a global batch has no tokens with loss (check --eod-mask-loss)")
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64)
        aux_sums: dict[str, Tensor] = {}
        count = len(microbatches)
        for index, batch in enumerate(microbatches):
            sync = self.dp_size > 1 and index < count - 1
            with (self.wrapped.no_sync() if sync else nullcontext()), self._autocast():
                output = self.wrapped(**self.batch_inputs(batch))
                per_token, aux = split_model_output(output)
                mask = batch["loss_mask"].to(per_token.device, torch.float32)
                lm_sum = (per_token.float() * mask).sum()
                # DDP averages gradients over DP; scaling by dp_size makes that a sum, so the
                # optimised loss is the mean over all tokens of the global batch.
                objective = lm_sum * (self.dp_size / global_tokens)
                for key, value in aux.items():
                    if key.endswith(SUMMED_AUX_LOSS):  # normalised like the LM loss sum
                        objective = objective + value.float() * (self.dp_size / global_tokens)
                    elif key.endswith("_loss"):
                        objective = objective + value.float() / count
                objective.backward()
            loss_sum += lm_sum.detach().double()
            for key, value in aux.items():
                share = (self.dp_size / global_tokens if key.endswith(SUMMED_AUX_LOSS)
                         else 1.0 / count)
                aux_sums[key] = aux_sums.get(key, 0.0) + value.detach().double() * share
        allreduce_sequence_parallel_grads(self.model)

        loss_total = self._all_reduce_dp(loss_sum.reshape(1)).item()
        aux_values = {}
        for key, value in sorted(aux_sums.items()):
            aux_values[key] = self._all_reduce_dp(value.reshape(1)).item() / self.dp_size
        lm_loss = loss_total / global_tokens
        grad_norm = self._grad_norm()
        finite = math.isfinite(lm_loss) and math.isfinite(grad_norm)
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            if self.run.training.exit_on_nan:
                raise NonFiniteLossError(
                    f"non-finite loss {lm_loss} / grad norm {grad_norm} (--exit-on-nan)"
                )
            return StepResult(lm_loss, aux_values, grad_norm, skipped=True, nan=True,
                              tokens=int(global_tokens))
        self._clip(grad_norm)
        self.optimizer.step()
        self.heap.after_step()
        return StepResult(lm_loss, aux_values, grad_norm, tokens=int(global_tokens))

    @torch.no_grad()
    def evaluate(self, microbatches: list[dict[str, Tensor]]) -> EvalResult:
        self.model.eval()
        loss_sum = torch.zeros(2, dtype=torch.float64)
        for batch in microbatches:
            with self._autocast():
                per_token, _ = split_model_output(
                    self.model(**self.batch_inputs(batch))
                )
            mask = batch["loss_mask"].to(torch.float32)
            loss_sum[0] += (per_token.float() * mask).sum().double()
            loss_sum[1] += mask.sum().double()
        self._all_reduce_dp(loss_sum)
        self.model.train()
        return EvalResult(loss_sum[0].item(), int(loss_sum[1].item()))

    # -- state ---------------------------------------------------------------------------
    def unwrapped_model(self) -> torch.nn.Module:
        return self.model

    def model_state(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in model_to_canonical(self.model).items()}

    def load_model_state(self, shard: dict[str, Tensor]) -> None:
        load_canonical(self.model, shard)

    def optimizer_state(self, directory: str) -> dict[str, Any]:
        return {"kind": "torch_adamw", "state_dict": self.optimizer.state_dict()}

    def load_optimizer_state(self, state: dict[str, Any], directory: str) -> None:
        if state.get("kind") != "torch_adamw":
            raise ConfigError(
                f"checkpoint optimizer state is {state.get('kind')!r}, written by another "
                "engine; resume with --no-load-optim (or --finetune)"
            )
        self.optimizer.load_state_dict(state["state_dict"])
