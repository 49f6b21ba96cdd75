"""The settings of a LaSeR run: `LaSeRConfig` (`GRPOConfig` plus the LaSeR settings of `docs/method.md`, defaults =
the paper's) and `LaSeRScriptArguments` (the data and rewards of `trl-laser train`), as TRL's and open-r1's configs."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

from trl import GRPOConfig


REF_MODES = ("auto", "model")
ROW_UPDATES = ("optimizer", "least_squares")
CLASS_WEIGHTS = ("batch", "group")


def parse_ref_constant(value: float | int | str, field_name: str = "self_reward_ref_constant") -> float | str:
    """Normalise c_ref: a number (float or numeric string) or one of "auto" / "model"; anything else is an error."""
    if isinstance(value, bool):
        raise ValueError(f"`{field_name}` must be a number <= 0, 'auto' or 'model', got {value!r}.")
    if isinstance(value, str):
        text = value.strip().lower()
        if text in REF_MODES:
            return text
        try:
            value = float(text)
        except ValueError:
            raise ValueError(
                f"`{field_name}` must be a number <= 0 (e.g. -23.0, the paper's value for Qwen2.5), 'auto' (estimate "
                f"it from the initial policy) or 'model' (the reference model's log-prob), got {value!r}."
            ) from None
    value = float(value)
    if not math.isfinite(value) or value > 0:
        raise ValueError(
            f"`{field_name}` is a log-probability and must be finite and <= 0, got {value}. Measure it with "
            "`trl-laser estimate-ref-constant` or set it to 'auto'."
        )
    return value


def check_zero3_generation(zero_stage: int | None, ds3_gather_for_generation: bool, use_vllm: bool) -> None:
    """Refuse generation under ZeRO-3 that gathers the weights layer by layer (`ds3_gather_for_generation: false`)
    without vLLM: the backward after it fails deep in DeepSpeed (lm_head's gradient has size 0), for TRL's own
    GRPOTrainer too. Checked by the trainer and, before anything starts, by `trl-laser train`'s launch."""
    if zero_stage == 3 and not ds3_gather_for_generation and not use_vllm:
        raise ValueError(
            "`ds3_gather_for_generation: false` under DeepSpeed ZeRO-3 without vLLM makes the first backward fail "
            "inside DeepSpeed (TRL's GRPOTrainer too). Set `ds3_gather_for_generation: true` (the default: the "
            "weights are gathered once per `generate`), or generate with vLLM (`use_vllm: true`)."
        )


FIT_ROW_FOLDS = 5  # `trl-laser fit-row`'s default folds, which the refit after training uses


@dataclass
class LaSeRScriptArguments:
    """Data and reward settings of `trl-laser train`, and what it does after training (the training settings are
    `LaSeRConfig`'s)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset name, local JSON/JSONL/parquet/CSV file, or `builtin:arithmetic` (generated, no "
            "network)."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of a Hub dataset."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(
        default="test", metadata={"help": "Split to evaluate on (only with `eval_strategy` other than `no`)."}
    )
    problem_column: str = field(default="problem", metadata={"help": "Column holding the problem text."})
    answer_column: str = field(
        default="answer", metadata={"help": "Column holding the gold answer that the verifier checks."}
    )
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system message of every prompt."})
    instruction: str | None = field(
        default=None,
        metadata={
            "help": "Text appended to every problem. Default: the paper's 'Please reason step by step, and put your "
            "final answer within \\boxed{}.', or 'Answer with just the number.' for builtin:arithmetic. '' for none."
        },
    )
    instruction_separator: str = field(
        default=" ",
        metadata={
            "help": "What joins the problem and the instruction: ' ' (default), as the official LaSeR training data; "
            "'\\n' in the SmolLM2 recipes, whose results were measured with it."
        },
    )
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the generated builtin:arithmetic problems."})
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "Drop problems whose prompt (chat template applied) is longer than this many tokens, as the "
            "paper's `filter_overlong_prompts` with 2048."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N problems only."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N problems only."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["math_verify_reward"],
        metadata={
            "help": "Reward functions, the first being LaSeR's 0/1 verifier: `math_verify_reward` (default; the last "
            "box, else the last $...$ math or number), `boxed_math_verify_reward` (the official LaSeR verifier: exactly "
            "one \\boxed{}, no fallback), or dotted import paths such as `my_lib.rewards.my_reward`."
        },
    )
    fit_row_problems: int | None = field(
        default=None,
        metadata={
            "help": "After training, refit z_c's output row in closed form to the final model's own answers (8 per "
            "problem, temperature 1) on the first N problems of the training split, as `trl-laser fit-row` does, into "
            "`<output_dir>-fit`; with `push_to_hub`, that model is pushed to the same repository after the trained "
            "one. It pays most after a run whose row took least-squares steps (the quickstart: 1024). At least 5 "
            "(the folds of its cross-validation). Default: off."
        },
    )
    fit_row_split: str | None = field(
        default=None,
        metadata={
            "help": "The split whose first `fit_row_problems` problems the refit samples (default: "
            "`dataset_train_split`). The row learns to rank a problem's answers from problems that got both right and "
            "wrong ones: builtin:arithmetic's `train_distinct` holds each distinct easy and medium training problem "
            "once (the quickstart's), where `train` draws with repeats."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a new run in an `output_dir` that already holds a trained model or checkpoints (refused "
            "otherwise, so that nothing is lost): its old checkpoint-N folders are removed once the new run has made "
            "its first step, and its model files are replaced when it ends. To continue a run instead, use "
            "`resume_from_checkpoint: true` (the latest checkpoint in `output_dir`)."
        },
    )

    def __post_init__(self):
        if self.fit_row_problems is not None and (
            isinstance(self.fit_row_problems, bool) or self.fit_row_problems < FIT_ROW_FOLDS
        ):
            raise ValueError(
                f"`fit_row_problems` must be an integer >= {FIT_ROW_FOLDS} (the folds of the refit's cross-validation, "
                f"grouped by problem), got {self.fit_row_problems!r}; leave it unset for no refit."
            )


@dataclass
class LaSeRConfig(GRPOConfig):
    r"""
    Configuration class for [`LaSeRGRPOTrainer`]: every [`~trl.GRPOConfig`] parameter, plus LaSeR's.

    LaSeR (Last-Token Self-Rewarding, arXiv 2510.14943) trains the policy's log-probability of a rarely used special
    token z_c right after each completion's EOS to predict the verifier's 0/1 reward, with the self-reward score
    `r_s = self_reward_beta * (log pi(z_c | x, y, EOS) - self_reward_ref_constant)`.

    Parameters:
        > LaSeR parameters

        self_reward_token (`str` or `int`, *optional*):
            The self-reward token z_c: a token string, or its id (an int, or a string of digits). It must be in the
            vocabulary, differ from EOS and pad, and be unused by the chat template (Qwen2.5: `<|vision_start|>`;
            Llama-3 / OctoThinker: `<|reserved_special_token_0|>`; SmolLM2: `<gh_stars>`). Required.
        self_reward_beta (`float`, *optional*, defaults to `0.1`):
            beta_v, the scale of the score.
        self_reward_loss_coef (`float`, *optional*, defaults to `0.1`):
            alpha, the weight of the class-balanced MSE term per optimizer step, beside TRL's loss of that step. `0.0`
            trains plain GRPO while still logging the score. When `steps_per_generation` differs from
            `gradient_accumulation_steps`, each optimizer step's MSE is its rows' share of the generation batch's,
            times `steps_per_generation / gradient_accumulation_steps`: an estimate of l_MSE when a generation batch
            spans several steps, the mean l_MSE of its generation batches when a step spans several.
        self_reward_advantage_coef (`float`, *optional*, defaults to `0.1`):
            tau, the weight of the self-reward advantage in `A = (1 - tau) A_v + tau A_s`. A_s is scaled as TRL scales
            A_v (`scale_rewards`, `multi_objective_aggregation`): group-standardised with TRL's defaults, as the paper.
        self_reward_std_threshold (`float`, *optional*, defaults to `0.1`):
            Groups whose std of `clamp(r_s, 0, 1)` is at most this use `A_s = A_v`.
        self_reward_balanced (`bool`, *optional*, defaults to `True`):
            Re-weight the MSE by class, `w_c = N / (2 N_c)`, `w_i = N / (2 N_i)`.
        reasoning_warmup_steps (`int`, *optional*, defaults to `0`):
            w_r: optimizer steps of plain GRPO before the MSE term is switched on.
        self_reward_warmup_steps (`int`, *optional*, defaults to `0`):
            w_sr: further steps with the MSE term before the advantage mix is switched on.
        self_reward_ref_constant (`float` or `str`, *optional*, defaults to `"auto"`):
            c_ref: a number <= 0; `"auto"` to estimate it from the initial policy on the first generation batch
            (saved in checkpoints and reused on resume); or `"model"` for the reference model's real log-prob at
            that position (a reference forward pass; needs `beta > 0` or a PEFT model).
        self_reward_verifier (`str`, *optional*):
            Name of the reward function whose 0/1 output is the verifier reward r_v. Defaults to the first one.

        > Beyond the paper (opt-in; the defaults train exactly the paper's method)

        self_reward_row_update (`str`, *optional*, defaults to `"optimizer"`):
            How z_c's output-embedding row (the read-out of the final hidden state that the score is) is updated.
            `"optimizer"`: by the trainer's optimizer, with every other parameter (the paper). `"least_squares"`: by a
            damped recursive least-squares step on LaSeR's own MSE, the exact Gauss-Newton step for that row, since the
            score is linear in it. Adam moves each coordinate by at most the learning rate per step, and the final
            hidden state has a large common component, so with the paper's update the score's level swings while the
            direction that tells right from wrong barely moves (`docs/training.md`). The score, the loss and the saved
            model are unchanged: scoring needs nothing else. Not supported with PEFT, DeepSpeed or FSDP.
        self_reward_row_ridge (`float`, *optional*, defaults to `1.0`):
            With `"least_squares"`: ridge (damping) of the step, relative to the mean eigenvalue of the running
            second-moment matrix of final hidden states (a Levenberg-Marquardt damping).
        self_reward_row_forgetting (`float`, *optional*, defaults to `0.9`):
            With `"least_squares"`: weight of the previous steps' second-moment matrix in the running one (1.0 keeps
            every batch, as plain recursive least squares; lower forgets hidden states of an older policy faster).
        self_reward_row_between_weight (`float`, *optional*, defaults to `1.0`):
            With `"least_squares"`: weight, in [0, 1], of the part of the row's fit that lies between groups (one
            prompt's completions), beside the fit of group-centred states to group-centred residuals. `1.0` is the
            pooled fit; lower values make the row learn what separates answers to the same problem rather than
            which problems are solved, and the level of the score then comes mostly from the group means.
        self_reward_row_refit_steps (`int`, *optional*, defaults to `0`):
            With `"least_squares"`: at the end of training, z_c's row takes one more least-squares step, from a
            second-moment matrix built afresh on the *final* model's EOS states of the completions of the last this
            many optimizer steps (kept, then read again with one forward each). The running fit reads each state once,
            from the policy of its own step, so its row lags behind a model that keeps changing; the refit reads the
            model that is saved. `0` disables it.
        self_reward_class_weights (`str`, *optional*, defaults to `"batch"`):
            Where the MSE's classes are balanced: `"batch"` (the paper: over the whole generation batch) or `"group"`
            (within each prompt's group, so that a problem's right and wrong answers weigh the same; a group with one
            class weighs half a mixed one). Needs `self_reward_balanced=True`.
        self_reward_pair_loss_coef (`float`, *optional*, defaults to `0.0`):
            Weight of a pairwise logistic loss inside each group, `mean -log sigmoid(r_s(right) - r_s(wrong))` over
            the (right, wrong) pairs of every group of the generation batch, beside the MSE (and switched on with it
            after `reasoning_warmup_steps`). Its gradient is taken at the generating policy's scores (exact with one
            update per generation batch). `0.0` disables it.
        self_reward_mse_between_weight (`float`, *optional*, defaults to `1.0`):
            With `"least_squares"` and not `self_reward_row_only`: weight, in [0, 1], of the MSE's part between groups
            in the gradient that trains the model. The MSE splits exactly into a part within groups (each answer's
            error about its group's mean error) and a part between them (each group's mean error); the second is
            lowered by predicting how often each problem is solved, and dominates. Below 1 the MSE's gradient into
            the model asks mostly what separates one problem's answers, and the least-squares row, which still fits
            the pooled MSE (`self_reward_row_between_weight`), sets the level. Taken at the generating policy's scores
            (exact with one update per generation batch). The loss's value and the logged MSE are unchanged.
        self_reward_row_only (`bool`, *optional*, defaults to `False`):
            With `"least_squares"`: the MSE trains z_c's output row only, through the least-squares update, and the
            MSE's gradient does not reach the rest of the model, which follows GRPO's loss (and the advantage mix).
            The score is then an online linear read-out of the policy's own final hidden state: the MSE cannot lower
            itself by moving whole problems' states, which is what it does first through the shared layers. A pair
            loss (`self_reward_pair_loss_coef`) still trains the model: it only ranks the answers of one group, so
            the model learns what separates them while the row fits the level.
        self_reward_suppress_sampling (`bool`, *optional*, defaults to `False`):
            Keep z_c out of the completions sampled for training (transformers' `suppress_tokens`, as TRL does for
            image tokens), as the generation config that `trl-laser fit-row` saves does at test time. Raising z_c's
            logit after the EOS raises it inside answers too: after the first least-squares step of the quickstart
            recipe, 0.11 z_c tokens per answer were expected. The score reads the raw logits after the EOS and is
            unchanged. With `use_vllm`, a logit bias of -100 (and, with vLLM's importance-sampling correction,
            `self_reward_exclude_from_policy`).
        self_reward_exclude_from_policy (`bool`, *optional*, defaults to `False`):
            Also leave z_c out of the policy's log-softmax in the GRPO loss: each token's log-prob is renormalised
            over the vocabulary without z_c, `log p(y) - log(1 - pi(z_c))`, the log-prob of the sampler that
            `self_reward_suppress_sampling` makes (which it needs). Suppressed in sampling only, z_c keeps its share
            of each token's softmax in the loss, and the policy gradient moves the model through it. Left out of
            both, the policy does not depend on z_c's row: with `self_reward_row_only` it follows GRPO's. The score
            after the EOS keeps the raw log-prob; entropies stay those of the whole vocabulary. Runs inside the
            model's forward (ZeRO-3 included); not with a model that scales or caps its logits.
    """

    self_reward_token: str | None = field(
        default=None,
        metadata={
            "help": "The self-reward token z_c (a token string, or its id). Must be in the vocabulary, differ from "
            "EOS and pad, and be unused by the chat template, e.g. `<|vision_start|>` for Qwen2.5."
        },
    )
    self_reward_beta: float = field(default=0.1, metadata={"help": "beta_v, the scale of the self-reward score."})
    self_reward_loss_coef: float = field(
        default=0.1,
        metadata={
            "help": "alpha, the weight of the class-balanced MSE term per optimizer step (0 disables it). With "
            "steps_per_generation != gradient_accumulation_steps, each step's MSE is its rows' share of the "
            "generation batch's times steps_per_generation / gradient_accumulation_steps."
        },
    )
    self_reward_advantage_coef: float = field(
        default=0.1,
        metadata={
            "help": "tau, the weight of the self-reward advantage in the mix, in [0, 1]. The self-reward advantage "
            "is scaled as TRL scales the verifier's (scale_rewards, multi_objective_aggregation)."
        },
    )
    self_reward_std_threshold: float = field(
        default=0.1,
        metadata={"help": "Groups whose std of clamp(r_s, 0, 1) is at most this use the verifier advantage only."},
    )
    self_reward_balanced: bool = field(
        default=True, metadata={"help": "Re-weight the MSE term by class (correct / incorrect)."}
    )
    reasoning_warmup_steps: int = field(
        default=0, metadata={"help": "w_r: optimizer steps of plain GRPO before the MSE term is on."}
    )
    self_reward_warmup_steps: int = field(
        default=0, metadata={"help": "w_sr: further steps with the MSE term before the advantage mix is on."}
    )
    self_reward_ref_constant: str = field(
        default="auto",
        metadata={
            "help": "c_ref: a number <= 0, 'auto' (estimated from the initial policy on the first generation batch) "
            "or 'model' (the reference model's log-prob at that position)."
        },
    )
    self_reward_verifier: str | None = field(
        default=None,
        metadata={"help": "Name of the reward function whose 0/1 output is the verifier reward. Default: the first."},
    )
    self_reward_row_update: str = field(
        default="optimizer",
        metadata={
            "help": "How z_c's output-embedding row is updated: 'optimizer' (the paper) or 'least_squares' (beyond the "
            "paper: a damped recursive least-squares step on LaSeR's MSE, which the row's Adam update cannot match "
            "at the policy's learning rate). Not supported with PEFT, DeepSpeed or FSDP.",
            "choices": list(ROW_UPDATES),
        },
    )
    self_reward_row_ridge: float = field(
        default=1.0,
        metadata={
            "help": "With least_squares: ridge of the step, relative to the mean eigenvalue of the running matrix."
        },
    )
    self_reward_row_forgetting: float = field(
        default=0.9,
        metadata={"help": "With least_squares: weight of the past steps' second-moment matrix, in (0, 1]."},
    )

    self_reward_row_between_weight: float = field(
        default=1.0,
        metadata={
            "help": "With least_squares: weight in [0, 1] of the row's fit between groups (1: pooled; lower: the row "
            "learns what separates answers to the same problem)."
        },
    )
    self_reward_row_refit_steps: int = field(
        default=0,
        metadata={
            "help": "With least_squares: at the end of training, refit z_c's row on the final model's EOS states of "
            "the last this many steps' completions (0: off)."
        },
    )
    self_reward_class_weights: str = field(
        default="batch",
        metadata={
            "help": "Where the MSE's classes are balanced: 'batch' (the paper) or 'group' (within each prompt's group).",
            "choices": list(CLASS_WEIGHTS),
        },
    )
    self_reward_pair_loss_coef: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the pairwise logistic loss on r_s(right) - r_s(wrong) over the pairs of each group "
            "(0 disables it)."
        },
    )
    self_reward_mse_between_weight: float = field(
        default=1.0,
        metadata={
            "help": "With least_squares, not row only: weight in [0, 1] of the MSE's part between groups in the "
            "model's gradient (1: pooled; lower: the MSE trains the model mostly on what separates one prompt's "
            "answers, and z_c's least-squares row sets the level)."
        },
    )

    self_reward_row_only: bool = field(
        default=False,
        metadata={
            "help": "With least_squares: the MSE trains z_c's row only (the least-squares update); of the "
            "self-reward losses only the pair loss reaches the rest of the model."
        },
    )
    self_reward_suppress_sampling: bool = field(
        default=False,
        metadata={
            "help": "Never sample z_c inside the training completions (generate's suppress_tokens, vLLM's logit "
            "bias); the score after the EOS is unchanged. A least-squares row raises z_c's logit inside answers too."
        },
    )
    self_reward_exclude_from_policy: bool = field(
        default=False,
        metadata={
            "help": "Renormalise the loss's per-token log-probs over the vocabulary without z_c (the suppressed "
            "sampler's log-probs), so that z_c's row cannot move the policy. Needs self_reward_suppress_sampling."
        },
    )

    def _check_step_counts(self) -> None:
        """Counts that transformers and TRL take silently or fail on obscurely, checked before their own checks:
        `max_steps=-5` trains for `num_train_epochs` instead, `num_generations=0` divides by zero."""
        max_steps = self.max_steps
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or not (max_steps == -1 or max_steps > 0):
            raise ValueError(
                f"`max_steps` must be an integer > 0, or -1 to train for `num_train_epochs`, got {max_steps!r}."
            )
        required = {"num_generations": 2, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1}
        optional = {"num_generations_eval": 1, "steps_per_generation": 1, "generation_batch_size": 1}
        for name, minimum in (required | optional).items():
            value = getattr(self, name)
            if value is None and name in optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")

    def _check_group_levers(self) -> None:
        between = self.self_reward_row_between_weight
        if isinstance(between, bool) or not isinstance(between, (int, float)) or not 0 <= between <= 1:
            raise ValueError(f"`self_reward_row_between_weight` must be a number in [0, 1], got {between!r}.")
        if between != 1 and self.self_reward_row_update != "least_squares":
            raise ValueError(
                f"`self_reward_row_between_weight: {between}` weighs the least-squares fit of z_c's row, but "
                f"`self_reward_row_update` is {self.self_reward_row_update!r}. Set `self_reward_row_update: "
                "least_squares`, or leave `self_reward_row_between_weight` at 1.0."
            )
        refit = self.self_reward_row_refit_steps
        if isinstance(refit, bool) or not isinstance(refit, int) or refit < 0:
            raise ValueError(f"`self_reward_row_refit_steps` must be an integer >= 0, got {refit!r}.")
        if refit and self.self_reward_row_update != "least_squares":
            raise ValueError(
                f"`self_reward_row_refit_steps: {refit}` refits the least-squares row, but `self_reward_row_update` "
                f"is {self.self_reward_row_update!r}. Set `self_reward_row_update: least_squares`, or "
                "`self_reward_row_refit_steps: 0`."
            )
        if self.self_reward_class_weights not in CLASS_WEIGHTS:
            raise ValueError(
                f"`self_reward_class_weights` must be one of {list(CLASS_WEIGHTS)}, got "
                f"{self.self_reward_class_weights!r}."
            )
        if self.self_reward_class_weights == "group" and not self.self_reward_balanced:
            raise ValueError(
                "`self_reward_class_weights: group` balances the classes within each group, but "
                "`self_reward_balanced` is False. Set `self_reward_balanced: true`, or `self_reward_class_weights: "
                "batch`."
            )
        if self.self_reward_row_only and self.self_reward_row_update != "least_squares":
            raise ValueError(
                "`self_reward_row_only: true` trains z_c's row through the least-squares update only, but "
                f"`self_reward_row_update` is {self.self_reward_row_update!r}. Set `self_reward_row_update: "
                "least_squares`, or `self_reward_row_only: false`."
            )
        suppressed_by_vllm = self.self_reward_suppress_sampling and self.use_vllm
        if (
            suppressed_by_vllm
            and self.vllm_importance_sampling_correction
            and not self.self_reward_exclude_from_policy
        ):
            raise ValueError(
                "`self_reward_suppress_sampling: true` with `use_vllm` gives every sampled token vLLM's log-prob "
                "without z_c, and TRL's importance-sampling correction divides by it the loss's log-prob, which counts "
                "z_c's share unless `self_reward_exclude_from_policy: true` (a ratio of 1 - pi(z_c) on every token). "
                "Set `self_reward_exclude_from_policy: true`, or `vllm_importance_sampling_correction: false`."
            )
        if self.self_reward_exclude_from_policy and not self.self_reward_suppress_sampling:
            raise ValueError(
                "`self_reward_exclude_from_policy: true` trains the policy that never samples z_c, and "
                "`self_reward_suppress_sampling` is false, so the completions would come from another policy. Set "
                "`self_reward_suppress_sampling: true`, or `self_reward_exclude_from_policy: false`."
            )
        self._check_mse_between_weight()
        pair = self.self_reward_pair_loss_coef
        if isinstance(pair, bool) or not isinstance(pair, (int, float)) or not 0 <= pair < math.inf:
            raise ValueError(f"`self_reward_pair_loss_coef` must be a finite number >= 0, got {pair!r}.")

    def _check_mse_between_weight(self) -> None:
        weight = self.self_reward_mse_between_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
            raise ValueError(f"`self_reward_mse_between_weight` must be a number in [0, 1], got {weight!r}.")
        if weight == 1:
            return
        if self.self_reward_row_update != "least_squares":
            raise ValueError(
                f"`self_reward_mse_between_weight: {weight}` leaves the score's level to z_c's least-squares row, but "
                f"`self_reward_row_update` is {self.self_reward_row_update!r}. Set `self_reward_row_update: "
                "least_squares`, or leave `self_reward_mse_between_weight` at 1.0."
            )
        if self.self_reward_row_only:
            raise ValueError(
                f"`self_reward_mse_between_weight: {weight}` weighs the MSE's gradient into the model, and "
                "`self_reward_row_only: true` keeps the MSE out of the model. Set `self_reward_row_only: false`, or "
                "leave `self_reward_mse_between_weight` at 1.0."
            )

    def __post_init__(self):
        self._check_step_counts()
        super().__post_init__()
        if isinstance(self.self_reward_token, str) and self.self_reward_token.strip().isdigit():
            self.self_reward_token = int(self.self_reward_token.strip())
        if isinstance(self.self_reward_token, str) and not self.self_reward_token:
            raise ValueError("`self_reward_token` is empty: give a special token string or its id.")
        self.self_reward_ref_constant = parse_ref_constant(self.self_reward_ref_constant)
        if not (self.self_reward_beta > 0 and math.isfinite(self.self_reward_beta)):
            raise ValueError(f"`self_reward_beta` must be a finite number > 0, got {self.self_reward_beta}.")
        if not (self.self_reward_loss_coef >= 0 and math.isfinite(self.self_reward_loss_coef)):
            raise ValueError(
                f"`self_reward_loss_coef` must be a finite number >= 0, got {self.self_reward_loss_coef}."
            )
        if not 0.0 <= self.self_reward_advantage_coef <= 1.0:
            raise ValueError(
                f"`self_reward_advantage_coef` (tau) must be in [0, 1], got {self.self_reward_advantage_coef}."
            )
        if self.self_reward_loss_coef == 0 and self.self_reward_advantage_coef > 0:
            warnings.warn(
                f"`self_reward_loss_coef: 0` trains no self-reward score, but `self_reward_advantage_coef: "
                f"{self.self_reward_advantage_coef}` mixes that score into the advantage: it mixes the untrained "
                "score of the initial model. Set `self_reward_advantage_coef: 0` too (plain GRPO), or "
                "`self_reward_loss_coef` > 0 (LaSeR).",
                UserWarning,
                stacklevel=2,
            )
        if not self.self_reward_std_threshold >= 0:
            raise ValueError(
                f"`self_reward_std_threshold` must be >= 0 (0 disables the filter), got {self.self_reward_std_threshold}."
            )
        if self.self_reward_row_update not in ROW_UPDATES:
            raise ValueError(
                f"`self_reward_row_update` must be one of {list(ROW_UPDATES)}, got {self.self_reward_row_update!r}."
            )
        ridge, forgetting = self.self_reward_row_ridge, self.self_reward_row_forgetting
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not 0 < ridge < math.inf:
            raise ValueError(f"`self_reward_row_ridge` must be a finite number > 0, got {ridge!r}.")
        if isinstance(forgetting, bool) or not isinstance(forgetting, (int, float)) or not 0 < forgetting <= 1:
            raise ValueError(f"`self_reward_row_forgetting` must be a number in (0, 1], got {forgetting!r}.")
        self._check_group_levers()
        for name in ("reasoning_warmup_steps", "self_reward_warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}.")
        if self.sync_ref_model and self.self_reward_ref_constant == "model":
            raise ValueError(
                "`sync_ref_model=True` moves the reference model toward the policy during training, so with "
                "`self_reward_ref_constant='model'` c_ref would drift and r_s would change meaning. Set "
                "`sync_ref_model=False`, or `self_reward_ref_constant` to 'auto' or a number."
            )
        if self.temperature != 1.0:
            raise ValueError(
                f"LaSeR's self-reward score is defined at temperature 1 and TRL's fused LM head scores every token at "
                f"the sampling temperature, so `temperature` must be 1.0 (got {self.temperature}), as in the paper."
            )
