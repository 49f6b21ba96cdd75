"""Test-time self-rewarding: the LaSeR score r_s of finished completions, alone or captured while generating.

The score is the trainer's own quantity (`docs/method.md`): for the token sequence `prompt, completion, EOS`,
`r_s = beta_v * (log softmax(raw logits at the EOS position)[z_c] - c_ref)`, at temperature 1 whatever the sampling
temperature. Prompts are tokenized as TRL's `GRPOTrainer` tokenizes them, so a model trained with
`LaSeRGRPOTrainer` scores the identical sequence at test time. Generation also records each sampled token's log-prob
(temperature 1), the free confidence signals that a LaSeR score is compared with.

Conventions:

- A prompt is a conversation (a list of `{"role", "content"}` messages), rendered with the chat template and
  `add_generation_prompt=True` as in training; a plain string, tokenized as is (TRL's non-conversational prompts);
  or a list of token ids, used as is.
- A completion is a list of token ids (exact; what `generate` returned) or a text. It is finished iff its last id is
  one of the EOS ids; a text is tokenized without special tokens, so it is finished iff it ends with the EOS token
  string (e.g. `<|im_end|>`). A completion without EOS (truncated) has no score: `None`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import os
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .core import self_reward_score
from .generation_capture import ZcRecorder
from .models import lm_head_in_fp32
from .settings import OVERRIDABLE, SelfRewardSettings, resolve_settings


_GENERATE_UNSUPPORTED = ("num_beams", "assistant_model", "prompt_lookup_num_tokens", "num_return_sequences")


def tokenize_prompt(tokenizer: Any, prompt: Any, chat_template_kwargs: dict | None = None) -> list[int]:
    """Prompt ids as `GRPOTrainer._tokenize_prompts` makes them (see the module docstring for the accepted forms)."""
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.tolist()
    if isinstance(prompt, str):
        return list(tokenizer(text=prompt)["input_ids"])
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        out = tokenizer.apply_chat_template(
            conversation=prompt,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            **(chat_template_kwargs or {}),
        )
        return list(out["input_ids"])
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return prompt
    raise TypeError(
        f"Unsupported prompt {prompt!r:.80}: expected a list of chat messages, a string, or a list of token ids."
    )


def tokenize_completion(tokenizer: Any, completion: Any) -> list[int]:
    """Completion ids: token ids as given, or a text tokenized without special tokens (EOS text becomes EOS id)."""
    if isinstance(completion, torch.Tensor):
        return completion.tolist()
    if isinstance(completion, str):
        return list(tokenizer(text=completion, add_special_tokens=False)["input_ids"])
    if isinstance(completion, (list, tuple)) and all(isinstance(t, int) for t in completion):
        return list(completion)
    raise TypeError(f"Unsupported completion {completion!r:.80}: expected a string or a list of token ids.")


@contextlib.contextmanager
def _inference(model: Any) -> Iterator[None]:
    """Eval mode (no dropout) and no grad, restoring the model's mode afterwards."""
    training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(training)


def _supported(model: Any, **kwargs: Any) -> dict[str, Any]:
    """The keyword arguments that `model.forward` takes (`logits_to_keep`, `position_ids`), the others and those that
    are None (the model's own default) dropped."""
    parameters = inspect.signature(model.forward).parameters
    return {k: v for k, v in kwargs.items() if v is not None and k in parameters}


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _check_batch(name: str, value: Any) -> None:
    """`prompts` / `completions` hold one item per completion: a bare string, token-id list or conversation would
    otherwise be read item by item (characters, ids, messages), and fail far from the mistake, if at all."""
    one = name[:-1]
    if isinstance(value, (str, bytes)):
        raise TypeError(f"`{name}` must be a list of {name}, got a string: for a single {one}, write `[{one}]`.")
    if isinstance(value, dict) or not hasattr(value, "__len__"):
        raise TypeError(f"`{name}` must be a list of {name}, got a {type(value).__name__}.")
    if isinstance(value, (list, tuple)) and value:
        if all(isinstance(v, int) for v in value):
            raise TypeError(f"`{name}` is a single list of token ids; give a list of {name}: `[ids]` for one {one}.")
        if all(isinstance(v, dict) for v in value):
            raise TypeError(
                f"`{name}` is a single conversation (a list of messages); give a list of {name}: `[messages]` for "
                f"one {one}."
            )


