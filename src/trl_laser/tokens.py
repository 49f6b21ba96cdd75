"""Which ids are EOS and which token may be z_c: one set of rules for training, scoring, probe and estimation.

z_c is read right after EOS, so it must be a single token of its own that the policy never writes and the chat
template never shows it (otherwise its log-prob after EOS is not a free signal). The trainer, `score_completions`,
`trl-laser probe` and `trl-laser estimate-ref-constant` all resolve it here, so a token accepted by one is accepted
by all, and the candidates an error suggests are exactly the tokens these rules accept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """EOS ids exactly as TRL's GRPOTrainer collects them: the tokenizer's EOS first, then the generation config's."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids = [tokenizer.eos_token_id, *ids]
    return [int(i) for i in ids]


def vocab_size(model: Any, tokenizer: Any) -> int:
    """The model's embedding rows (`num_embeddings`: ZeRO-3 partitions the weight itself to an empty tensor), or the
    tokenizer's size when there is no model yet."""
    if model is None:
        return len(tokenizer)
    return model.get_input_embeddings().num_embeddings


def token_problem(
    tokenizer: Any, token_id: int | None, token_str: str | None, vocab: int, eos_ids: Sequence[int]
) -> str | None:
    """Why a token cannot be z_c (the rest of an error message), or None if it can."""
    if token_id is None or token_str is None or tokenizer.convert_ids_to_tokens(token_id) != token_str:
        return "is not a single token of the tokenizer's vocabulary."
    if token_id == tokenizer.unk_token_id:
        return (
            f"(id {token_id}) is the tokenizer's unknown token, which stands for any text the vocabulary lacks; "
            "z_c must be a token of its own."
        )
    if token_id >= vocab:
        return f"has id {token_id}, beyond the model's {vocab} embedding rows."
    if token_id in eos_ids or token_id == tokenizer.pad_token_id:
        return (
            f"(id {token_id}) is an EOS or the pad token; z_c must be a token that follows EOS and is never generated."
        )
    if _chat_template_uses(tokenizer, token_id, token_str):
        return (
            "is used by the chat template, so its log-prob after EOS is not a free signal. Pick a token the template "
            "does not use."
        )
    return None


def _chat_template_uses(tokenizer: Any, token_id: int, token_str: str) -> bool:
    if not getattr(tokenizer, "chat_template", None):
        return False
    if token_str in tokenizer.chat_template:
        return True
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
    ]
    for conversation in (messages, messages[1:]):
        try:
            ids = tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=False)
        except Exception:  # templates that refuse a system message: try without it
            continue
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return token_id in list(ids)
    return False


def candidate_tokens(tokenizer: Any, vocab: int, eos_ids: Sequence[int], limit: int = 5) -> list[str]:
    """Added and special tokens of the vocabulary that pass every rule of `token_problem`."""
    candidates = []
    for name in dict.fromkeys([*tokenizer.get_added_vocab(), *getattr(tokenizer, "all_special_tokens", [])]):
        if len(candidates) >= limit:
            break
        if token_problem(tokenizer, tokenizer.convert_tokens_to_ids(name), name, vocab, eos_ids) is None:
            candidates.append(name)
    return candidates


def _candidates_hint(tokenizer: Any, vocab: int, eos_ids: Sequence[int]) -> str:
    candidates = candidate_tokens(tokenizer, vocab, eos_ids)
    if candidates:
        return f"Candidates in this vocabulary: {candidates}."
    return "No special token of this vocabulary qualifies: add one to the tokenizer and resize the embeddings."


def resolve_self_reward_token(
    tokenizer: Any, token: str | int, vocab: int, eos_ids: Sequence[int], field: str = "self_reward_token"
) -> tuple[int, str]:
    """`(id, token string)` of z_c given as a token string, an id, or an id written in digits.

    Raises `ValueError` naming `field`, saying why the token is refused and which tokens of this vocabulary qualify.
    """
    if isinstance(token, str) and token.strip().isdigit():
        token = int(token.strip())
    if isinstance(token, int):
        if not 0 <= token < vocab:
            raise ValueError(
                f"`{field}={token}` is not a token id of this model (vocabulary size {vocab}). "
                f"{_candidates_hint(tokenizer, vocab, eos_ids)}"
            )
        token_id, token_str = token, tokenizer.convert_ids_to_tokens(token)
    else:
        token_id, token_str = tokenizer.convert_tokens_to_ids(token), token
    problem = token_problem(tokenizer, token_id, token_str, vocab, eos_ids)
    if problem is not None:
        raise ValueError(f"`{field}={token!r}` {problem} {_candidates_hint(tokenizer, vocab, eos_ids)}")
    return int(token_id), token_str
