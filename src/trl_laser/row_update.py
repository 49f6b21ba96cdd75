"""The opt-in least-squares update of z_c's output row (`self_reward_row_update='least_squares'`).

After each optimizer step, z_c's row of the output embedding is set to its value before the step plus the
Gauss-Newton step of LaSeR's MSE (`core.least_squares_row_step`), computed from the final hidden states that the
policy forward of `_compute_loss` produced; every other parameter keeps the optimizer's update. One object owns the
hooks, the running second-moment matrix and its checkpoint file, so the trainer only holds it (or None).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers import TrainerCallback

from .core import group_centred_system, least_squares_row_step, self_reward_score


# The running second-moment matrix, saved beside the optimizer state in every checkpoint.
ROW_STATE_NAME = "self_reward_row_state.pt"
# With `self_reward_row_refit_steps`: each process's kept micro-batches, one file per process.
REFIT_STATE_NAME = "self_reward_row_refit_{}.pt"
# What the refit reads again of a micro-batch: the sequences, and the columns `accumulate` reads.
REFIT_KEYS = (
    "prompt_ids",
    "prompt_mask",
    "completion_ids",
    "completion_mask",
    "self_reward_index",
    "self_reward_ref",
    "self_reward_target",
    "self_reward_coef",
    "self_reward_loss_coef",
    "self_reward_row",
)


def check_row_update_supported(peft: bool, deepspeed: bool, fsdp: bool, row_only: bool = False) -> None:
    """Refuse set-ups in which z_c's row cannot be set after the optimizer step (frozen or partitioned)."""
    unsupported = [name for name, on in (("PEFT", peft), ("DeepSpeed", deepspeed), ("FSDP", fsdp)) if on]
    if unsupported:
        # The row-only MSE needs the least-squares update: the fix must turn both off.
        fix = "`self_reward_row_update: optimizer`"
        if row_only:
            fix += " and `self_reward_row_only: false`"
        raise ValueError(
            "`self_reward_row_update='least_squares'` sets z_c's output-embedding row after each optimizer "
            f"step, which {unsupported[0]} does not allow (the row is frozen, or the optimizer updates its own "
            f"partitioned copy). Set {fix}, or train without {unsupported[0]}."
        )


def row_update_for(trainer: Any) -> LeastSquaresRowUpdate | None:
    """The trainer's least-squares row update (None with `self_reward_row_update='optimizer'`), its metric and
    cross-process sum wired to the trainer, and the end-of-training refit's callback when one is asked for."""
    args = trainer.args
    if args.self_reward_row_update != "least_squares":
        return None
    check_row_update_supported(
        is_peft_model(trainer.model), trainer.is_deepspeed_enabled, trainer.is_fsdp_enabled, args.self_reward_row_only
    )
    row_update = LeastSquaresRowUpdate(
        trainer.self_reward_token_id,
        args.self_reward_beta,
        args.self_reward_row_ridge,
        args.self_reward_row_forgetting,
        reduce=lambda t: trainer.accelerator.reduce(t, reduction="sum"),
        log_step_norm=lambda norm: trainer._metrics["train"]["self_reward/row_step_norm"].append(norm),
        group_size=trainer.num_generations,
        between_weight=args.self_reward_row_between_weight,
        group_slots=group_slots(args, trainer.num_generations),
        refit_steps=args.self_reward_row_refit_steps,
    )
    if args.self_reward_row_refit_steps:
        trainer.add_callback(RowRefit(trainer))
    return row_update


