"""The self-reward settings saved next to a LaSeR model's weights, so that scoring later needs no extra arguments.

File: `self_reward_config.json` in the model directory (and so in every checkpoint and in what is pushed to the Hub).

```json
{
  "self_reward_token": "<|vision_start|>",   // z_c as a string
  "self_reward_token_id": 151652,           // z_c's id in the saved tokenizer
  "self_reward_beta": 0.1,                  // beta_v
  "self_reward_ref_constant": -23.0,        // c_ref used by the score (a number, always resolved)
  "self_reward_ref_mode": "constant",       // how c_ref was obtained: "constant", "auto" or "model"
  "temperature": 1.0,                       // the score is log-softmax of the raw logits (temperature 1)
  "eos_token_ids": [151643, 151645],         // EOS ids after which z_c is read
  "cast_lm_head_to_fp32": false,            // training computed the LM head in float32: scoring must too
  "chat_template_kwargs": null,             // the chat-template arguments of training's prompts
  "prompt": {                               // how `trl-laser train` built its prompts (null: not recorded)
    "system_prompt": null,
    "instruction": "Please reason step by step, and put your final answer within \\boxed{}.",
    "instruction_separator": " ",
    "dataset_name": "zwhe99/DeepMath-103K",
    "dataset_seed": 0
  },
  "format_version": 2
}
```

The score of a finished completion y of prompt x is
`self_reward_beta * (log softmax(logits at the last EOS of y)[self_reward_token_id] - self_reward_ref_constant)`.
Files of format 1 (before `cast_lm_head_to_fp32`, `chat_template_kwargs` and `prompt`) still load: those fields
then take their defaults (no fp32 head, no template arguments, prompt not recorded).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

from .tokens import eos_token_ids, resolve_self_reward_token, vocab_size


SELF_REWARD_CONFIG_NAME = "self_reward_config.json"
FORMAT_VERSION = 2
# The beta_v of the paper, used when the model carries no settings and no beta is given.
DEFAULT_BETA = 0.1
# What a user may override at test time (`resolve_settings`' `overrides`; CLI: --self-reward-token, ...).
OVERRIDABLE = ("self_reward_token", "self_reward_ref_constant", "self_reward_beta")


@dataclasses.dataclass
class PromptSettings:
    """How training built each prompt, so that evaluation can build the identical one without being told again."""

    system_prompt: str | None = None
    instruction: str = ""
    instruction_separator: str = " "
    dataset_name: str | None = None
    dataset_seed: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclasses.dataclass
class SelfRewardSettings:
    """Everything needed to compute a LaSeR self-reward score with a trained model (and to prompt it as trained)."""

    self_reward_token: str
    self_reward_token_id: int
    self_reward_beta: float
    self_reward_ref_constant: float
    self_reward_ref_mode: str = "constant"
    temperature: float = 1.0
    eos_token_ids: list[int] = dataclasses.field(default_factory=list)
    cast_lm_head_to_fp32: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    prompt: PromptSettings | None = None
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write `self_reward_config.json` into `save_directory` and return its path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, SELF_REWARD_CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SelfRewardSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {"self_reward_token", "self_reward_token_id", "self_reward_beta", "self_reward_ref_constant"} - set(
            data
        )
        if missing:
            raise ValueError(f"{SELF_REWARD_CONFIG_NAME} lacks the field(s) {sorted(missing)}.")
        values = {k: v for k, v in data.items() if k in names}
        if isinstance(values.get("prompt"), dict):
            values["prompt"] = PromptSettings.from_dict(values["prompt"])
        return cls(**values)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **hub_kwargs: Any) -> SelfRewardSettings:
        """Read the settings from a local model directory or a Hub model id.

        Raises `FileNotFoundError` naming the file when the model was not saved by `LaSeRGRPOTrainer`.
        """
        path = os.path.join(name_or_path, SELF_REWARD_CONFIG_NAME)
        if not os.path.isdir(name_or_path):
            from huggingface_hub import hf_hub_download

            try:
                path = hf_hub_download(str(name_or_path), SELF_REWARD_CONFIG_NAME, **hub_kwargs)
            except Exception as err:  # offline, missing repo or missing file: one clear message
                raise FileNotFoundError(
                    f"Could not get {SELF_REWARD_CONFIG_NAME} for {name_or_path!r} ({err.__class__.__name__})."
                ) from err
        elif not os.path.isfile(path):
            raise FileNotFoundError(
                f"{name_or_path} has no {SELF_REWARD_CONFIG_NAME}: it was not saved by LaSeRGRPOTrainer."
            )
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def resume_differences(self, saved: SelfRewardSettings) -> list[tuple[str, Any, Any]]:
        """`(setting, this run's value, the saved value)` for each self-reward setting in which a run resumed from a
        checkpoint (these settings; a c_ref of NaN while "auto"/"model" is not estimated yet) departs from the
        checkpoint's (`saved`): its c_ref and scores belong to its own values."""
        differences: list[tuple[str, Any, Any]] = []
        if saved.self_reward_token_id != self.self_reward_token_id:
            differences.append(
                (
                    "`self_reward_token`",
                    f"{self.self_reward_token!r} (id {self.self_reward_token_id})",
                    f"{saved.self_reward_token!r} (id {saved.self_reward_token_id})",
                )
            )
        if not math.isclose(saved.self_reward_beta, self.self_reward_beta, rel_tol=1e-9):
            differences.append(("`self_reward_beta`", self.self_reward_beta, saved.self_reward_beta))
        mode, ref = saved.self_reward_ref_mode, saved.self_reward_ref_constant
        if mode != self.self_reward_ref_mode or (mode == "constant" and ref != self.self_reward_ref_constant):
            here = (
                self.self_reward_ref_constant
                if self.self_reward_ref_mode == "constant"
                else repr(self.self_reward_ref_mode)
            )
            there = ref if mode == "constant" else f"{mode!r} (c_ref = {ref})"
            differences.append(("`self_reward_ref_constant`", here, there))
        if saved.eos_token_ids and sorted(saved.eos_token_ids) != sorted(self.eos_token_ids):
            differences.append(
                (
                    "the EOS ids (tokenizer and generation config)",
                    sorted(self.eos_token_ids),
                    sorted(saved.eos_token_ids),
                )
            )
        return differences


