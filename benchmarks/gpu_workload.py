"""What the GPU benchmark trains on: a random model built from a config, a word-level tokenizer made in code, and
scripted rollouts, so that the lent machine needs no download and every arm trains on the same batches.

- The model is a Qwen2 of a named shape (`SHAPES`), random weights from a seed, built on the device.
- The tokenizer has `<pad>`, `<eos>`, `<unk>` and `<z_c>` (the self-reward token) and one word per remaining id.
- The rollouts replace generation (TRL's `rollout_func`): prompt and completion ids are a function of the prompt text,
  its repeat index in the batch and a seed, so two trainers with the same sampler seed see identical batches
  whatever their weights. Finished completions end with EOS; a fixed share is truncated (no EOS, full length). With
  a random model, sampled completions would almost never end with EOS (one id in ~150k), and z_c would be scored
  nowhere: scripted rollouts keep the realistic part, the training step at the lengths asked for.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch


PAD, EOS, UNK, ZC = "<pad>", "<eos>", "<unk>", "<z_c>"
SPECIAL_TOKENS = (PAD, EOS, UNK, ZC)

# Qwen2.5 shapes (their configs' sizes), and a tiny one for the CPU dry-run.
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
    ),
    "qwen2.5-1.5b": dict(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=1024,
    ),
}


def word_tokenizer(vocab_size: int) -> Any:
    """A fast tokenizer with the special tokens first and the words `w4`, `w5`, ... up to `vocab_size` ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIAL_TOKENS, *(f"w{i}" for i in range(len(SPECIAL_TOKENS), vocab_size))]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def random_model(shape: str, tokenizer: Any, dtype: torch.dtype, seed: int, device: str | None = None) -> Any:
    """A Qwen2 causal LM of `SHAPES[shape]` with random weights (seeded), in `dtype`, built on `device` (the default
    device when None: under DeepSpeed ZeRO-3, its `zero.Init` places the partitions)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        **SHAPES[shape],
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    if device is not None:
        torch.cuda.manual_seed_all(seed)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


class ScriptedRollout:
    """TRL `rollout_func`: deterministic prompt and completion ids in place of generation.

    Prompt `i` of a batch, the `k`-th copy of its text in that batch, gets ids drawn from `Random(seed, text, k)`:
    a prompt of 3/4 to all of `prompt_length` ids, and a completion that is, with probability `truncated_fraction`,
    `completion_length` ids without EOS, else 1/4 to all of `completion_length` ids ending with EOS. Ids never
    include a special token except that final EOS.
    """

    def __init__(
        self,
        vocab: int,
        eos_token_id: int,
        prompt_length: int,
        completion_length: int,
        seed: int,
        truncated_fraction: float = 0.125,
    ) -> None:
        self.low = len(SPECIAL_TOKENS)
        self.vocab = vocab
        self.eos_token_id = eos_token_id
        self.prompt_length = prompt_length
        self.completion_length = completion_length
        self.seed = seed
        self.truncated_fraction = truncated_fraction

    def sample(self, prompt: str, copy: int) -> tuple[list[int], list[int]]:
        rng = random.Random(f"{self.seed}|{prompt}|{copy}")
        n_prompt = rng.randint(max(1, 3 * self.prompt_length // 4), self.prompt_length)
        prompt_ids = [rng.randrange(self.low, self.vocab) for _ in range(n_prompt)]
        if rng.random() < self.truncated_fraction:
            completion = [rng.randrange(self.low, self.vocab) for _ in range(self.completion_length)]
        else:
            n = rng.randint(max(1, self.completion_length // 4), self.completion_length)
            completion = [rng.randrange(self.low, self.vocab) for _ in range(n - 1)] + [self.eos_token_id]
        return prompt_ids, completion

    def __call__(self, prompts: Sequence[Any], trainer: Any = None) -> dict[str, Any]:
        seen: dict[str, int] = {}
        prompt_ids, completion_ids = [], []
        for prompt in prompts:
            key = str(prompt)
            seen[key] = seen.get(key, -1) + 1
            p, c = self.sample(key, seen[key])
            prompt_ids.append(p)
            completion_ids.append(c)
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}


def prompt_dataset(count: int) -> Any:
    """`count` prompt texts (the rollouts turn each into ids)."""
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [f"prompt {i}" for i in range(count)]})


def verifier(kind: str, record: Callable[[list], None]) -> Callable[..., list[float]]:
    """A 0/1 reward of the completion ids: `"hash"` (about half correct, a function of the ids) or `"constant"` (all
    correct: GRPO's advantages are then 0, so only LaSeR's term can move the weights). Each call hands the batch's
    completion ids to `record` first."""

    def reward(completions: list, completion_ids: list, **kwargs: Any) -> list[float]:
        record(completion_ids)
        if kind == "constant":
            return [1.0] * len(completion_ids)
        return [float(hashlib.sha256(str(list(ids)).encode()).digest()[0] & 1) for ids in completion_ids]

    reward.__name__ = f"{kind}_verifier"
    return reward