def _check_ids(name: str, ids: list[int], model: Any) -> None:
    """Token ids outside the model's embedding would fail inside torch as a bare IndexError."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if vocab is None or not ids or 0 <= min(ids) <= max(ids) < vocab:
        return
    bad = next(t for t in ids if not 0 <= t < vocab)
    raise ValueError(
        f"`{name}` holds the token id {bad}, outside the model's vocabulary (ids 0 to {vocab - 1}): token ids "
        "must come from this model's tokenizer."
    )


def left_padded(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id sequences left-padded to the longest, as `generate` pads: the input ids and the attention mask."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for r, seq in enumerate(sequences):
        ids[r, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[r, width - len(seq) :] = 1
    return ids, mask


def left_padded_batches(
    sequences: list[list[int]], pad_id: int, batch_size: int
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches of sequences of similar lengths (little padding), left-padded as `generate` pads: each batch's indices
    into `sequences`, then its input ids, attention mask and position ids (counting real tokens only)."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask = left_padded([sequences[i] for i in rows], pad_id)
        yield rows, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def prompt_grouped_batches(
    sequences: list[list[int]], completion_lengths: Sequence[int], pad_id: int, batch_size: int
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, list[tuple[int, ...]], torch.Tensor, torch.Tensor]]:
    """Batches of prompt + completion sequences (the last `completion_lengths[i]` tokens the completion), the answers
    to one prompt side by side, for `forward_after_prompts`: each batch's indices into `sequences`, its prompts
    left-padded with their mask, each row's prompt (its key for `prompt_prefill`), and the continuations (the prompt's
    last token, then the completion) right-padded with their mask."""
    prompts = _prompts(sequences, completion_lengths)
    longest: dict[tuple[int, ...], int] = {}  # a prompt's longest completion: prompts alike in it share batches
    for prompt, n in zip(prompts, completion_lengths):
        longest[prompt] = max(n, longest.get(prompt, 0))
    order = sorted(range(len(sequences)), key=lambda i: (longest[prompts[i]], prompts[i], completion_lengths[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        keys = [prompts[i] for i in rows]
        prompt_ids, prompt_mask = left_padded(keys, pad_id)
        span = max(completion_lengths[i] for i in rows) + 1
        ids = torch.full((len(rows), span), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(rows):
            ids[r, : completion_lengths[i] + 1] = torch.tensor(sequences[i][len(keys[r]) - 1 :])
            mask[r, : completion_lengths[i] + 1] = 1
        yield rows, prompt_ids, prompt_mask, keys, ids, mask


def forward_after_prompts(
    model: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    prompts: Sequence[Hashable],
    ids: torch.Tensor,
    mask: torch.Tensor,
    logits_to_keep: torch.Tensor | None = None,
) -> Any:
    """The model's output over right-padded continuations of left-padded prompts (a `prompt_grouped_batches` batch),
    each distinct prompt but its last token forwarded once (`prompt_prefill`) and the continuations, which start with
    that last token, after it: logits at the continuation's positions only, as a forward of each whole sequence gives
    them. With short answers the prompt is most of the tokens, and N answers to a prompt read it once instead of N.
    `logits_to_keep` (continuation positions) limits the logits to those, where the model takes the argument."""
    device = _device(model)
    prompt_ids, prompt_mask, ids, mask = (t.to(device) for t in (prompt_ids, prompt_mask, ids, mask))
    cache = prompt_prefill(model, prompt_ids, prompt_mask, prompts)
    prefix = prompt_mask[:, :-1]
    if cache is None and prefix.shape[1]:
        raise ValueError(
            f"{type(model).__name__} returns no KV cache (`past_key_values`), which its prompts' prefill needs."
        )
    position_ids = prefix.sum(-1, keepdim=True) + torch.arange(ids.shape[1], device=device)
    return model(
        input_ids=ids,
        attention_mask=torch.cat([prefix, mask], dim=1),
        past_key_values=cache,
        use_cache=cache is not None,
        **_supported(model, position_ids=position_ids, logits_to_keep=logits_to_keep),
    )


def last_position(
    model: Any,
    sequences: list[list[int]],
    token_id: int,
    pad_id: int,
    batch_size: int,
    hidden_states: bool = False,
    completion_lengths: Sequence[int] | None = None,
) -> tuple[list[float], torch.Tensor | None]:
    """log pi(token | sequence) at each sequence's last position, from the logits of that position only.

    With `hidden_states`, also the input of the output embedding at that position, `(len(sequences), hidden)` in
    float32 on the CPU: the final state from which the model predicts the token (read by a forward hook, so any
    architecture's own final norm is included). With `completion_lengths` (each sequence ends with a completion of
    that many tokens) and a prompt shared by several sequences, the answers to one prompt are forwarded after its
    prefill (`forward_after_prompts`), so that N answers read their prompt once; else each sequence is forwarded
    whole, in left-padded batches.
    """
    result = [0.0] * len(sequences)
    states: list[torch.Tensor | None] = [None] * len(sequences)
    captured: list[torch.Tensor] = []
    head = model.get_output_embeddings() if hidden_states else None
    if hidden_states and head is None:
        raise ValueError(
            "The model has no output embedding (`get_output_embeddings()`): its final state cannot be read."
        )
    shared = completion_lengths is not None and _repeated_prompts(sequences, completion_lengths)
    handle = None if head is None else head.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    try:
        if shared:
            forwards = _after_prompts(model, sequences, completion_lengths, pad_id, batch_size, captured)
        else:
            forwards = _whole_sequences(model, sequences, pad_id, batch_size, captured)
        for rows, logits, hidden in forwards:
            values = logits.float().log_softmax(-1)[:, token_id].tolist()
            hidden = hidden.float().cpu() if head is not None else None
            for r, i in enumerate(rows):
                result[i] = values[r]
                if hidden is not None:
                    states[i] = hidden[r]
    finally:
        if handle is not None:
            handle.remove()
    if head is None:
        return result, None
    if not sequences:
        return result, torch.empty((0, head.weight.shape[1]))
    return result, torch.stack(states)


def _prompts(sequences: Sequence[Sequence[int]], completion_lengths: Sequence[int]) -> list[tuple[int, ...]]:
    """Each sequence's prompt: all but its last `completion_lengths[i]` tokens."""
    return [tuple(seq[: len(seq) - n]) for seq, n in zip(sequences, completion_lengths)]


