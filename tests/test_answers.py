"""The verifier r_v: last \\boxed{}, else LaTeX math, else the last plain number; never an evaluated restatement."""

import pytest

from trl_laser.answers import answers_equivalent, extract_answer, is_correct, last_boxed, single_boxed
from trl_laser.rewards import boxed_math_verify_reward, math_verify_reward


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{\\frac{1}{2}} and then \\boxed{3}", "3"),
        ("nested \\boxed{\\frac{a}{\\sqrt{2}}}", "\\frac{a}{\\sqrt{2}}"),
        ("no box here", None),
        ("unclosed \\boxed{12", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    "completion, gold, answer, correct",
    [
        ("To solve 86 * 59 correctly, you should add", "5074", "59", False),  # a restated problem is not an answer
        ("4 - 1 is the answer", "3", "1", False),
        ("7 plus 5 is 12.", "12", "12", True),
        ("It is 1,000 apples", "1000", "1000", True),
        ("x = -3.5", "-\\frac{7}{2}", "-3.5", True),
        ("The answer is 1/2.", "\\frac12", "1/2", True),
        ("The answer is $\\frac{1}{2}$.", "0.5", "\\frac{1}{2}", True),
        ("First 3, so \\boxed{0.5}", "$\\frac{1}{2}$", "0.5", True),
        ("I do not know.", "4", None, False),
    ],
)
def test_extraction_and_verdict(completion, gold, answer, correct):
    assert extract_answer(completion) == answer
    assert is_correct(completion, gold) is correct


def test_equivalence_groups_forms_of_one_number():
    assert answers_equivalent("0.5", "\\frac{1}{2}") and answers_equivalent("\\boxed{1/2}", "0.5")
    assert not answers_equivalent("2", "3") and not answers_equivalent("", "3")


def test_reward_function_accepts_text_and_messages():
    completions = [[{"role": "assistant", "content": "3 + 4 = 7"}], "x = 8"]
    assert math_verify_reward(completions, answer=["7", "7"]) == [1.0, 0.0]


@pytest.mark.parametrize(
    "completion, gold, box, reward",
    [
        ("Adding, 3 + 4 = 7, so \\boxed{7}.", "7", "7", 1.0),  # one box, right
        ("Adding, 3 + 4 = 8, so \\boxed{8}.", "7", "8", 0.0),  # one box, wrong
        ("\\boxed{7}, I repeat: \\boxed{7}", "7", None, 0.0),  # two boxes, even if both right
        ("\\boxed{\\boxed{7}}", "7", None, 0.0),  # a nested box counts twice
        ("3 + 4 = 7", "7", None, 0.0),  # no box: no fallback to the last number ...
        ("The answer is $7$.", "7", None, 0.0),  # ... nor to $...$ math
        ("\\fbox{7}", "7", None, 0.0),  # \fbox is not \boxed{ (the official remove_boxed rejects it)
        ("so \\boxed{7", "7", None, 0.0),  # an unclosed box
        # math-verify reads both as \boxed{...}: 0.5 becomes the rational 1/2, so the official verifier accepts it.
        ("so \\boxed{1/2}", "0.5", "1/2", 1.0),
        ("so \\boxed{\\frac{1}{2}}", "0.5", "\\frac{1}{2}", 1.0),
    ],
)
def test_official_verifier_by_hand(completion, gold, box, reward):
    assert single_boxed(completion) == box
    assert boxed_math_verify_reward([completion], answer=[gold]) == [reward]


def test_official_verifier_takes_messages_and_is_none_safe():
    completions = [
        [{"role": "assistant", "content": "so \\boxed{7}"}],
        [{"role": "assistant", "content": None}],  # e.g. a tool-call-only message
        [{"role": "assistant", "content": [{"type": "text", "text": "so \\boxed{7}"}]}],
        "so \\boxed{7}",
    ]
    assert boxed_math_verify_reward(completions, answer=["7", "7", "7", None]) == [1.0, 0.0, 1.0, 0.0]
    # The lenient verifier accepts what the official one refuses.
    assert math_verify_reward(["3 + 4 = 7", "\\boxed{7} or \\boxed{7}"], answer=["7", "7"]) == [1.0, 1.0]
