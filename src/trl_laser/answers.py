"""Answer extraction and checking: the rule-based verifier r_v of the paper (math-verify on the last `\\boxed{}`).

One definition serves the training reward, the evaluation report and the equivalence classes of weighted voting.
"""

from __future__ import annotations

import functools
from typing import Any

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify


_EXTRACTION = [LatexExtractionConfig(), ExprExtractionConfig()]


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None


def completion_text(completion: Any) -> str:
    """The text of a completion as TRL passes it: a string, or a list of chat messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        return content if isinstance(content, str) else " ".join(c.get("text", "") for c in content)
    raise TypeError(f"Unsupported completion type {type(completion).__name__}: expected str or a list of messages.")


@functools.lru_cache(maxsize=65536)
def _parse(text: str) -> tuple:
    return tuple(parse(text, extraction_config=_EXTRACTION, parsing_timeout=None))


def parse_answer(text: str) -> tuple:
    """math-verify's parse of a predicted or gold answer; an empty tuple if nothing could be parsed.

    The last `\\boxed{}` is used when there is one, else whatever math-verify extracts from the whole text.
    """
    boxed = last_boxed(text)
    if boxed is not None:
        parsed = _parse(f"${boxed}$")
        if parsed:
            return parsed
        return _parse(boxed)
    parsed = _parse(text)
    if not parsed and text.strip():
        parsed = _parse(f"${text.strip()}$")
    return parsed


def extract_answer(text: str) -> str | None:
    """The answer a completion gives, as a string: the last `\\boxed{}`, else what math-verify extracts; or None."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    parsed = _parse(text)
    return str(parsed[-1]) if parsed else None


def answers_equivalent(a: str | tuple, b: str | tuple) -> bool:
    """Whether two answers are mathematically equal (`0.5`, `\\frac{1}{2}` and `\\boxed{1/2}` are)."""
    pa = parse_answer(a) if isinstance(a, str) else a
    pb = parse_answer(b) if isinstance(b, str) else b
    if not pa or not pb:
        return False
    return bool(verify(list(pa), list(pb), timeout_seconds=None))


def is_correct(completion: str, gold: str) -> bool:
    """r_v: whether the completion's answer equals the gold answer (LaTeX or a plain number)."""
    return answers_equivalent(parse_answer(str(gold)), parse_answer(completion))


def math_verify_reward(completions: list, answer: list, **kwargs: Any) -> list[float]:
    """TRL reward function: 1.0 if the completion's answer equals the dataset's `answer` column, else 0.0.

    This is the 0/1 verifier reward that LaSeR's self-rewarding score is trained to predict.
    """
    return [float(is_correct(completion_text(c), str(a))) for c, a in zip(completions, answer, strict=True)]