def _repeated_prompts(sequences: Sequence[Sequence[int]], completion_lengths: Sequence[int]) -> bool:
    prompts = _prompts(sequences, completion_lengths)
    return len(set(prompts)) < len(prompts)


def _whole_sequences(
    model: Any, sequences: list[list[int]], pad_id: int, batch_size: int, captured: list[torch.Tensor]
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor | None]]:
    """Per batch of whole left-padded sequences: its rows, the last position's logits and (hooked) final states."""
    device = _device(model)
    for rows, ids, mask, position_ids in left_padded_batches(sequences, pad_id, batch_size):
        captured.clear()
        logits = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            use_cache=False,
            **_supported(model, position_ids=position_ids.to(device), logits_to_keep=1),
        ).logits[:, -1]
        yield rows, logits, captured[-1][:, -1] if captured else None


def _after_prompts(
    model: Any,
    sequences: list[list[int]],
    completion_lengths: Sequence[int],
    pad_id: int,
    batch_size: int,
    captured: list[torch.Tensor],
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor | None]]:
    """As `_whole_sequences`, with each batch's prompts prefilled once (`forward_after_prompts`) and the logits kept
    at the continuations' last positions only (index n of a continuation of n + 1 tokens)."""
    device = _device(model)
    for rows, *batch in prompt_grouped_batches(sequences, completion_lengths, pad_id, batch_size):
        captured.clear()
        last = torch.tensor([completion_lengths[i] for i in rows], device=device)
        keep, column = torch.unique(last, return_inverse=True)
        logits = forward_after_prompts(model, *batch, logits_to_keep=keep).logits
        # a model without `logits_to_keep` returns every position: index those by the last positions themselves
        index = column if logits.shape[1] == len(keep) else last
        arange = torch.arange(len(rows), device=device)
        yield rows, logits[arange, index], captured[-1][arange, index] if captured else None