def group_slots(args: Any, group_size: int) -> int:
    """Slots for the per-group sums: the groups of as many consecutive generation batches as one optimizer step can
    see (`steps_per_generation` may be smaller than `gradient_accumulation_steps`)."""
    batches = -(-args.gradient_accumulation_steps // args.steps_per_generation) + 1
    return args.generation_batch_size // group_size * batches


class LeastSquaresRowUpdate:
    """z_c's row takes the least-squares step of the MSE; the optimizer updates everything else.

    `reduce` sums a tensor over processes (so every process takes the same step) and `log_step_norm` receives the
    norm of each step taken. With `between_weight < 1` the part of the fit between groups (one prompt's completions)
    is weighted down (`core.group_centred_system`): the rows of group k add to slot `k % group_slots` of per-group
    sums, so `group_slots` must exceed the number of groups one optimizer step can see.
    """

    def __init__(
        self,
        token_id: int,
        beta: float,
        ridge: float,
        forgetting: float,
        reduce: Callable[[torch.Tensor], torch.Tensor],
        log_step_norm: Callable[[float], None],
        group_size: int = 1,
        between_weight: float = 1.0,
        group_slots: int = 1,
        refit_steps: int = 0,
    ):
        self.token_id = token_id
        self.beta, self.ridge, self.forgetting = beta, ridge, forgetting
        self.group_size, self.between_weight, self.group_slots = group_size, between_weight, group_slots
        self._reduce, self._log_step_norm = reduce, log_step_norm
        self.gram: torch.Tensor | None = None  # the running B
        # u and B of the current optimizer step, then (between_weight < 1) the per-group sums of c phi, c, c r
        self._sums: list[torch.Tensor] | None = None
        self._hidden: list[torch.Tensor] = []
        self._capturing = False
        self._hooks: tuple = ()
        # `refit_steps`: the micro-batches of the last optimizer steps (CPU copies), and those of the current one
        self.refit_steps = refit_steps
        self._kept: list[list[dict[str, torch.Tensor]]] = []
        self._current: list[dict[str, torch.Tensor]] = []
        self._refitting = False

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def attach(self, optimizer: torch.optim.Optimizer, model: Any) -> None:
        """Hook the optimizer's step (snapshot the row before, set it after) and the model's final hidden states."""
        weight = model.get_output_embeddings().weight
        before: list[torch.Tensor] = []

        def snapshot(*_):
            before[:] = [weight.detach()[self.token_id].clone()]

        def least_squares(*_):
            with torch.no_grad():
                weight[self.token_id] = before.pop() + self._step(weight)

        self._hooks = (
            optimizer.register_step_pre_hook(snapshot),
            optimizer.register_step_post_hook(least_squares),
            model.base_model.register_forward_hook(self._keep_hidden_states),
        )

    @contextlib.contextmanager
    def capturing(self, enabled: bool) -> Iterator[None]:
        """Within, the model's forward keeps its final hidden states (the policy forward of a training step)."""
        self._capturing = enabled
        try:
            yield
        finally:
            self._capturing = False

    def _keep_hidden_states(self, module, args, output) -> None:
        if self._capturing:
            self._hidden.append(output.last_hidden_state.detach())

    def accumulate(self, inputs: dict, logp_zc: torch.Tensor, scores: torch.Tensor) -> None:
        """Add this micro-batch's rows to u and B (`core.least_squares_row_step`), from the captured states."""
        if not self._hidden:
            return
        if self.refit_steps and not self._refitting:
            self._current.append({key: inputs[key].detach().cpu() for key in REFIT_KEYS})
        hidden, self._hidden = torch.cat(self._hidden), []
        index = inputs["self_reward_index"]
        rows = torch.nonzero(index >= 0).squeeze(1)
        position = inputs["prompt_ids"].size(1) + index[rows] - 1  # the EOS, whose state predicts z_c
        # float64 for the within-group fit, which subtracts the large common part of the states from B
        dtype = torch.float32 if self.between_weight == 1 else torch.float64
        phi = hidden[rows, position].to(dtype) * (1 - logp_zc[rows].detach().to(dtype).exp())[:, None]
        coef = (inputs["self_reward_coef"] * inputs["self_reward_loss_coef"])[rows].to(dtype)
        residual = (scores[rows] - inputs["self_reward_target"][rows]).to(dtype)
        sums = [(coef * residual) @ phi, (phi * coef[:, None]).T @ phi]
        if self.between_weight < 1:
            slot = (inputs["self_reward_row"][rows] // self.group_size) % self.group_slots
            weighted = [phi * coef[:, None], coef, coef * residual]
            sums += [torch.zeros((self.group_slots, *t.shape[1:]), dtype=t.dtype, device=t.device) for t in weighted]
            for total, values in zip(sums[2:], weighted):
                total.index_add_(0, slot, values)
        self._sums = sums if self._sums is None else [a + b for a, b in zip(self._sums, sums)]

    def _step(self, weight: torch.Tensor, fresh: bool = False) -> torch.Tensor:
        """The step of z_c's row from this optimizer step's rows (all processes); 0 when there are none. `fresh`:
        solve with this step's matrix alone, leaving the running one as it is (the refit)."""
        if self.refit_steps and not fresh:
            self._kept = [*self._kept, self._current][-self.refit_steps :]
            self._current = []
        if self._sums is None:
            return torch.zeros_like(weight[0])
        gradient, gram, *groups = (self._reduce(t) for t in self._sums)
        self._sums = None
        if groups:
            gradient, gram = group_centred_system(gradient, gram, *groups, self.between_weight)
        if not torch.any(gram != 0):
            return torch.zeros_like(weight[0])
        if not fresh:
            self.gram = gram if self.gram is None else self.forgetting * self.gram.to(gram) + gram
        step = least_squares_row_step(gram if fresh else self.gram, gradient, self.beta, self.ridge)
        self._log_step_norm(step.norm().item())
        return step.to(weight.dtype)

    def refit(self, weight: torch.Tensor, forward: Callable[[dict], torch.Tensor]) -> None:
        """One least-squares step of z_c's row on the kept micro-batches, read again by `forward` (their log pi(z_c)
        under the current model, its final hidden states captured on the way), with a matrix built from them alone."""
        batches = [{k: v.to(weight.device) for k, v in b.items()} for step in self._kept for b in step]
        self._kept, self._sums, self._refitting = [], None, True
        try:
            with torch.no_grad():
                for inputs in batches:
                    with self.capturing(True):
                        logp_zc = forward(inputs)
                    scores = self_reward_score(logp_zc.float(), inputs["self_reward_ref"], self.beta)
                    self.accumulate(inputs, logp_zc, scores)
                weight[self.token_id] += self._step(weight, fresh=True)
        finally:
            self._refitting = False

    def save(self, output_dir: str, process_index: int = 0, should_save: bool = True) -> None:
        """The running matrix (the saving process), and each process's kept micro-batches (`refit_steps`)."""
        if should_save:
            gram = None if self.gram is None else self.gram.cpu()
            torch.save({"gram": gram}, os.path.join(output_dir, ROW_STATE_NAME))
        if self.refit_steps:
            torch.save(self._kept, os.path.join(output_dir, REFIT_STATE_NAME.format(process_index)))

    def load(self, checkpoint: str, device: torch.device, process_index: int = 0) -> None:
        """Restore the running matrix (and the kept micro-batches); a checkpoint without them cannot continue the
        same update."""
        paths = [os.path.join(checkpoint, ROW_STATE_NAME)]
        if self.refit_steps:
            paths.append(os.path.join(checkpoint, REFIT_STATE_NAME.format(process_index)))
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"Resuming with `self_reward_row_update='least_squares'` needs the row update's state saved in "
                    f"{path}, which is missing (the checkpoint was written without it). Resume with the settings "
                    "it was trained with (`self_reward_row_update`, `self_reward_row_refit_steps`), or start the run "
                    "afresh."
                )
        gram = torch.load(paths[0], map_location="cpu", weights_only=True)["gram"]
        self.gram = None if gram is None else gram.to(device)
        if self.refit_steps:
            self._kept = torch.load(paths[1], map_location="cpu", weights_only=True)


class RowRefit(TrainerCallback):
    """`self_reward_row_refit_steps`: at the end of training, the row update's refit, through the trainer's own
    policy forward (`_get_per_token_logps_and_entropies`), so that the refit reads log pi(z_c) as training does."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def on_train_end(self, args, state, control, model=None, **kwargs):
        trainer = self.trainer

        def forward(inputs: dict) -> torch.Tensor:
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
            mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
            logps = trainer._get_per_token_logps_and_entropies(model, ids, mask, inputs["completion_ids"].size(1))[0]
            return trainer._at(logps, inputs["self_reward_index"], fill=0.0)

        trainer.row_update.refit(model.get_output_embeddings().weight, forward)
