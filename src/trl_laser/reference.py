"""c_ref while training (`docs/method.md`, "c_ref"): a given number, the first training batch's mean ("auto"), or the
running mean of the reference model's own log-probs ("model"). The trainer gathers the sums over processes; this
object keeps the value, and restores it on resume instead of re-estimating it from a trained policy."""

from __future__ import annotations

import logging
import os

from .settings import SELF_REWARD_CONFIG_NAME, SelfRewardSettings


logger = logging.getLogger(__name__)


class RefConstant:
    """The c_ref of a training run; `value` is None while "auto" or "model" has not seen a training batch."""

    def __init__(self, setting: float | str):
        self.mode = "constant" if isinstance(setting, float) else setting
        self.value: float | None = setting if self.mode == "constant" else None
        self._reference_sums = [0.0, 0.0]  # sum and count of the reference model's log-probs ("model")

    def check_reference_kept(self, beta: float, peft: bool) -> None:
        """ "model" reads the reference model, which TRL keeps only with `beta > 0` or PEFT (adapters disabled)."""
        if self.mode == "model" and beta == 0.0 and not peft:
            raise ValueError(
                "`self_reward_ref_constant='model'` reads z_c's log-prob from the reference model, which TRL only "
                "keeps with `beta > 0` or a PEFT model (adapters disabled). Set `beta > 0`, train with PEFT, or use "
                "`self_reward_ref_constant='auto'` / a number (the paper finds the constant matches the model)."
            )

    @property
    def needs_estimate(self) -> bool:
        """True for "auto" until the first training batch has given its estimate."""
        return self.mode == "auto" and self.value is None

    def estimate(self, total: float, count: float) -> None:
        """ "auto": the mean of the initial policy's z_c log-probs over the first batch's finished completions."""
        if count == 0:
            raise RuntimeError(
                "`self_reward_ref_constant='auto'` estimates c_ref from the first generation batch's finished "
                "completions, but none of them ended with EOS. Raise `max_completion_length`, or set "
                "`self_reward_ref_constant` to a number (measure it with `trl-laser estimate-ref-constant`)."
            )
        self.value = total / count
        logger.info("LaSeR: estimated c_ref = %.4f from %d finished completions.", self.value, int(count))

    def add_reference(self, total: float, count: float) -> None:
        """ "model": one training batch's sum and count of reference log-probs into the running mean."""
        self._reference_sums = [self._reference_sums[0] + total, self._reference_sums[1] + count]
        self.value = self._reference_sums[0] / max(self._reference_sums[1], 1.0)

    def resume(self, saved: SelfRewardSettings | None, checkpoint: str) -> None:
        """Take the checkpoint's c_ref ("auto", "model"): a trained policy would give another value."""
        if self.mode == "constant":
            return
        if saved is None:
            raise FileNotFoundError(
                f"Resuming with `self_reward_ref_constant={self.mode!r}` needs the c_ref saved in "
                f"{os.path.join(checkpoint, SELF_REWARD_CONFIG_NAME)}, which is missing; re-estimating it from a "
                "trained policy would be wrong. Set `self_reward_ref_constant` to the value of the original run."
            )
        self.value = float(saved.self_reward_ref_constant)
        logger.info("LaSeR: resumed c_ref = %.4f from %s.", self.value, checkpoint)