def score_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    settings: SelfRewardSettings | str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    batch_size: int = 8,
    chat_template_kwargs: dict | None = None,
) -> list[float | None]:
    """Self-reward scores r_s of finished completions, `None` for those without EOS.

    One forward pass over `prompt + completion` per completion (the official way of scoring after the fact), the
    answers to one prompt after its shared prefill (`last_position`); `generate_with_self_rewards` gets the same
    numbers for one extra token. Settings as in `resolve_settings`; the
    chat-template arguments default to the saved ones (training's), and a model trained with `cast_lm_head_to_fp32`
    is scored with a float32 head, as in training.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    cfg = resolve_settings(model, tokenizer, settings, overrides)
    sequences, rows, lengths = finished_sequences(model, tokenizer, prompts, completions, cfg, chat_template_kwargs)
    scores: list[float | None] = [None] * len(completions)
    if sequences:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else cfg.eos_token_ids[0]
        with _inference(model), lm_head_in_fp32(model, cfg.cast_lm_head_to_fp32):
            logps, _ = last_position(
                model, sequences, cfg.self_reward_token_id, pad_id, batch_size, completion_lengths=lengths
            )
        for i, logp in zip(rows, logps):
            scores[i] = score_of(logp, cfg)
    return scores


def finished_sequences(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    cfg: SelfRewardSettings,
    chat_template_kwargs: dict | None = None,
) -> tuple[list[list[int]], list[int], list[int]]:
    """The ids `prompt + completion` of each completion that ends with EOS, their row numbers and their completions'
    lengths: what a scorer scores (checked: one prompt per completion, ids in the vocabulary; the chat-template
    arguments default to the saved ones)."""
    _check_batch("prompts", prompts)
    _check_batch("completions", completions)
    if len(prompts) != len(completions):
        raise ValueError(f"Got {len(prompts)} prompts but {len(completions)} completions: give one prompt each.")
    eos = set(cfg.eos_token_ids)
    template_kwargs = chat_template_kwargs if chat_template_kwargs is not None else cfg.chat_template_kwargs
    sequences, rows, lengths = [], [], []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        ids = tokenize_completion(tokenizer, completion)
        _check_ids(f"completions[{i}]", ids, model)
        if ids and ids[-1] in eos:
            prompt_ids = tokenize_prompt(tokenizer, prompt, template_kwargs)
            _check_ids(f"prompts[{i}]", prompt_ids, model)
            sequences.append(prompt_ids + ids)
            rows.append(i)
            lengths.append(len(ids))
    return sequences, rows, lengths


def score_of(logp: float, cfg: SelfRewardSettings) -> float:
    """r_s from log pi(z_c | x, y, EOS), in float64."""
    return float(
        self_reward_score(torch.tensor(logp, dtype=torch.float64), cfg.self_reward_ref_constant, cfg.self_reward_beta)
    )


@dataclasses.dataclass
class ScoredCompletion:
    """One sampled completion with its self-reward score, captured during generation."""

    prompt_index: int
    sample_index: int
    text: str  # decoded without special tokens
    token_ids: list[int]  # generated ids up to and including the first EOS (all of them if truncated)
    finished: bool  # ended with an EOS id
    self_reward: float | None  # r_s, None when truncated
    self_reward_logprob: float | None  # log pi(z_c | x, y, EOS), None when truncated
    # Free confidence signals of the same sample: log pi(token | prefix) at temperature 1 over `token_ids`, with the
    # tokens the sampler suppresses (z_c after `trl-laser fit-row`) left out of pi.
    mean_token_logprob: float
    min_token_logprob: float


def generate_with_self_rewards(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    num_samples: int = 1,
    *,
    settings: SelfRewardSettings | str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    batch_size: int = 8,
    chat_template_kwargs: dict | None = None,
    progress: bool = False,
    **generate_kwargs: Any,
) -> list[list[ScoredCompletion]]:
    """Sample `num_samples` completions per prompt, each with its score r_s, read during generation itself.

    For a row whose first EOS is generated at step t, `generate` feeds that EOS back at step t + 1 with the full
    context (its attention mask is 1), so the logits of step t + 1 are exactly the distribution after EOS; rows that
    end at the very last step get one extra cached forward of a single token. No prefill of prompt + completion is
    repeated. The same forward calls give each sampled token's log-prob at temperature 1 (the free confidence signals
    `mean_token_logprob` and `min_token_logprob`, over the tokens up to and including the EOS), in the distribution
    the answers were sampled from: the tokens `generate` suppresses are left out of it (`suppressed_tokens`), so a
    refit of z_c's row, whose saved generation config suppresses z_c, leaves them as they were. Sampling follows
    `generate_kwargs` (default: `do_sample=True`, temperature 1, top-p 1, no top-k); the score and the token log-probs
    are always at temperature 1. `batch_size` counts sequences per `generate` call. Returns, per prompt, its
    `num_samples` completions.
    """
    results: list[list[ScoredCompletion]] = [[] for _ in prompts]
    batches = iter_generate_with_self_rewards(
        model,
        tokenizer,
        prompts,
        num_samples,
        settings=settings,
        overrides=overrides,
        batch_size=batch_size,
        chat_template_kwargs=chat_template_kwargs,
        **generate_kwargs,
    )
    with tqdm(total=len(prompts) * num_samples, desc="generating", unit="sample", disable=not progress) as bar:
        for batch in batches:
            for item in batch:
                results[item.prompt_index].append(item)
            bar.update(len(batch))
    return results


def iter_generate_with_self_rewards(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    num_samples: int = 1,
    *,
    settings: SelfRewardSettings | str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    batch_size: int = 8,
    chat_template_kwargs: dict | None = None,
    start: int = 0,
    seed: int | None = None,
    **generate_kwargs: Any,
) -> Iterator[list[ScoredCompletion]]:
    """`generate_with_self_rewards` one `generate` call at a time: yields each batch's completions as it is done.

    The jobs are the (prompt, sample) pairs in order, `batch_size` a call, from job `start` on (a multiple of
    `batch_size`). With `seed`, each call's sampling is seeded from `seed` and its first job's index, so a batch samples
    the same completions whichever batches ran before it: a run resumed at a batch boundary equals an uninterrupted
    one. Without it, sampling continues the global random state.
    """
    check_sampling_job_arguments(num_samples, batch_size, start, generate_kwargs, "`generate` arguments")
    bad = [k for k in _GENERATE_UNSUPPORTED if k in generate_kwargs and generate_kwargs[k] not in (None, 1)]
    if bad:
        raise ValueError(
            f"generate_with_self_rewards does not support {bad}: it samples one sequence per row "
            "(use `num_samples` for several samples per prompt)."
        )
    cfg = resolve_settings(model, tokenizer, settings, overrides)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else cfg.eos_token_ids[0]
    kwargs = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "disable_compile": True}
    kwargs.update(generate_kwargs)
    kwargs.update(eos_token_id=cfg.eos_token_ids, pad_token_id=pad_id, return_dict_in_generate=True, use_cache=True)

    prompt_ids, jobs = prompt_jobs(model, tokenizer, prompts, num_samples, cfg, chat_template_kwargs)
    for first in range(start, len(jobs), batch_size):
        if seed is not None:
            from transformers import set_seed

            set_seed(batch_seed(seed, first))
        # Entered per batch, not across the `yield`: the caller's code never runs in inference mode or with the head
        # patched.
        with _inference(model), lm_head_in_fp32(model, cfg.cast_lm_head_to_fp32):
            batch = _generate_batch(
                model, tokenizer, prompt_ids, jobs[first : first + batch_size], cfg, pad_id, kwargs
            )
        yield batch


def check_sampling_job_arguments(
    num_samples: Any, batch_size: int, start: int, sampling: Mapping[str, Any], what: str
) -> None:
    """The counts of a sampler of (prompt, sample) jobs, and no self-reward setting among its `sampling` arguments
    (`what` names them in the error)."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`num_samples` must be an integer >= 1, got {num_samples!r}.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    if start < 0 or start % batch_size:
        raise ValueError(f"`start` must be a multiple of `batch_size` ({batch_size}) and >= 0, got {start}.")
    misplaced = [k for k in OVERRIDABLE if k in sampling]
    if misplaced:
        raise TypeError(
            f"{misplaced} are self-reward settings, not {what}: pass them as `overrides={{{misplaced[0]!r}: ...}}`."
        )


