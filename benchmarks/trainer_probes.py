"""Probes on a running GRPO trainer: the wall time of each optimizer step, and its log-prob forwards.

Shared by `bench_overhead.py` and `gpu.py`. They attach from outside (a callback, a wrapper around the trainer's
log-prob forward), so that TRL's `GRPOTrainer` and `LaSeRGRPOTrainer` are measured by the same code.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, from its start to the end of its own logging.

    `synchronize` (e.g. `torch.cuda.synchronize`) is called at both ends, so that queued GPU work is counted in the
    step that queued it.
    """

    def __init__(self, synchronize: Callable[[], None] | None = None) -> None:
        self.start = 0.0
        self.seconds: list[float] = []
        self.logging = False
        self.synchronize = synchronize or (lambda: None)

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self.synchronize()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.seconds.append(time.perf_counter() - self.start)
        self.logging = True

    def on_log(self, args, state, control, **kwargs) -> None:
        if self.logging:  # the step's own log, not the summary at the end of training
            self.synchronize()
            self.seconds[-1] = time.perf_counter() - self.start
            self.logging = False


class ForwardTap:
    """Counts the trainer's log-prob forwards (training, TRL's old log-probs, LaSeR's extra one); with `keep_first`,
    also keeps the inputs and log-probs of the first forward that builds a graph (the policy forward of the first
    training step), to compare them with another computation of the same numbers."""

    def __init__(self, trainer: Any, keep_first: bool = False) -> None:
        self.count = 0
        self.first: dict[str, torch.Tensor | int] | None = None
        self._keep_first = keep_first
        self._forward = trainer._get_per_token_logps_and_entropies
        trainer._get_per_token_logps_and_entropies = self

    def __call__(
        self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int, *args, **kwargs
    ):
        self.count += 1
        result = self._forward(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        if self._keep_first and self.first is None and torch.is_grad_enabled():
            self.first = {
                "input_ids": input_ids.detach().cpu(),
                "attention_mask": attention_mask.detach().cpu(),
                "logits_to_keep": int(logits_to_keep),
                "logps": result[0].detach().float().cpu(),
            }
        return result
