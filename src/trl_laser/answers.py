"""Answer extraction and checking: the rule-based verifier r_v of the paper (math-verify on the last `\\boxed{}`).

One definition serves the training reward, the evaluation report and the equivalence classes of weighted voting.
Two verifiers: `math_verify_reward`, lenient (the last box, else the last `$...$` math, else the last number), right
for models that never box such as SmolLM2; and `boxed_math_verify_reward`, the official LaSeR code's (exactly one
`\\boxed{`, then math-verify on it, no fallback), for comparing with the paper.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any

from math_verify import LatexExtractionConfig, parse, verify


_LATEX = [LatexExtractionConfig()]
# A plain number: optional sign, thousands separators, decimals, or a fraction a/b.
_NUMBER = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|(?<![\w.])-?\d+(?:\.\d+)?(?:/\d+)?")
# math-verify warns once that its signal-based timeout is off; it must be off to run outside the main thread.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def _closing_brace(text: str, opening: int) -> int | None:
    """The index of the `}` that closes the `{` at `opening` (braces balanced), or None if it never closes."""
    depth = 0
    for j in range(opening, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    j = _closing_brace(text, i)
    return None if j is None else text[i + 1 : j].strip()


def completion_text(completion: Any) -> str:
    """The text of a completion as TRL passes it: a string, or a list of chat messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content") or ""
        return content if isinstance(content, str) else " ".join(c.get("text", "") for c in content)
    raise TypeError(f"Unsupported completion type {type(completion).__name__}: expected str or a list of messages.")


@functools.lru_cache(maxsize=65536)
def _parse(text: str, latex_only: bool = False) -> tuple:
    config = _LATEX if latex_only else None
    kwargs = {"extraction_config": config} if config else {}
    return tuple(parse(text, parsing_timeout=None, **kwargs))


def extract_answer(text: str) -> str | None:
    """The answer a completion gives: the last `\\boxed{}`, else the last `$...$` math, else the last plain number.

    An unboxed completion's expressions are not evaluated: "86 * 59 is hard" answers 59, not 5074, so restating the
    problem never counts as solving it.
    """
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    latex = _parse(text, latex_only=True)
    if latex:
        return str(latex[-1])
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def parse_answer(answer: str) -> tuple:
    """math-verify's parse of one answer (a gold answer or an extracted one): the whole string, or its `\\boxed{}`.

    Empty if nothing could be parsed.
    """
    boxed = last_boxed(answer)
    text = (boxed if boxed is not None else answer).strip().strip("$").strip()
    if not text:
        return ()
    return _parse(f"${text}$") or _parse(text)


def answers_equivalent(a: str, b: str) -> bool:
    """Whether two answers are mathematically equal (`0.5`, `\\frac{1}{2}` and `\\boxed{1/2}` are)."""
    pa, pb = parse_answer(a), parse_answer(b)
    if not pa or not pb:
        return False
    return bool(verify(list(pa), list(pb), timeout_seconds=None))


def is_correct(completion: str, gold: str) -> bool:
    """r_v: whether the answer extracted from the completion equals the gold answer (LaTeX or a plain number)."""
    answer = extract_answer(completion)
    return answer is not None and answers_equivalent(str(gold), answer)


def math_verify_reward(completions: list, answer: list, **kwargs: Any) -> list[float]:
    """TRL reward function: 1.0 if the completion's answer equals the dataset's `answer` column, else 0.0.

    This is the 0/1 verifier reward that LaSeR's self-rewarding score is trained to predict.
    """
    return [float(is_correct(completion_text(c), str(a))) for c, a in zip(completions, answer, strict=True)]


def last_box_content(text: str) -> str | None:
    """The official evaluation's answer (`remove_boxed(last_boxed_only_string(text))`): the last `\\boxed{...}`.

    None without a box, for an unclosed one, and when the last box is an `\\fbox` (which the official code finds but
    cannot unwrap).
    """
    start = text.rfind("\\boxed")
    if start < 0 or not text.startswith("\\boxed{", start):  # no `\\boxed`, or one without a brace (`\\boxed 3`)
        return None
    opening = start + len("\\boxed")
    j = _closing_brace(text, opening)
    return None if j is None else text[opening + 1 : j]


def single_boxed(text: str) -> str | None:
    """The official verifier's answer: the content of the response's only `\\boxed{...}`, else None.

    As the official LaSeR code (verl `reward_score`): None unless `\\boxed{` occurs exactly once, so a nested box
    (`\\boxed{\\boxed{3}}`) or a repeated answer gives None; `\\fbox{...}` is never an answer (the official
    `remove_boxed` accepts only `\\boxed{`); the box must close (braces balanced).
    """
    return last_box_content(text) if text.count("\\boxed{") == 1 else None


def _boxed_equivalent(answer: str | None, gold: str) -> bool:
    """The official comparison: math-verify on `\\boxed{gold}` and `\\boxed{answer}`; any failure is wrong."""
    if answer is None:
        return False
    try:
        gold_parsed, answer_parsed = _parse(f"\\boxed{{{gold}}}"), _parse(f"\\boxed{{{answer}}}")
        return bool(verify(list(gold_parsed), list(answer_parsed), timeout_seconds=None))
    except Exception:  # the official code scores any math-verify failure as wrong
        return False


def is_correct_boxed(completion: str, gold: str) -> bool:
    """The official r_v (training): the only `\\boxed{}` (`single_boxed`) equals the gold answer."""
    return _boxed_equivalent(single_boxed(completion), gold)


def grade_last_boxed(completion: str, gold: str) -> tuple[str | None, bool]:
    """The official evaluation's answer, the last `\\boxed{}` (`last_box_content`), and whether it equals the gold
    answer."""
    answer = last_box_content(completion)
    return answer, _boxed_equivalent(answer, gold)


def boxed_math_verify_reward(completions: list, answer: list, **kwargs: Any) -> list[float]:
    """TRL reward function, the official LaSeR verifier: 1.0 if the completion's only `\\boxed{}` equals `answer`.

    0.0 when there is no box or more than one, and no fallback to `$...$` or plain numbers (`single_boxed`). The
    paper recipes use it; models that never box (SmolLM2) get 0 everywhere and need `math_verify_reward`.
    """
    return [
        float(a is not None and is_correct_boxed(completion_text(c), str(a)))
        for c, a in zip(completions, answer, strict=True)
    ]