def prompt_jobs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    num_samples: int,
    cfg: SelfRewardSettings,
    chat_template_kwargs: dict | None = None,
) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Each prompt's ids (checked; the chat-template arguments default to the saved ones) and the (prompt, sample)
    jobs of a sampler, in order."""
    template_kwargs = chat_template_kwargs if chat_template_kwargs is not None else cfg.chat_template_kwargs
    _check_batch("prompts", prompts)
    prompt_ids = [tokenize_prompt(tokenizer, p, template_kwargs) for p in prompts]
    for p, ids in enumerate(prompt_ids):
        _check_ids(f"prompts[{p}]", ids, model)
    return prompt_ids, [(p, s) for p in range(len(prompts)) for s in range(num_samples)]


def suppressed_tokens(model: Any, generate_kwargs: Mapping[str, Any]) -> list[int]:
    """The tokens `generate` never samples (`suppress_tokens`: the call's, else the generation config's); the free
    signals leave them out of the distribution, so that they read the sampler's own log-probs."""
    tokens = generate_kwargs.get("suppress_tokens")
    if tokens is None:
        tokens = getattr(getattr(model, "generation_config", None), "suppress_tokens", None)
    return list(tokens or [])


def batch_seed(seed: int, first_job: int) -> int:
    """The seed of the `generate` call whose first job is `first_job` (a 32-bit value, as numpy accepts)."""
    digest = hashlib.sha256(f"{seed}:{first_job}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def shared_prompt_cache(
    model: Any, input_ids: torch.Tensor, mask: torch.Tensor, prompts: Sequence[int], generate_kwargs: Mapping[str, Any]
) -> Any | None:
    """The KV cache of a batch's left-padded prompts but their last token, each distinct prompt read once and copied to
    its rows, for `generate` to start from: N samples of a prompt share one prefill instead of N (with short answers
    the prompt is most of the tokens). The copies are the rows' own prefill, position ids as `generate` sets them.
    `None` where nothing is shared (every row its own prompt, one-token prompts) or `cache_implementation` is set
    (another kind of cache; "dynamic" builds this one without sharing): `generate` then reads every row's prompt."""
    from transformers import DynamicCache

    cache_implementation = generate_kwargs.get(
        "cache_implementation", getattr(getattr(model, "generation_config", None), "cache_implementation", None)
    )
    if len(set(prompts)) == len(prompts) or cache_implementation is not None:
        return None
    cache = prompt_prefill(model, input_ids, mask, prompts)
    return cache if isinstance(cache, DynamicCache) else None


