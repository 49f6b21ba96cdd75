"""z_c's log-prob read while `generate` runs: for one extra token at test time (`scoring`), and in training so that
the mixing phase needs no extra forward pass.

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


class ZcRecorder:
    """Forward hook on `generate`'s forward calls: z_c's log-prob after each step and each sampled token's log-prob.

    Both come from the last-position logits that `generate` itself reads, at temperature 1: z_c's from the raw
    logits, the sampled tokens' from the distribution without the `excluded` tokens (those `generate` suppresses, as
    z_c after `trl-laser fit-row`), the one the answers were sampled from. Call t predicts generated token t, and under
    cached generation call t + 1 is fed that token (`input_ids[:, -1]`), so the previous call's log-softmax row is kept
    until the next call names the token to read from it; the last call's row is read after `generate` returns
    (`finish`). Memory is one `(rows, vocab)` row plus `(rows,)` floats per step, where `output_logits=True` would keep
    `(rows, vocab)` per step (e.g. 5 GB per row for 8192 tokens of a 152k vocabulary).
    """

    def __init__(self, token_id: int, excluded: Sequence[int] = ()):
        self.token_id = token_id
        self.excluded = sorted(set(excluded))
        self.steps: list[torch.Tensor] = []  # log pi(z_c | prefix) after each call
        self.token_steps: list[torch.Tensor] = []  # log pi(generated token t | prefix), gathered at call t + 1
        self._previous: torch.Tensor | None = None  # the last call's log-softmax row, (rows, vocab)

    def __call__(self, module: Any, args: Any, kwargs: Any, output: Any) -> None:
        logits = (output.logits if hasattr(output, "logits") else output[0])[:, -1].float()
        row = logits.log_softmax(-1)
        if self._previous is not None:
            fed = kwargs.get("input_ids", args[0] if args else None)
            if fed is None:
                raise RuntimeError("generate called the model without `input_ids`: the sampled tokens are unknown.")
            self.token_steps.append(self._gather(fed[:, -1]))
        self.steps.append(row[:, self.token_id])
        if self.excluded:
            excluded = torch.tensor(self.excluded, device=logits.device)
            row = logits.index_fill(1, excluded, float("-inf")).log_softmax(-1)
        self._previous = row

    def _gather(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._previous.gather(1, tokens.to(self._previous.device)[:, None]).squeeze(1)

    def finish(self, last_tokens: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """The log-probs of generated tokens 0 .. steps - 1, the last one read from the last call's row."""
        values = self.token_steps[:steps]
        if len(values) < steps:
            values.append(self._gather(last_tokens))
        self._previous = None
        return values


class GenerationZcCapture:
    """A `ZcRecorder` on the model while TRL's `generate` runs, read out per completion."""

    def __init__(self, token_id: int):
        self.token_id = token_id
        self._recorder = ZcRecorder(token_id)

    @contextlib.contextmanager
    def recording(self, model: Any) -> Iterator[None]:
        """Within, every forward call of `model` (a `generate` step) adds one value per row."""
        self._recorder = ZcRecorder(self.token_id)
        handle = model.register_forward_hook(self._recorder, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def read(self, completion_ids: Sequence[Sequence[int]], eos_token_ids: Sequence[int]) -> list[float]:
        """Per completion (rows in `generate`'s order, cut after their first EOS): z_c's log-prob after its EOS, NaN
        when it is truncated or ended at the last step. Then the record is emptied."""
        steps, self._recorder = self._recorder.steps, ZcRecorder(self.token_id)
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
    max_over_processes: Callable[[int], int] | None = None,
) -> tuple[torch.Tensor, int]:
    """The generation-time z_c log-prob of every local row (NaN if truncated), and how many rows needed `forward`.

    `captured` holds what generation read (None: nothing); the finished rows it lacks are computed by
    `forward(rows) -> values`, one call. Where a forward is a collective (ZeRO-3, FSDP), `max_over_processes(n)` is
    the largest n of all processes: every process then forwards that many rows (its own, padded with its row 0), so
    that all run the same number of forward calls.
    """
    values = torch.full(finished.shape, float("nan"), device=finished.device)
    if captured is not None and len(captured) == finished.numel():
        values = torch.tensor(captured, dtype=torch.float32, device=finished.device)
    missing = torch.nonzero(finished & torch.isnan(values)).squeeze(1)
    count = missing.numel() if max_over_processes is None else max_over_processes(missing.numel())
    if count == 0:
        return values, 0
    padding = torch.zeros(count - missing.numel(), dtype=torch.long, device=finished.device)
    values[missing] = forward(torch.cat([missing, padding]))[: missing.numel()]
    return values, missing.numel()
