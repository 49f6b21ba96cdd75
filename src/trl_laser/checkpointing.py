"""What a LaSeR model and checkpoint hold beyond TRL's, and resuming from them: the mixin of `LaSeRGRPOTrainer`.

A saved model carries `self_reward_config.json` (`SelfRewardSettings`: everything test-time scoring needs) and a model
card section; a checkpoint also the least-squares row update's state. Resuming restores c_ref and the row state, and
refuses settings other than the checkpoint's, whose c_ref and scores belong to its own values.
"""

from __future__ import annotations

import logging
import os

from .row_update import ROW_STATE_NAME
from .settings import SELF_REWARD_CONFIG_NAME, SelfRewardSettings, resume_refusal


logger = logging.getLogger(__name__)


class SelfRewardCheckpointing:
    """Saving and resuming for `LaSeRGRPOTrainer`, which lists it before `GRPOTrainer` so that each method here
    post-processes TRL's own (`super()`). It reads the trainer's `self_reward_token(_id)`, `ref_constant`,
    `row_update`, `eos_token_ids` and `args`."""

    def self_reward_settings(self) -> SelfRewardSettings | None:
        """The settings to score with this model later; None while "auto" c_ref is not estimated yet.

        They include what makes test-time scoring compute the training quantity (the fp32 LM head, the chat-template
        arguments) and, when `trl-laser train` set `prompt_settings`, how the prompts were built.
        """
        return None if self.ref_constant.value is None else self._settings(float(self.ref_constant.value))

    def _settings(self, ref_constant: float) -> SelfRewardSettings:
        return SelfRewardSettings(
            self_reward_token=self.self_reward_token,
            self_reward_token_id=self.self_reward_token_id,
            self_reward_beta=self.args.self_reward_beta,
            self_reward_ref_constant=ref_constant,
            self_reward_ref_mode=self.ref_constant.mode,
            temperature=1.0,
            eos_token_ids=[int(i) for i in self.eos_token_ids],
            cast_lm_head_to_fp32=bool(self.args.cast_lm_head_to_fp32),
            chat_template_kwargs=dict(self.args.chat_template_kwargs) if self.args.chat_template_kwargs else None,
            prompt=getattr(self, "prompt_settings", None),
        )

    def create_model_card(
        self, model_name: str | None = None, dataset_name: str | None = None, tags: str | list[str] | None = None
    ):
        """TRL's card (LaSeR, the paper, its citation) plus the self-reward settings, final metrics and recipe."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if self.is_world_process_zero():
            from .hub import add_laser_card_section

            add_laser_card_section(self)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        settings = self.self_reward_settings()
        if self.args.should_save:
            if settings is not None:
                settings.save_pretrained(output_dir)
            else:
                logger.warning(
                    "LaSeR: c_ref is not estimated yet ('auto' estimates it on the first training batch), so %s "
                    "was not written to %s.",
                    SELF_REWARD_CONFIG_NAME,
                    output_dir,
                )

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.row_update is not None:
            self.row_update.save(output_dir, self.args.process_index, self.args.should_save)

    def _load_optimizer_and_scheduler(self, checkpoint):
        saved = None if checkpoint is None else self._check_resume_settings(checkpoint)
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        if self.row_update is not None:
            self.row_update.load(checkpoint, self.accelerator.device, self.args.process_index)
        self.ref_constant.resume(saved, checkpoint)

    def _check_resume_settings(self, checkpoint: str) -> SelfRewardSettings | None:
        """The checkpoint's saved settings (None if it has none); refuses to resume with other self-reward settings:
        its c_ref, row state and saved settings belong to the values it was trained with, and would silently be
        attached to the new ones."""
        differences = []  # (setting, this run's value, the checkpoint's value)
        saved = None
        if os.path.isfile(os.path.join(checkpoint, SELF_REWARD_CONFIG_NAME)):
            saved = SelfRewardSettings.from_pretrained(checkpoint)
            current = self._settings(float("nan") if self.ref_constant.value is None else self.ref_constant.value)
            differences = current.resume_differences(saved)
        row_update = self.args.self_reward_row_update
        if os.path.isfile(os.path.join(checkpoint, ROW_STATE_NAME)) and row_update != "least_squares":
            differences.append(("`self_reward_row_update`", repr(row_update), "'least_squares'"))
        if differences:
            raise resume_refusal(checkpoint, differences)
        return saved
