"""z_c kept out of the policy: never sampled (`suppress_in_generation`), and left out of the log-softmax of the GRPO
loss (`PolicyWithoutToken`), so that the loss's log-probs are those of the sampler that never draws it.

The score still reads z_c's raw log-prob after the EOS. Raising z_c's logit there (the least-squares row does so
from the first step) raises it inside answers too: suppressed in sampling only, z_c keeps a share of each token's
softmax in the loss, and the policy gradient then moves the model through that share. Left out of both, the policy
is the model without z_c, which z_c's row cannot move.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from typing import Any

import torch
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .core import logps_without_token


# Config attributes by which a model rescales or caps its logits before the softmax (read by TRL's fused head).
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


# z_c's log-prob above which the renormalisation writes the position's softmax out (a share above one half).
DOMINANT_LOGP = math.log(0.5)


# vLLM's logit bias for a token it must not sample: its server clamps biases to [-100, 100]; exp(-100) is 4e-44.
SUPPRESS_BIAS = -100.0


def suppress_in_generation(trainer: Any, token_id: int) -> None:
    """Never sample `token_id` in a `GRPOTrainer`'s completions. With `generate`: added to the `suppress_tokens` of
    TRL's generation config and of the keyword arguments that override the model's own (its logit set to -inf).
    With vLLM: a logit bias of -100 in the sampling parameters TRL sends, colocated or to `trl vllm-serve` (whose
    JSON keys vLLM turns back into ids). The forward hooks that read z_c after the EOS see the raw logits. The model's
    own generation config gains it too, so that the saved model samples as it was trained to, as `trl-laser fit-row`
    saves its models."""
    if trainer.use_vllm:
        vllm = trainer.vllm_generation
        bias = {int(k): float(v) for k, v in (vllm.generation_kwargs.get("logit_bias") or {}).items()}
        # a new dict: TRL's may be the user's `args.generation_kwargs` itself
        vllm.generation_kwargs = {**vllm.generation_kwargs, "logit_bias": {**bias, token_id: SUPPRESS_BIAS}}
    else:
        tokens = sorted({*(trainer.generation_kwargs.get("suppress_tokens") or []), token_id})
        trainer.generation_kwargs["suppress_tokens"] = tokens
        trainer.generation_config.suppress_tokens = tokens
    own = trainer.accelerator.unwrap_model(trainer.model).generation_config  # PEFT forwards it to the base model
    own.suppress_tokens = sorted({*(own.suppress_tokens or []), token_id})


class PolicyWithoutToken:
    """Renormalises the per-token log-probs of TRL's fused LM head over the vocabulary without z_c.

    The fused head returns `log p(y_t)` only. Within `renormalising(model)` each fused forward of the model keeps its
    backbone's final hidden states (with their graph), projects them on the rows of the label and of z_c alone, and
    returns `core.logps_without_token` in place of `log p(y_t)`. This runs inside the model's forward, with the head's
    weight gathered, as TRL's fused head does (`maybe_gather_lm_head_ctx`): under ZeRO-3 the head is partitioned
    everywhere else, and its gradient is reduced by the hooks that the model's forward arms. The position whose label
    is z_c (the score after the EOS) keeps its raw log-prob.
    """

    def __init__(self, token_id: int, temperature: float):
        self.token_id = token_id
        self.temperature = temperature

    @staticmethod
    def check_model(model: Any) -> None:
        """Refuse models whose logits are scaled or capped before the softmax: the correction projects the bare
        head, as TRL's fused head does for all others."""
        config = model.config.get_text_config()
        transforms = [name for name in _LOGIT_TRANSFORMS if getattr(config, name, None) is not None]
        if transforms:
            raise ValueError(
                f"`self_reward_exclude_from_policy: true` renormalises the log-probs from the LM head's bare logits, "
                f"and this model transforms them (`{transforms[0]}` in its config). Set "
                "`self_reward_exclude_from_policy: false` (z_c stays suppressed in sampling)."
            )

    @contextlib.contextmanager
    def renormalising(self, model: Any) -> Iterator[None]:
        """Within, the fused forwards of `model` (unwrapped, PEFT's base model, whose `forward` TRL's
        `add_fused_lm_head` replaced) return their log-probs renormalised without z_c. PEFT and DeepSpeed call the
        instance's `forward`, so the wrapper runs inside their calls."""
        fused = model.forward
        own = "forward" in vars(model)

        @functools.wraps(fused)
        def forward(*args, fused_lm_head: bool = False, labels=None, shift_labels=None, **kwargs):
            if not fused_lm_head:
                return fused(*args, labels=labels, shift_labels=shift_labels, **kwargs)
            states = []
            hook = model.base_model.register_forward_hook(
                lambda module, inputs, output: states.append(output.last_hidden_state)
            )
            try:
                output = fused(*args, fused_lm_head=True, labels=labels, shift_labels=shift_labels, **kwargs)
            finally:
                hook.remove()
            (hidden,) = states
            if shift_labels is None:  # position t predicts id t + 1
                hidden, shift_labels = hidden[:, :-1], labels[:, 1:]
            output.log_probs = self._renormalise(model, output.log_probs, hidden, shift_labels)
            return output

        model.forward = forward
        try:
            yield
        finally:
            if own:
                model.forward = fused
            else:
                del model.forward

    def _renormalise(
        self, model: Any, logps: torch.Tensor, hidden: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """`logps` (B, T), the fused head's log-probs of `labels` (-100: not scored) from `hidden` (B, T, D)."""
        # only scored positions: on the others the zeros of the fused head would put z_c's share at 1 (an infinite
        # correction, and a NaN gradient through any mask)
        kept = (labels != -100) & (labels != self.token_id)
        hidden = hidden[kept].float()
        ids = labels[kept]
        kept_logps = logps[kept].float()
        rows = torch.cat([ids, ids.new_tensor([self.token_id])])  # each kept label's row, then z_c's
        head = model.get_output_embeddings()
        with maybe_gather_lm_head_ctx(head.weight, head.bias):
            # index_select copies: the graph keeps the rows, not the gathered weight that ZeRO-3 frees on exit
            weight = head.weight.index_select(0, rows).float()
            bias = None if head.bias is None else head.bias.index_select(0, rows).float()
            label_logits, token_logits = (hidden * weight[:-1]).sum(-1), hidden @ weight[-1]
            if bias is not None:
                label_logits, token_logits = label_logits + bias[:-1], token_logits + bias[-1]
            label_logits, token_logits = label_logits / self.temperature, token_logits / self.temperature
            # Where z_c takes most of the softmax, the identity subtracts two nearly equal float32 log-partitions
            # (and where its share rounds to 1, -inf from -inf: a NaN that reaches every weight): there the softmax
            # without z_c is written out from the position's logits. Rare (z_c is never sampled), so the rows are few.
            dominant = (token_logits - (label_logits - kept_logps)).detach() > DOMINANT_LOGP
            written = self._written_out(head, hidden[dominant], ids[dominant]) if dominant.any() else None
        renormalised = logps_without_token(kept_logps, label_logits, token_logits.masked_fill(dominant, -math.inf))
        if written is not None:
            renormalised = renormalised.masked_scatter(dominant, written)
        return logps.masked_scatter(kept, renormalised.to(logps.dtype))

    def _written_out(self, head: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """log-softmax of `ids` over the vocabulary without z_c, from the positions' logits over the whole vocabulary
        (`(len(ids), vocab)` floats). Called within the head's gather: the weight is copied, as ZeRO-3 frees it."""
        logits = hidden @ head.weight.to(torch.float32, copy=True).T
        if head.bias is not None:
            logits = logits + head.bias.to(torch.float32, copy=True)
        logits = (logits / self.temperature).index_fill(-1, ids.new_tensor([self.token_id]), -math.inf)
        return logits.gather(-1, ids[:, None]).squeeze(-1) - logits.logsumexp(-1)
