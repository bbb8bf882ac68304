"""Training metrics: Megatron-style console line, TensorBoard, W&B and a JSONL file.

Throughput and MFU:
    tokens/s       = tokens in the logged iterations / wall time
    TFLOP/s/device = (training FLOPs per token x tokens/s) / number of devices
    MFU            = TFLOP/s/device / the device's dense peak for the training dtype
Training FLOPs per token come from the method (every executed pass counted; see flops.py):
3 x forward, 4 x forward with full activation recompute.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

#: Dense (no sparsity) peak TFLOP/s by device name fragment and dtype, from vendor data sheets.
DEVICE_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100 SXM": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "GH200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "fp32": 80.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 31.2},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "V100": {"fp16": 125.0, "fp32": 15.7},
}


def device_peak_tflops(device: torch.device, dtype: str) -> float | None:
    """Peak dense TFLOP/s of `device` for `dtype` ('bf16', 'fp16', 'fp32'), if known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peaks in DEVICE_PEAK_TFLOPS.items():
        if fragment in name:
            return peaks.get(dtype)
    return None


@dataclass
class ThroughputWindow:
    """Accumulates iterations between two log lines."""

    started: float = field(default_factory=time.perf_counter)
    iterations: int = 0
    tokens: int = 0
    flop_tokens: int = 0

    def add(self, tokens: int, flop_tokens: int | None = None) -> None:
        """One step's training tokens and the token positions it executed (FLOPs are
        counted per position; padding included); by default the same."""
        self.iterations += 1
        self.tokens += tokens
        self.flop_tokens += tokens if flop_tokens is None else flop_tokens

    def read_and_reset(self) -> tuple[float, int, int, int]:
        """(seconds, iterations, tokens, executed positions) since the last read."""
        now = time.perf_counter()
        elapsed = now - self.started
        result = (elapsed, self.iterations, self.tokens, self.flop_tokens)
        self.started, self.iterations, self.tokens, self.flop_tokens = now, 0, 0, 0
        return result


class MetricsWriter:
    """Writes scalars to TensorBoard / W&B / JSONL on the logging rank (global rank 0)."""

    def __init__(self, enabled: bool, tensorboard_dir: str | None, metrics_file: str | None,
                 wandb_project: str | None, wandb_name: str | None, wandb_dir: str | None,
                 config: dict[str, Any]):
        self.enabled = enabled
        self.tensorboard = None
        self.wandb = None
        self.jsonl = None
        if not enabled:
            return
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=tensorboard_dir, max_queue=100)
        if metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
            self.jsonl = open(metrics_file, "a", buffering=1)
        if wandb_project:
            try:
                import wandb
            except ImportError as error:
                raise RuntimeError(
                    "--wandb-project needs the wandb package: pip install '.[wandb]'"
                ) from error
            self.wandb = wandb.init(project=wandb_project, name=wandb_name, dir=wandb_dir,
                                    config=config)

    def write(self, step: int, scalars: dict[str, float], kind: str = "train") -> None:
        if not self.enabled:
            return
        if self.tensorboard is not None:
            for key, value in scalars.items():
                if value is not None:
                    self.tensorboard.add_scalar(f"{kind}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in scalars.items() if v is not None},
                           step=step)
        if self.jsonl is not None:
            record = {"kind": kind, "iteration": step, "time": time.time()}
            record.update(scalars)
            self.jsonl.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()


def format_train_line(values: dict[str, Any]) -> str:
    """Megatron-LM's iteration log line, extended with tokens, throughput and memory."""
    parts = [
        f" [{time.strftime('%Y-%m-%d %H:%M:%S')}] iteration {values['iteration']:8d}/"
        f"{values['train_iters']:8d}",
        f"consumed samples: {values['consumed_samples']:12d}",
        f"consumed tokens: {values['consumed_tokens']:14d}",
        f"elapsed time per iteration (ms): {values['ms_per_iteration']:.1f}",
        f"learning rate: {values['learning_rate']:.6E}",
        f"global batch size: {values['global_batch_size']:5d}",
        f"lm loss: {values['lm_loss']:.6E}",
    ]
    for key, value in sorted(values.get("aux", {}).items()):
        parts.append(f"{key.replace('_', ' ')}: {value:.6E}")
    if values.get("loss_scale") is not None:
        parts.append(f"loss scale: {values['loss_scale']:.1f}")
    if values.get("grad_norm") is not None:
        parts.append(f"grad norm: {values['grad_norm']:.3f}")
    parts += [
        f"number of skipped iterations: {values['skipped']:3d}",
        f"number of nan iterations: {values['nan']:3d}",
        f"tokens/s: {values['tokens_per_second']:.0f}",
        f"TFLOP/s/device: {values['tflops_per_device']:.2f}",
        "MFU: " + (f"{values['mfu'] * 100:.1f}%" if values.get("mfu") is not None else "n/a"),
    ]
    for key, value in values.get("memory", {}).items():
        parts.append(f"{key.replace('_', ' ')}: {value:.2f}")
    return " | ".join(parts) + " |"
