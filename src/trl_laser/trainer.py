"""`LaSeRGRPOTrainer`: GRPO with LaSeR's last-token self-rewarding (`docs/method.md`), inside TRL's own data flow.

How it rides on `GRPOTrainer` (TRL 1.16), one small seam each:

- `_generate`: after TRL has generated, decoded, and measured the completions, z_c is appended to every finished
  completion (one that ends with an EOS id). Its position gets attention 1, so TRL's fused LM head scores
  `log pi(z_c | x, y, EOS)` in the same forward pass as the policy's tokens, and loss-mask 0 (through TRL's
  `tool_mask`), so it adds nothing to the policy loss, KL, entropy or token counts. `mask_truncated_completions`
  is applied here too, through the same mask, because TRL's own check would read z_c as a truncation.
- `_generate_single_turn`: while transformers' `generate` runs, a forward hook reads the generating policy's z_c
  log-prob right after each EOS (`generation_capture`), so the mixing phase needs no extra forward pass.
- `_calculate_rewards`: reward functions see the completion ids without z_c; the verifier's column is kept.
- `_generate_and_score_completions`: c_ref, the mixed advantage, and class weights over the whole generation batch
  (all processes) are attached to the batch as per-row tensors, which TRL shuffles and splits with the rest.
- `_compute_loss`: the z_c log-probs are read from TRL's own forward (`_get_per_token_logps_and_entropies`) and
  `alpha * l_MSE` is added, scaled so that the gradient accumulated over a generation batch is exactly the spec's
  when one generation batch makes one optimizer step, and so that alpha weighs l_MSE per optimizer step otherwise.

What a saved model and a checkpoint hold beyond TRL's, and resuming from them, is the mixin
`checkpointing.SelfRewardCheckpointing`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import textwrap
from typing import Any

import torch
from accelerate.utils import gather, is_peft_model
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from .answers import verification_timeouts
from .checkpointing import SelfRewardCheckpointing
from .config import LaSeRConfig, check_zero3_generation
from .core import (
    Phase,
    append_self_reward_token,
    between_group_gradient,
    class_weights,
    group_class_weights,
    laser_phase,
    mixed_advantages,
    pairwise_loss_gradient,
    self_reward_loss,
    self_reward_score,
)
from .generation_capture import GenerationZcCapture, complete_generation_zc
from .reference import RefConstant
from .rewards import check_verifier_values, verifier_index
from .row_update import row_update_for
from .self_reward_log import SelfRewardLog
from .suppression import PolicyWithoutToken, suppress_in_generation
from .tokens import resolve_self_reward_token


logger = logging.getLogger(__name__)

# Keys of TRL's generation batch that `_get_per_token_logps_and_entropies` takes (multimodal inputs).
_FORWARD_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)
_PHASE_CODE = {Phase.REASONING: 0, Phase.SELF_REWARD: 1, Phase.MIXED: 2}


@dataclasses.dataclass
class _GenerationBatch:
    """What LaSeR's steps share about one generation batch: `finished` and `targets` cover all processes."""

    mode: str
    phase: Phase
    mixing: bool
    pairing: bool  # the pair loss is on: it needs the generating policy's scores
    centring: bool  # the MSE's part between groups is weighted down in the model's gradient: it needs them too
    process_slice: slice
    finished_local: torch.Tensor
    finished: torch.Tensor
    index: torch.Tensor  # the z_c column of each local row, -1 if truncated
    targets: torch.Tensor