def prompt_prefill(model: Any, input_ids: torch.Tensor, mask: torch.Tensor, prompts: Sequence[Hashable]) -> Any | None:
    """The KV cache of left-padded prompts but their last token, one row per prompt, with each distinct prompt (its
    key in `prompts`) forwarded once and its cache copied to its rows; `None` for one-token prompts (nothing before
    the last token)."""
    if input_ids.shape[1] < 2:
        return None
    distinct = list(dict.fromkeys(prompts))
    first = torch.tensor([prompts.index(p) for p in distinct], device=input_ids.device)
    ids, prefix_mask = input_ids[first, :-1], mask[first, :-1]
    position_ids = (prefix_mask.long().cumsum(-1) - 1).masked_fill(prefix_mask == 0, 1)
    cache = model(
        input_ids=ids,
        attention_mask=prefix_mask,
        use_cache=True,
        **_supported(model, position_ids=position_ids, logits_to_keep=1),
    ).past_key_values
    if cache is not None:
        cache.reorder_cache(torch.tensor([distinct.index(p) for p in prompts], device=input_ids.device))
    return cache


def _generate_batch(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    jobs: list[tuple[int, int]],
    cfg: SelfRewardSettings,
    pad_id: int,
    kwargs: dict,
) -> list[ScoredCompletion]:
    """One `generate` call, one row per `(prompt index, sample index)` job, left-padded prompts; z_c's log-prob is
    recorded after each row's first EOS, and every generated token's log-prob up to it."""
    device = _device(model)
    input_ids, mask = left_padded([prompt_ids[p] for p, _ in jobs], pad_id)
    width = input_ids.shape[1]
    input_ids, mask = input_ids.to(device), mask.to(device)

    cache = shared_prompt_cache(model, input_ids, mask, [p for p, _ in jobs], kwargs)
    recorder = ZcRecorder(cfg.self_reward_token_id, suppressed_tokens(model, kwargs))
    handle = model.register_forward_hook(recorder, with_kwargs=True)
    try:
        out = model.generate(input_ids=input_ids, attention_mask=mask, past_key_values=cache, **kwargs)
    finally:
        handle.remove()
    generated = out.sequences[:, width:].tolist()
    steps = len(generated[0])

    eos = set(cfg.eos_token_ids)
    # The first EOS of a row is its real end: before it the row is unfinished, so no pad can precede it.
    ends = [next((t for t, tok in enumerate(row) if tok in eos), None) for row in generated]
    after = recorder.steps[:steps]  # the logits of forward call t predict generated token t
    if any(end == steps - 1 for end in ends):
        # Rows that ended at the last step: one cached forward of their EOS (the single token after the last step).
        full_mask = torch.cat([mask, mask.new_ones((mask.shape[0], steps))], dim=1)
        logits = model(
            input_ids=out.sequences[:, -1:],
            attention_mask=full_mask,
            past_key_values=out.past_key_values,
            use_cache=True,
            **_supported(model, position_ids=full_mask.sum(dim=1, keepdim=True) - 1, logits_to_keep=1),
        ).logits[:, -1]
        after.append(logits.float().log_softmax(-1)[:, cfg.self_reward_token_id])
    after = torch.stack(after).cpu().tolist()  # (steps [+ 1], rows): one transfer
    token_logps = torch.stack(recorder.finish(out.sequences[:, -1], steps), dim=1).cpu().tolist()  # (rows, steps)

    items = []
    for r, ((p, s), row, end) in enumerate(zip(jobs, generated, ends)):
        ids = row if end is None else row[: end + 1]
        logp = None if end is None else after[end + 1][r]
        own = token_logps[r][: len(ids)]
        items.append(
            ScoredCompletion(
                prompt_index=p,
                sample_index=s,
                text=tokenizer.decode(ids, skip_special_tokens=True),
                token_ids=ids,
                finished=end is not None,
                self_reward=None if logp is None else score_of(logp, cfg),
                self_reward_logprob=logp,
                mean_token_logprob=sum(own) / len(own),
                min_token_logprob=min(own),
            )
        )
    return items