def resume_refusal(checkpoint: str, differences: list[tuple[str, Any, Any]]) -> ValueError:
    """The error that refuses a resume whose self-reward settings differ from the checkpoint's (`differences`:
    setting, this run's value, the checkpoint's)."""
    listed = "; ".join(f"{name} is {here} here but {there} in the checkpoint" for name, here, there in differences)
    return ValueError(
        f"Resuming from {checkpoint} with self-reward settings other than the ones it was trained with: {listed}. Its "
        "c_ref and saved settings belong to its own values. Resume with the checkpoint's values, or start a new run "
        "in a new `output_dir` (load the model from the checkpoint to start from its weights)."
    )


def resolve_settings(
    model: Any,
    tokenizer: Any,
    settings: SelfRewardSettings | str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> SelfRewardSettings:
    """The settings to score with: those saved with the model (or given), with `overrides` applied.

    `settings` is a `SelfRewardSettings` or a directory / Hub id holding `self_reward_config.json`; by default the
    model's own `name_or_path`. `overrides` maps any of `OVERRIDABLE` to a value (None: not overridden). Without that
    file, `self_reward_token` and `self_reward_ref_constant` must be overridden (beta_v then defaults to the paper's
    0.1); otherwise a `FileNotFoundError` says so. `model=None` checks the settings against the tokenizer alone
    (before the weights are loaded): EOS ids not saved with the model are then left empty, and
    `resolve_settings(model, tokenizer, those settings)` completes them from the loaded model without reading any
    file again. z_c is checked by the trainer's own rules (`tokens.resolve_self_reward_token`).
    """
    overrides = _checked_overrides(overrides)
    token_override = overrides.get("self_reward_token")
    ref_override = overrides.get("self_reward_ref_constant")
    beta_override = overrides.get("self_reward_beta")
    base = _saved_settings(model, settings, overrides)

    if base is not None and base.eos_token_ids:
        eos = list(base.eos_token_ids)
    elif model is not None:
        eos = eos_token_ids(model, tokenizer)
    else:  # known once the model's generation config is: `resolve_settings(model, tokenizer, these settings)`
        eos = []
    if token_override is None:
        token_id, token = base.self_reward_token_id, base.self_reward_token
        if tokenizer.convert_tokens_to_ids(token) != token_id:
            raise ValueError(
                f"{SELF_REWARD_CONFIG_NAME} says z_c is {token!r} with id {token_id}, but this tokenizer maps "
                f"{token!r} to {tokenizer.convert_tokens_to_ids(token)}: use the tokenizer saved with the model, or "
                "override `self_reward_token`."
            )
    token_id, token = resolve_self_reward_token(
        tokenizer,
        token if token_override is None else token_override,
        vocab_size(model, tokenizer),
        eos or [tokenizer.eos_token_id],
    )

    if ref_override is not None:
        ref, ref_mode = _test_time_ref_constant(ref_override), "constant"
    else:
        ref, ref_mode = float(base.self_reward_ref_constant), base.self_reward_ref_mode
    beta = float(beta_override if beta_override is not None else base.self_reward_beta if base else DEFAULT_BETA)
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"`self_reward_beta` must be a finite number > 0, got {beta}.")
    return SelfRewardSettings(
        self_reward_token=token,
        self_reward_token_id=token_id,
        self_reward_beta=beta,
        self_reward_ref_constant=float(ref),
        self_reward_ref_mode=ref_mode,
        temperature=1.0,
        eos_token_ids=eos,
        cast_lm_head_to_fp32=bool(base.cast_lm_head_to_fp32) if base is not None else False,
        chat_template_kwargs=base.chat_template_kwargs if base is not None else None,
        prompt=base.prompt if base is not None else None,
    )


