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
import os
from typing import Any


SELF_REWARD_CONFIG_NAME = "self_reward_config.json"
FORMAT_VERSION = 2


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
