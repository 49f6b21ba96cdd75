"""The official LaSeR code's grading conventions: the evaluation cuts a response after its first `</answer>` before
it takes the last box, and the training reward applies the R1 format check when the prompt asks for answer tags."""

from __future__ import annotations

import random
import re

import pytest

from trl_laser.answers import grade_last_boxed, last_box_content, official_answer
from trl_laser.rewards import asks_for_answer_tags, boxed_math_verify_reward


@pytest.mark.parametrize(
    "completion, answer, correct",
    [
        # A box after the first </answer> is not read: the official evaluation cuts there.
        ("<answer> $\\boxed{4}$ </answer> Hmm, actually $\\boxed{5}$.", "4", False),
        ("<answer> $\\boxed{5}$ </answer> Hmm, actually $\\boxed{4}$.", "5", True),
        ("<answer> The answer is 5. </answer> So $\\boxed{5}$.", None, False),  # no box before the cut: no answer
        # Without answer tags nothing is cut: the last box counts, as before.
        ("First $\\boxed{4}$, no: $\\boxed{5}$.", "5", True),
        ("<answer> $\\boxed{4}$ and later $\\boxed{5}$", "5", True),  # no </answer>: no cut
    ],
)
def test_paper_grading_cuts_after_the_first_closing_answer_tag(completion, answer, correct):
    assert grade_last_boxed(completion, "5") == (answer, correct)


ORZ_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The Assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process is enclosed within <think> </think> and answer is enclosed within <answer> </answer> tags, respectively, "
    "i.e., <think> reasoning process here </think> <answer> answer here </answer>. User: What is 2 + 3? "
    "Assistant: <think>"
)
ORZ_MESSAGES = [
    {"role": "system", "content": ORZ_PROMPT.split(" User:")[0]},
    {"role": "user", "content": [{"type": "text", "text": "What is 2 + 3?"}]},
]
PLAIN_PROMPT = "What is 2 + 3? Please reason step by step, and put your final answer within \\boxed{}."


@pytest.mark.parametrize(
    "completion, tagged, plain",
    [
        ("2 + 3 = 5. </think> <answer> \\boxed{5} </answer>", 1.0, 1.0),  # the R1 format, right
        ("2 + 3 = 6. </think> <answer> \\boxed{6} </answer>", 0.0, 0.0),  # the R1 format, wrong
        ("2 + 3 = 5, so \\boxed{5}.", 0.0, 1.0),  # no tags
        ("2 + 3 = 5. </think> <answer> 5 </answer> \\boxed{5}", 0.0, 1.0),  # the box outside the tags
        ("2 + 3 = 5. </think> \\boxed{5} <answer> 5 </answer>", 0.0, 1.0),  # ... before them
        ("</think> <answer> \\boxed{4}, no: \\boxed{5} </answer>", 1.0, 0.0),  # two boxes inside: the last one counts
        ("</think> <answer> \\boxed{5}, no: \\boxed{4} </answer>", 0.0, 0.0),
        ("2 + 3 = 5. <answer> \\boxed{5} </answer>", 0.0, 1.0),  # no </think>
        ("</think> <answer> \\boxed{5} </answer>\n", 0.0, 1.0),  # anything after </answer>
        ("</think> <answer> \\boxed{5} </answer> <answer> 5 </answer>", 0.0, 1.0),  # a tag twice
        ("<answer> </think> \\boxed{5} </answer>", 0.0, 1.0),  # </think> inside the answer
        ("</think> <answer> \\boxed{5 </answer>", 0.0, 0.0),  # an unclosed box
    ],
)
def test_training_reward_applies_the_r1_format_check_when_the_prompt_asks_for_tags(completion, tagged, plain):
    # TRL's call: every argument by keyword, prompts as text or as chat messages.
    for prompt in (ORZ_PROMPT, ORZ_MESSAGES):
        rewards = boxed_math_verify_reward(
            prompts=[prompt], completions=[completion], completion_ids=[[1]], answer=["5"], trainer_state=None
        )
        assert rewards == [tagged]
    assert boxed_math_verify_reward(prompts=[PLAIN_PROMPT], completions=[completion], answer=["5"]) == [plain]
    assert boxed_math_verify_reward([completion], ["5"]) == [plain]  # without prompts: as before


def test_prompt_and_completion_shapes():
    assert asks_for_answer_tags(ORZ_PROMPT) and asks_for_answer_tags(ORZ_MESSAGES)
    assert not asks_for_answer_tags(PLAIN_PROMPT) and not asks_for_answer_tags("Use <answer> once.")
    messages = [[{"role": "assistant", "content": "</think> <answer> \\boxed{5} </answer>"}], "\\boxed{5}"]
    assert boxed_math_verify_reward(messages, ["5", "5"], prompts=[ORZ_MESSAGES, PLAIN_PROMPT]) == [1.0, 1.0]


R1_PATTERN = re.compile(r".*</think>.*<answer>.*\\boxed\{.*\}.*</answer>", re.DOTALL)
R1_TAGS = ("</think>", "<answer>", "</answer>")
FILLERS = ["", "5", " ", "\n", "{", "}", "\\boxed{", "\\boxed{5}", "\\boxed{\\boxed{4}}", "\\boxed 3", "\\fbox{5}"]


def random_response(rng: random.Random) -> str:
    """Fillers around the three tags, mostly in order; sometimes a tag is dropped, repeated or moved."""
    tags = list(R1_TAGS) if rng.random() < 0.7 else rng.sample(R1_TAGS, 3)
    tags = [tag for tag in tags if rng.random() > 0.1] + ([rng.choice(R1_TAGS)] if rng.random() < 0.1 else [])
    parts = []
    for tag in tags:
        parts += [*rng.choices(FILLERS, k=rng.randint(0, 3)), tag]
    if rng.random() < 0.3:
        parts += rng.choices(FILLERS, k=rng.randint(1, 2))
    return "".join(parts)


def test_r1_format_check_agrees_with_the_official_pattern():
    """The check runs in linear time, unlike the pattern it stands for: the same verdict on random responses."""
    rng = random.Random(0)
    verdicts = []
    for _ in range(20000):
        text = random_response(rng)
        official = all(text.count(tag) == 1 for tag in R1_TAGS) and R1_PATTERN.fullmatch(text) is not None
        assert official_answer(text, answer_tags=True) == (last_box_content(text) if official else None), text
        verdicts.append(official)
    assert 0.05 < sum(verdicts) / len(verdicts) < 0.95