class LaSeRGRPOTrainer(SelfRewardCheckpointing, GRPOTrainer):
    """[`~trl.GRPOTrainer`] that also trains the policy to score its own answers with one token (LaSeR).

    Same constructor as `GRPOTrainer`; `args` must be a [`LaSeRConfig`]. The first reward function (or the one named
    by `self_reward_verifier`) must return the 0/1 verifier reward (or None to leave a completion out).
    """

    _tag_names = ["trl", "grpo", "laser", "self-rewarding"]
    _name = "LaSeR"
    _paper = {
        "title": "LaSeR: Reinforcement Learning with Last-Token Self-Rewarding",
        "id": "2510.14943",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{yang2026laser,
                title        = {{LaSeR: Reinforcement Learning with Last-Token Self-Rewarding}},
                author       = {Wenkai Yang and Weijie Liu and Ruobing Xie and Yiju Guo and Lulu Wu and Saiyong Yang and Yankai Lin},
                booktitle    = {The Fourteenth International Conference on Learning Representations},
                year         = 2026,
                eprint       = {arXiv:2510.14943},
            }"""),
    }

    def __init__(self, model: Any, reward_funcs: Any = None, args: LaSeRConfig | None = None, *pargs, **kwargs):
        if not isinstance(args, LaSeRConfig):
            raise TypeError(
                "LaSeRGRPOTrainer needs `args=LaSeRConfig(...)` (a GRPOConfig with the self-reward settings), got "
                f"{type(args).__name__}. `LaSeRConfig` takes every GRPOConfig argument."
            )
        if args.self_reward_token is None:
            raise ValueError(
                "`self_reward_token` is required: a special token the model never emits and the chat template does "
                "not use, e.g. `<|vision_start|>` (Qwen2.5), `<|reserved_special_token_0|>` (Llama-3), `<gh_stars>` "
                "(SmolLM2)."
            )
        super().__init__(model, reward_funcs, args, *pargs, **kwargs)
        zero_stage = self.accelerator.state.deepspeed_plugin.zero_stage if self.is_deepspeed_enabled else None
        check_zero3_generation(zero_stage, args.ds3_gather_for_generation, args.use_vllm)
        # `num_embeddings`, not the weight's shape: ZeRO-3 partitions the weight to an empty tensor.
        vocab = self.accelerator.unwrap_model(self.model).get_input_embeddings().num_embeddings
        self.self_reward_token_id, self.self_reward_token = resolve_self_reward_token(
            self._tokenizer, args.self_reward_token, vocab, self.eos_token_ids
        )

        self._verifier_index = verifier_index(args.self_reward_verifier, self.reward_func_names, self.reward_funcs)
        if args.self_reward_suppress_sampling:
            suppress_in_generation(self, self.self_reward_token_id)
        self.policy_without_zc = self._policy_without_zc()

        self.row_update = row_update_for(self)  # the opt-in least-squares row update, or None

        self.row_only = args.self_reward_row_only
        self.ref_constant = RefConstant(args.self_reward_ref_constant)
        self.ref_constant.check_reference_kept(self.beta, is_peft_model(self.model))

        # TRL decides truncation by the last completion id, which is z_c for finished completions: LaSeR applies
        # `mask_truncated_completions` itself, through the loss mask.
        self._laser_mask_truncated = self.mask_truncated_completions
        self.mask_truncated_completions = False

        self._laser_finished: list[bool] = []
        self._laser_verifier: torch.Tensor | None = None
        self._laser_unscorable: torch.Tensor | None = None
        self._laser_capture = False
        self._laser_captured: torch.Tensor | None = None
        self._laser_log = SelfRewardLog({"train": self.num_generations, "eval": self.num_generations_eval})
        # The generating policy's z_c log-prob, read during generation (None: compute it when the mix needs it).
        self.zc_capture: GenerationZcCapture | None = GenerationZcCapture(self.self_reward_token_id)
        self._laser_generation_zc: list[float] | None = None
        self._laser_zc_source: str | None = None
        self._laser_scored_batches = 0  # generation batches whose verifier values were checked
        self._laser_timeouts = verification_timeouts()

    def _policy_without_zc(self) -> PolicyWithoutToken | None:
        """`self_reward_exclude_from_policy`'s renormalisation of the loss's log-probs, or None."""
        if not self.args.self_reward_exclude_from_policy:
            return None
        model = self.accelerator.unwrap_model(self.model)
        PolicyWithoutToken.check_model(model.get_base_model() if is_peft_model(model) else model)
        return PolicyWithoutToken(self.self_reward_token_id, self.temperature)

    # ------------------------------------------------------------------ TRL seams
    def create_optimizer(self, model=None):
        """TRL's optimizer; with `self_reward_row_update='least_squares'`, step hooks hand z_c's row to that update."""
        optimizer = super().create_optimizer(model)
        if self.row_update is not None and not self.row_update.attached:
            self.row_update.attach(optimizer, self.accelerator.unwrap_model(self.model))
        return optimizer

    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        """TRL's generation; with transformers' `generate` (no tools), z_c's log-prob is read along the way."""
        own_rollouts = self.use_vllm or self.use_transformers_continuous_batching or self.rollout_func is not None
        if self.zc_capture is None or own_rollouts or self.tools:
            return super()._generate_single_turn(prompt_ids, *args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        with self.zc_capture.recording(model.get_base_model() if is_peft_model(model) else model):
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
        self._laser_generation_zc = self.zc_capture.read(completion_ids, self.eos_token_ids)
        return completion_ids, logprobs

    def _generate(self, prompts: list):
        self._laser_generation_zc = None
        prompt_ids, completion_ids, tool_mask, completions, logprobs, *rest = super()._generate(prompts)
        ids, mask, logprobs, self._laser_finished = append_self_reward_token(
            completion_ids,
            tool_mask,
            logprobs,
            self.eos_token_ids,
            self.self_reward_token_id,
            self._laser_mask_truncated,
        )
        return prompt_ids, ids, mask, completions, logprobs, *rest

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        completion_ids_list = [
            ids[:-1] if done else ids for ids, done in zip(completion_ids_list, self._laser_finished)
        ]
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        verifier = rewards_per_func[:, self._verifier_index]
        check_verifier_values(verifier, self.reward_func_names[self._verifier_index])
        if torch.isnan(verifier).all():
            self._verifier_missing(self.reward_func_names[self._verifier_index])
        self._laser_scored_batches += 1
        # Verifications past their time bound scored 0 (`answers.verification_timeouts`), all processes.
        seen, self._laser_timeouts = self._laser_timeouts, verification_timeouts()  # one read: none falls between two
        timeouts = self._laser_timeouts - seen
        mode = "train" if self.model.training else "eval"
        total = gather(torch.tensor([float(timeouts)], device=self.accelerator.device)).sum().item()
        self._metrics[mode]["self_reward/verification_timeouts"].append(total)
        self._laser_verifier = verifier.clone()
        self._laser_unscorable = torch.isnan(rewards_per_func).all(dim=1)
        return rewards_per_func

    def _verifier_missing(self, name: str) -> None:
        """A generation batch without a single 0/1 verifier value: an error at the first batch (the function is
        broken, and training would run with no self-reward signal at all), a warning and a count afterwards."""
        if self._laser_scored_batches == 0:
            raise ValueError(
                f"The verifier reward function {name!r} returned None for every completion of the first generation "
                "batch, so LaSeR has no 0/1 target to train the self-reward score on. Make it return 0 or 1 (None "
                "only to leave a completion out), or set `self_reward_verifier` to the name of the function that does."
            )
        mode = "train" if self.model.training else "eval"
        self._laser_log.verifier_missing(mode)
        logger.warning(
            "LaSeR: the verifier reward function %r returned None for every completion of this generation batch "
            "(step %d); the batch adds nothing to the self-reward loss. Logged as self_reward/verifier_missing.",
            name,
            self.state.global_step,
        )

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        # the policy forward of a training `_compute_loss`: also keep the final hidden states for the row's step
        capture = self.row_update is not None and self._laser_capture and self.model.training
        renormalise = self.policy_without_zc
        unwrapped = self.accelerator.unwrap_model(model)
        unwrapped = unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped
        with (
            self.row_update.capturing(True) if capture else contextlib.nullcontext(),
            # the loss's log-probs without z_c (`self_reward_exclude_from_policy`)
            renormalise.renormalising(unwrapped) if renormalise is not None else contextlib.nullcontext(),
        ):
            result = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        if self._laser_capture:  # the policy forward of `_compute_loss`: keep its log-probs, graph included
            self._laser_captured = result[0]
            self._laser_capture = False
        return result

    def _generate_and_score_completions(self, inputs):
        """TRL's generation batch, then LaSeR's three steps: c_ref and the generation-time z_c log-prob, the mixed
        advantage, and the per-row self-reward columns that TRL shuffles and splits with the rest of the batch."""
        output = super()._generate_and_score_completions(inputs)
        batch = self._laser_batch(output)
        old_zc, ref = self._laser_reference(output, batch)
        if batch.mixing:
            self._laser_mix(output, batch, old_zc, ref)
        self._laser_attach(output, batch, ref, old_zc)
        return output

    def _laser_batch(self, output: dict) -> _GenerationBatch:
        mode = "train" if self.model.training else "eval"
        device = output["completion_ids"].device
        local_n = output["completion_ids"].size(0)
        start = self.accelerator.process_index * local_n
        finished_local = torch.tensor(self._laser_finished, dtype=torch.bool, device=device)
        phase = laser_phase(
            self.state.global_step, self.args.reasoning_warmup_steps, self.args.self_reward_warmup_steps
        )
        return _GenerationBatch(
            mode=mode,
            phase=phase,
            mixing=phase == Phase.MIXED and self.args.self_reward_advantage_coef > 0 and mode == "train",
            pairing=phase != Phase.REASONING and self.args.self_reward_pair_loss_coef > 0 and mode == "train",
            centring=phase != Phase.REASONING and self.args.self_reward_mse_between_weight < 1 and mode == "train",
            process_slice=slice(start, start + local_n),
            finished_local=finished_local,
            finished=gather(finished_local),
            # TRL's own truncation masking is off (see `__init__`), so the attention mask counts every id, z_c too.
            index=torch.where(finished_local, output["completion_mask"].sum(dim=1) - 1, -1),
            targets=self._laser_verifier.to(device),
        )

    def _laser_reference(self, output: dict, batch: _GenerationBatch) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Step 1: the generation-time (old policy) z_c log-prob when needed (the first batch of "auto", and the mixing
        phase; `_generation_zc` says where it comes from), and c_ref per local row."""
        train, index, finished_local = batch.mode == "train", batch.index, batch.finished_local
        local_n, device = index.numel(), index.device
        estimate = self.ref_constant.needs_estimate and train
        needed = batch.mixing or batch.pairing or batch.centring or estimate
        old_zc = self._generation_zc(output, batch) if needed else None

        def sums(values: torch.Tensor) -> list[float]:  # over all processes, of the finished rows
            return (
                gather(torch.stack([torch.nan_to_num(values).sum(), finished_local.sum()]).double()[None])
                .sum(0)
                .tolist()
            )

        if estimate:
            self.ref_constant.estimate(*sums(old_zc))
        if self.ref_constant.mode == "model":
            ref_logps = output.get("ref_per_token_logps")
            if ref_logps is None:  # PEFT with beta == 0: the reference is the model with its adapters disabled
                ref_logps = self._laser_logps(output, reference=True)
            ref = self._at(ref_logps, index)
            reference_sums = sums(ref)
            if train:
                self.ref_constant.add_reference(*reference_sums)
        elif self.ref_constant.value is not None:
            ref = torch.full((local_n,), self.ref_constant.value, device=device)
        else:  # "auto" before any training batch (evaluation first): no score yet
            ref = torch.full((local_n,), float("nan"), device=device)
        return old_zc, ref

    def _generation_zc(self, output: dict, batch: _GenerationBatch) -> torch.Tensor:
        """The generating policy's z_c log-prob per local row (NaN if truncated), at the least cost available: TRL's
        old log-probs, else the value read during generation, else one no-grad forward over the rows that lack it."""
        if output.get("old_per_token_logps") is not None:
            return self._zc_source("TRL's old log-probs", self._at(output["old_per_token_logps"], batch.index))

        def forward(rows: torch.Tensor) -> torch.Tensor:
            multimodal = any(k in output for k in _FORWARD_KEYS)  # per-image fields: the whole batch, then the rows
            keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
            sub = output if multimodal else {k: output[k][rows] for k in keys}
            values = self._at(self._laser_logps(sub), batch.index if multimodal else batch.index[rows])
            return values[rows] if multimodal else values

        # Under ZeRO-3 / FSDP a forward is collective: every process runs one when any process needs it.
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        values, computed = complete_generation_zc(
            self._laser_generation_zc,
            batch.finished_local,
            forward,
            (lambda n: int(gather(torch.tensor([n], device=batch.index.device)).max().item()))
            if zero3 or self.is_fsdp_enabled
            else None,
        )
        self._metrics[batch.mode]["self_reward/zc_forward_rows"].append(computed / max(batch.index.numel(), 1))
        return self._zc_source(
            "one no-grad forward over the rows generation did not score"
            if computed
            else "generation (no extra forward)",
            values,
        )

    def _zc_source(self, source: str, values: torch.Tensor) -> torch.Tensor:
        """Say once, and again whenever it changes, where the mix's generation-time score comes from."""
        if source != self._laser_zc_source:
            logger.info("LaSeR: the generating policy's z_c log-prob now comes from %s.", source)
            self._laser_zc_source = source
        return values

    def _laser_mix(self, output: dict, batch: _GenerationBatch, old_zc: torch.Tensor, ref: torch.Tensor) -> None:
        """Step 2: replace TRL's advantage with the mix of the verifier's and the generating policy's score's."""
        args = self.args
        scores = gather(self_reward_score(old_zc, ref, args.self_reward_beta))
        mixed, used = mixed_advantages(
            gather(output["advantages"]),
            torch.nan_to_num(scores),
            batch.finished & ~torch.isnan(scores),
            self.num_generations,
            args.self_reward_advantage_coef,
            args.self_reward_std_threshold,
            args.scale_rewards,
            args.multi_objective_aggregation,
        )
        mixed = torch.where(self._laser_unscorable.to(mixed.device), 0.0, mixed)  # as TRL: no signal, no update
        output["advantages"] = mixed[batch.process_slice]
        # TRL logged A_v for the completions table: show the advantage that is trained on instead.
        for _ in range(mixed.numel()):
            self._logs["advantages"].pop()
        self._logs["advantages"].extend(mixed.tolist())
        self._metrics[batch.mode]["self_reward/mix_groups_used"].append(used.float().mean().item())

    def _laser_attach(
        self, output: dict, batch: _GenerationBatch, ref: torch.Tensor, old_zc: torch.Tensor | None
    ) -> None:
        """Step 3: targets, class weights over the whole generation batch (all processes) or per group, the gradients
        in each score of the group levers, c_ref and row numbers as per-row columns of the batch, and its metrics."""
        args, mode, finished, targets = self.args, batch.mode, batch.finished, batch.targets
        local_n, device = batch.index.numel(), batch.index.device
        valid = finished & ~torch.isnan(targets) & ~torch.isnan(gather(ref))
        coef, counts = (
            group_class_weights(torch.nan_to_num(targets), valid, self.num_generations)
            if args.self_reward_class_weights == "group"
            else class_weights(torch.nan_to_num(targets), valid, balanced=args.self_reward_balanced)
        )
        loss_coef = 0.0 if batch.phase == Phase.REASONING else args.self_reward_loss_coef
        # Gradients in each score, taken over the whole batch at the generating policy's scores: the pair loss's, and
        # the MSE's part between groups weighted down (`self_reward_mse_between_weight`)
        score_grad = torch.zeros(finished.numel(), device=device)
        if batch.pairing or batch.centring:
            scores = gather(self_reward_score(old_zc, ref, args.self_reward_beta))  # NaN where not finished
        if batch.pairing:
            value, gradient, n_pairs = pairwise_loss_gradient(
                scores, torch.nan_to_num(targets), valid, self.num_generations
            )
            score_grad += args.self_reward_pair_loss_coef * gradient.to(device)
            self._metrics[mode]["self_reward/pair_loss"].append(value)
            self._metrics[mode]["self_reward/pairs"].append(float(n_pairs))
        if batch.centring:
            weights = torch.where(valid & ~torch.isnan(scores), coef * loss_coef, 0.0)
            score_grad += between_group_gradient(
                scores, torch.nan_to_num(targets), weights, self.num_generations, args.self_reward_mse_between_weight
            ).to(device)
        output["self_reward_score_grad"] = score_grad[batch.process_slice]
        output["self_reward_index"] = batch.index
        output["self_reward_target"] = torch.nan_to_num(targets[batch.process_slice])
        output["self_reward_coef"] = coef[batch.process_slice]
        output["self_reward_loss_coef"] = torch.full((local_n,), float(loss_coef), device=device)
        output["self_reward_ref"] = torch.nan_to_num(ref)
        first = self._laser_log.generation_batch(mode, finished.numel())
        output["self_reward_row"] = first + batch.process_slice.start + torch.arange(local_n, device=device)

        metrics = self._metrics[mode]
        metrics["self_reward/phase"].append(float(_PHASE_CODE[batch.phase]))
        metrics["self_reward/frac_truncated"].append(1.0 - finished.float().mean().item())
        for key in ("w_correct", "w_incorrect", "n_correct", "n_incorrect"):
            metrics[f"self_reward/{key}"].append(float(counts[key]))
        if self.ref_constant.value is not None:
            metrics["self_reward/c_ref"].append(float(self.ref_constant.value))

    def _compute_loss(self, model, inputs):
        self._laser_capture = True
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._laser_capture = False
        logps, self._laser_captured = self._laser_captured, None
        logp_zc = self._at(logps, inputs["self_reward_index"], fill=0.0)
        scores = self_reward_score(logp_zc.float(), inputs["self_reward_ref"], self.args.self_reward_beta)
        coef = inputs["self_reward_coef"]
        # Each micro-batch adds its rows' share of alpha * l_MSE (coef holds w / (N_c + N_i) of the whole generation
        # batch); times num_processes because data-parallel gradients are averaged, not summed, over processes; and
        # times steps_per_generation / gradient_accumulation_steps so that alpha weighs l_MSE per optimizer step, as
        # TRL's loss is per optimizer step, whatever the number of generation batches per step (1 when they agree).
        per_step = (
            self.args.steps_per_generation / self.current_gradient_accumulation_steps if self.model.training else 1
        )
        # `self_reward_row_only`: the MSE reaches z_c's row only (least squares); the pair loss still trains the model
        mse_scores = scores.detach() if self.row_only else scores
        mse_term = self_reward_loss(mse_scores, inputs["self_reward_target"], coef * inputs["self_reward_loss_coef"])
        # + the pair loss and the MSE's between-group reweighting: zero in value, their gradient in each score the one
        # `_laser_attach` took over the whole batch
        terms = mse_term + (inputs["self_reward_score_grad"] * (scores - scores.detach())).sum()
        loss = loss + self.accelerator.num_processes * per_step * terms
        if self.row_update is not None:
            self.row_update.accumulate(inputs, logp_zc, scores)
        # The free signal a user gets without LaSeR, logged beside the score: the completion's mean token log-prob.
        mask = inputs["completion_mask"] * inputs["tool_mask"] if "tool_mask" in inputs else inputs["completion_mask"]
        mean_logp = (logps.detach() * mask).sum(1) / mask.sum(1).clamp(min=1)
        self._laser_record(scores.detach(), mean_logp.float(), inputs)
        return loss

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _at(per_token: torch.Tensor, index: torch.Tensor, fill: float = float("nan")) -> torch.Tensor:
        """Value of `per_token` (B, T) at column `index` (B,), `fill` where index is -1."""
        values = per_token.gather(1, index.clamp(min=0).unsqueeze(1)).squeeze(1)
        return torch.where(index >= 0, values, torch.full_like(values, fill))

    def _laser_logps(self, batch: dict, reference: bool = False) -> torch.Tensor:
        """Per-token log-probs of the policy (or its PEFT reference) on a generation batch, without grad."""
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        mode = "train" if self.model.training else "eval"
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        forward_kwargs = {k: batch[k] for k in _FORWARD_KEYS if k in batch}
        adapters = contextlib.nullcontext()
        if reference:  # the PEFT reference: adapters disabled (or TRL's "ref" adapter when re-training one)
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapters = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            adapters,
        ):
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, batch["completion_ids"].size(1), batch_size, **forward_kwargs
            )
        return logps

    def _laser_record(self, scores: torch.Tensor, mean_logp: torch.Tensor, inputs: dict) -> None:
        """Keep this micro-batch's scores for the logged metrics and the completions table (first iteration only)."""
        mode = "train" if self.model.training else "eval"
        if mode == "train" and (self._step // self.args.steps_per_generation) % self.num_iterations != 0:
            return
        coef = inputs["self_reward_coef"]
        sq = coef * (scores - inputs["self_reward_target"]).square()
        mse = self.accelerator.reduce(torch.where(coef != 0, sq, 0.0).sum(), reduction="sum")
        has = (inputs["self_reward_index"] >= 0).float()
        row = inputs["self_reward_row"].float()
        packed = torch.stack([scores, inputs["self_reward_target"], has, coef, row, mean_logp], 1)
        self._laser_log.record(mode, mse.item(), gather(packed), self.log_completions)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        self._metrics[mode].update({k: [v] for k, v in self._laser_log.metrics(mode).items()})
        if self.log_completions and self.accelerator.is_main_process:
            column = self._logs["extra"]["self_reward"]
            column.clear()
            column.extend(self._laser_log.table_column(mode, len(self._logs["prompt"])))
        super().log(logs, start_time)
