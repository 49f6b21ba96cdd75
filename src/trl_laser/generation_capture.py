"""z_c's log-prob read while TRL generates, so that the mixing phase needs no extra forward pass.

The mixed advantage needs the generating policy's score of every finished completion before the loss. TRL's
transformers `generate` already computes, at its step `t + 1`, the logits right after a completion's EOS generated at
step `t`: a forward hook on the model reads `log pi(z_c | x, y, EOS)` there for one log-sum-exp per step. What it
cannot give (a completion whose EOS was the last allowed token: `generate` stops before the next step; generation by
vLLM or continuous batching, which never call the model's forward) is left as NaN for the trainer to compute.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch


class GenerationZcCapture:
    """Records `log pi(z_c | prefix)` at the last position of every forward call of the hooked model."""

    def __init__(self, token_id: int):
        self.token_id = token_id
        self._steps: list[torch.Tensor] = []

    @contextlib.contextmanager
    def recording(self, model: Any) -> Iterator[None]:
        """Within, every forward call of `model` (a `generate` step) adds one value per row."""
        self._steps = []
        handle = model.register_forward_hook(self._record)
        try:
            yield
        finally:
            handle.remove()

    def _record(self, module: Any, args: Any, output: Any) -> None:
        logits = (output.logits if hasattr(output, "logits") else output[0])[:, -1].float()
        self._steps.append(logits[:, self.token_id] - logits.logsumexp(-1))

    def read(self, completion_ids: Sequence[Sequence[int]], eos_token_ids: Sequence[int]) -> list[float]:
        """Per completion (rows in `generate`'s order, cut after their first EOS): z_c's log-prob after its EOS, NaN
        when it is truncated or ended at the last step. Then the record is emptied."""
        steps, self._steps = self._steps, []
        eos = set(eos_token_ids)
        if not steps or steps[0].numel() != len(completion_ids):  # not one `generate` over these rows
            return [float("nan")] * len(completion_ids)
        values = torch.stack(steps).cpu()  # (calls, rows): call t predicts generated token t
        return [
            values[len(ids), row].item() if ids and ids[-1] in eos and len(ids) < len(steps) else float("nan")
            for row, ids in enumerate(completion_ids)
        ]


def complete_generation_zc(
    captured: Sequence[float] | None,
    finished: torch.Tensor,
    forward: Callable[[torch.Tensor], torch.Tensor],
    total_over_processes: Callable[[int], float] | None = None,
) -> tuple[torch.Tensor, int]:
    """The generation-time z_c log-prob of every local row (NaN if truncated), and how many rows needed `forward`.

    `captured` holds what generation read (None: nothing); the finished rows it lacks are computed by
    `forward(rows) -> values`, one call. `total_over_processes(n)` sums n over processes where a forward is a
    collective (ZeRO-3, FSDP): then a process that lacks nothing still joins the others' forward with one row.
    """
    values = torch.full(finished.shape, float("nan"), device=finished.device)
    if captured is not None and len(captured) == finished.numel():
        values = torch.tensor(captured, dtype=torch.float32, device=finished.device)
    missing = torch.nonzero(finished & torch.isnan(values)).squeeze(1)
    anywhere = missing.numel() if total_over_processes is None else total_over_processes(missing.numel())
    if anywhere == 0:
        return values, 0
    rows = missing if missing.numel() else torch.zeros(1, dtype=torch.long, device=finished.device)
    values[missing] = forward(rows)[: missing.numel()]
    return values, missing.numel()