def _saved_settings(
    model: Any, settings: SelfRewardSettings | str | os.PathLike | None, overrides: dict[str, Any]
) -> SelfRewardSettings | None:
    """The settings given, or read from `settings` / the model's path; None only where the overrides are complete."""
    complete = overrides.get("self_reward_token") is not None and overrides.get("self_reward_ref_constant") is not None
    if isinstance(settings, SelfRewardSettings):
        return settings
    source = str(settings or getattr(model, "name_or_path", "") or "")
    # A Hub id is fetched only when some value is not overridden: offline, a fetch can take long to fail.
    if source and (os.path.isdir(source) or not (complete and overrides.get("self_reward_beta") is not None)):
        try:
            return SelfRewardSettings.from_pretrained(source)
        except FileNotFoundError as err:
            if not complete:
                raise FileNotFoundError(
                    f"{err} At test time give at least `self_reward_token` and `self_reward_ref_constant` "
                    "(CLI: --self-reward-token, --self-reward-ref-constant)."
                ) from None
    elif not complete:
        raise FileNotFoundError(
            f"The model has no path to read {SELF_REWARD_CONFIG_NAME} from: give `settings`, or `self_reward_token` "
            "and `self_reward_ref_constant` (CLI: --self-reward-token, --self-reward-ref-constant)."
        )
    return None


def _checked_overrides(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The overrides that are set; a key that is not a test-time setting is an error naming the valid ones."""
    unknown = sorted(set(overrides or {}) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(f"`overrides` takes the keys {list(OVERRIDABLE)}, got {unknown}.")
    return {k: v for k, v in (overrides or {}).items() if v is not None}


def _test_time_ref_constant(value: Any) -> float:
    """c_ref given at test time: the number training used ('auto' and 'model' are training-time modes)."""
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        ref = float(value)
    except ValueError:
        raise ValueError(
            f"At test time `self_reward_ref_constant` must be a number (the c_ref used in training), got {value!r}."
        ) from None
    if not math.isfinite(ref) or ref > 0:
        raise ValueError(
            f"`self_reward_ref_constant` (--self-reward-ref-constant) is a log-probability and must be finite and "
            f"<= 0, got {ref}. Give the c_ref the model was trained with (its {SELF_REWARD_CONFIG_NAME} has it), or "
            "measure the initial model's with `trl-laser estimate-ref-constant`."
        )
    return ref
