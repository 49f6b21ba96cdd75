"""Problem datasets and prompts, shared by training and evaluation so that both format prompts identically, and the
splits that `trl-laser train` trains and evaluates on."""

from __future__ import annotations

import hashlib
import json
import os
import random
from typing import TYPE_CHECKING, Any

from datasets import Dataset, get_dataset_config_names, load_dataset

from trl_laser.recipe import RecipeError
from trl_laser.settings import PromptSettings


if TYPE_CHECKING:
    from trl_laser.config import LaSeRScriptArguments


# The paper's instruction (as in DeepMath-103K / Open-Reasoner-Zero prompts): reason, then box the final answer.
PAPER_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def make_conversation(
    problem: str, system_prompt: str | None = None, instruction: str = PAPER_INSTRUCTION, separator: str = "\n"
) -> list:
    """The chat messages of one problem: optional system prompt, then the problem, `separator` and the instruction.

    The official LaSeR training data joins problem and instruction with a space (`trl-laser train`'s default); the
    newline default here keeps the prompts that evaluation and the SmolLM2 recipes were measured with.
    """
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    content = f"{problem}{separator}{instruction}" if instruction else problem
    return messages + [{"role": "user", "content": content}]


def load_problems(
    name_or_path: str,
    split: str = "train",
    problem_column: str = "problem",
    answer_column: str = "answer",
    config_name: str | None = None,
) -> Dataset:
    """Load a Hub dataset by name or a local JSON/JSONL/parquet/CSV file, with `problem` and `answer` columns.

    `config_name` is the configuration of a dataset that has several (GSM8K's `main`). Raises a `ValueError` naming
    the missing column (and the columns there are) or configuration (and the ones there are), saying the dataset is
    empty, or naming the file and line of malformed JSON / JSON Lines.
    `builtin:arithmetic` is the generated arithmetic set (seed 0; it also has a `difficulty` column).
    """
    if name_or_path == ARITHMETIC_DATASET:
        return make_arithmetic_dataset(split)
    extension = os.path.splitext(str(name_or_path))[1].lower()
    if os.path.isfile(name_or_path):
        if extension not in _LOCAL_FORMATS:
            raise ValueError(
                f"Unsupported data file {name_or_path!r}: use one of {sorted(_LOCAL_FORMATS)} or a Hub dataset name."
            )
        with open(name_or_path, "rb") as f:
            head = f.read(64).strip()
        if head in (b"", b"[]"):  # `datasets` fails on these with unrelated errors
            raise ValueError(f"Dataset {name_or_path!r} is empty.")
        try:
            dataset = load_dataset(_LOCAL_FORMATS[extension], data_files=str(name_or_path), split="train")
        except Exception:
            if _LOCAL_FORMATS[extension] == "json":
                _raise_json_error(str(name_or_path))
            raise
    elif extension in _LOCAL_FORMATS:
        raise FileNotFoundError(f"Data file {name_or_path!r} does not exist.")
    else:
        try:
            dataset = load_dataset(name_or_path, config_name, split=split)
        except ValueError as err:  # `datasets` names its own call, not the setting: name it
            if "Config name is missing" not in str(err) and "BuilderConfig" not in str(err):
                raise
            problem = "needs a configuration" if config_name is None else f"has no configuration {config_name!r}"
            raise ValueError(
                f"Dataset {name_or_path!r} {problem}: set `dataset_config` (--dataset-config) to one of "
                f"{get_dataset_config_names(name_or_path)}."
            ) from None
    for column, option in ((problem_column, "problem_column"), (answer_column, "answer_column")):
        if column not in dataset.column_names:
            raise ValueError(
                f"Dataset {name_or_path!r} has no column {column!r} (set by `{option}`); its columns are "
                f"{dataset.column_names}."
            )
    if len(dataset) == 0:
        raise ValueError(f"Dataset {name_or_path!r} (split {split!r}) is empty.")
    dataset = dataset.map(lambda x: {"problem": str(x[problem_column]), "answer": str(x[answer_column])})
    return dataset.select_columns(["problem", "answer"])


def _raise_json_error(path: str) -> None:
    """Name the file and line of a JSON / JSON Lines file that `datasets` failed on (it says neither)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    try:
        json.loads(text)
        return  # one valid JSON document: the failure is something else
    except json.JSONDecodeError as err:
        whole = err
    lines = text.split("\n")  # JSON Lines break at "\n" only: a string may hold U+2028
    first = next((line for line in lines if line.strip()), "")
    try:
        json_lines = path.lower().endswith(".jsonl") or isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        json_lines = False
    if not json_lines:
        raise ValueError(
            f"Dataset file {path} is not valid JSON: line {whole.lineno}, column {whole.colno}: {whole.msg}."
        ) from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"Dataset file {path}, line {number}: not valid JSON ({err.msg}, column {err.colno}): {line[:80]!r}. "
                "A JSON Lines file holds one JSON object per line."
            ) from None
        if not isinstance(record, dict):
            raise ValueError(
                f"Dataset file {path}, line {number}: a JSON {type(record).__name__}, not an object: {line[:80]!r}. "
                "A JSON Lines file holds one JSON object per line."
            )


def to_prompt_dataset(
    dataset: Dataset, system_prompt: str | None = None, instruction: str = PAPER_INSTRUCTION, separator: str = "\n"
) -> Dataset:
    """Add the conversational `prompt` column that TRL's GRPOTrainer expects; `answer` feeds the verifier reward."""
    return dataset.map(lambda x: {"prompt": make_conversation(x["problem"], system_prompt, instruction, separator)})


# ---------------------------------------------------------------------------------------------------------------------
# The built-in arithmetic dataset: generated, seeded, no network. Small models answer arithmetic briefly, so the
# verifier gets a real mix of right and wrong answers, which is what the self-reward score has to learn to separate.

ARITHMETIC_DATASET = "builtin:arithmetic"
# SmolLM2-135M-Instruct almost never writes \boxed{}; asked for just the number it often answers with one, which the
# verifier's fallback extraction (the last number) reads.
ARITHMETIC_INSTRUCTION = "Answer with just the number."
ARITHMETIC_DIFFICULTIES = {"easy": 0.5, "medium": 0.3, "hard": 0.2}
_ARITHMETIC_SIZES = {"train": 2000, "test": 200}
# Every distinct easy and medium problem of a split, once each (test: 32 + 374 for seed 0, train: 123 + 1310): "test"
# draws its 200 with repeats (110 texts), and within-problem rankings (and a row fitted to them) need many distinct
# problems that the model sometimes gets right, which the hard band (two-digit times, three-digit sums) almost never is.
ARITHMETIC_DISTINCT_SPLITS, _DISTINCT_BANDS = {"train_distinct": "train", "test_distinct": "test"}, ("easy", "medium")


def _arithmetic_problem(rng: random.Random, difficulty: str) -> tuple[str, int]:
    """One problem of a band, in words ("7 plus 5") so that a completion restating it is not read as an answer."""
    if difficulty == "easy":  # one-digit addition / subtraction with a non-negative result
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        if rng.random() < 0.5:
            return f"What is {a} plus {b}?", a + b
        a, b = max(a, b), min(a, b)
        return f"What is {a} minus {b}?", a - b
    if difficulty == "medium":  # two-digit +- one-digit, or the one-digit times table
        kind = rng.randrange(3)
        if kind == 2:
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            return f"What is {a} times {b}?", a * b
        a, b = rng.randint(10, 99), rng.randint(1, 9)
        return (f"What is {a} plus {b}?", a + b) if kind == 0 else (f"What is {a} minus {b}?", a - b)
    if difficulty == "hard":  # two-digit multiplication, or three-digit addition / subtraction
        kind = rng.randrange(3)
        if kind == 2:
            a, b = rng.randint(11, 99), rng.randint(11, 99)
            return f"What is {a} times {b}?", a * b
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        if kind == 0:
            return f"What is {a} plus {b}?", a + b
        a, b = max(a, b), min(a, b)
        return f"What is {a} minus {b}?", a - b
    raise ValueError(f"Unknown difficulty {difficulty!r}: use one of {sorted(ARITHMETIC_DIFFICULTIES)}.")


def _band_problems(difficulty: str) -> list[tuple[str, int]]:
    """Every problem of a finite band, in the order of `_arithmetic_problem`'s kinds."""
    if difficulty == "easy":
        sums = [(f"What is {a} plus {b}?", a + b) for a in range(10) for b in range(10)]
        return sums + [(f"What is {a} minus {b}?", a - b) for a in range(10) for b in range(a + 1)]
    if difficulty == "medium":
        tables = [(f"What is {a} times {b}?", a * b) for a in range(2, 10) for b in range(2, 10)]
        sums = [(f"What is {a} plus {b}?", a + b) for a in range(10, 100) for b in range(1, 10)]
        return tables + sums + [(f"What is {a} minus {b}?", a - b) for a in range(10, 100) for b in range(1, 10)]
    raise ValueError(f"Band {difficulty!r} is not enumerated: the distinct splits hold {_DISTINCT_BANDS}.")


def _distinct_problems(split: str, seed: int, test_fraction: float) -> dict[str, list]:
    """The rows of a distinct split: every distinct easy and medium problem of its split once, in a seeded order."""
    test = ARITHMETIC_DISTINCT_SPLITS[split] == "test"
    rows = [
        (problem, str(answer), band)
        for band in _DISTINCT_BANDS
        for problem, answer in _band_problems(band)
        if _in_test_split(problem, seed, test_fraction) == test
    ]
    random.Random(f"{ARITHMETIC_DATASET}:{seed}:{split}").shuffle(rows)
    return {"problem": [r[0] for r in rows], "answer": [r[1] for r in rows], "difficulty": [r[2] for r in rows]}


def _in_test_split(problem: str, seed: int, test_fraction: float) -> bool:
    """Which split a problem belongs to: a hash of (seed, problem), so that train and test never share a problem."""
    digest = hashlib.sha256(f"{seed}:{problem}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction


def make_arithmetic_dataset(
    split: str = "train",
    num_samples: int | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    difficulties: dict[str, float] | None = None,
) -> Dataset:
    """Generate the built-in arithmetic problems (`problem`, `answer`, `difficulty` columns), reproducibly.

    Each problem belongs to one split, chosen by a hash of (seed, problem): the "train" and "test" splits of one seed
    are disjoint. Problems repeat within a split (there are only 155 one-digit ones). `difficulties` maps "easy",
    "medium" and "hard" to their shares; by default half are easy, which SmolLM2-135M-Instruct answers right about a
    third of the time at temperature 1, and a fifth hard, which it almost never does. "test_distinct" holds every
    distinct easy and medium problem of the "test" split once (406 for seed 0; `difficulties` does not apply): the
    held-out set for within-problem rankings, where each problem must count once; "train_distinct" (1,433) those of
    "train", to fit a row (`trl-laser fit-row`) on many distinct problems.
    """
    if split not in (*_ARITHMETIC_SIZES, *ARITHMETIC_DISTINCT_SPLITS):
        splits = sorted((*_ARITHMETIC_SIZES, *ARITHMETIC_DISTINCT_SPLITS))
        raise ValueError(f"{ARITHMETIC_DATASET} has the splits {splits}, not {split!r}.")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction}.")
    if split in ARITHMETIC_DISTINCT_SPLITS:
        if difficulties is not None:
            raise ValueError(f"`difficulties` does not apply to {split!r}, which holds every easy and medium problem.")
        rows = _distinct_problems(split, seed, test_fraction)
        return Dataset.from_dict({k: v[:num_samples] for k, v in rows.items()})
    shares = difficulties if difficulties is not None else ARITHMETIC_DIFFICULTIES
    num_samples = _ARITHMETIC_SIZES[split] if num_samples is None else num_samples
    rng = random.Random(f"{ARITHMETIC_DATASET}:{seed}:{split}")
    names, weights = list(shares), list(shares.values())
    rows = {"problem": [], "answer": [], "difficulty": []}
    while len(rows["problem"]) < num_samples:
        difficulty = rng.choices(names, weights)[0]
        problem, answer = _arithmetic_problem(rng, difficulty)
        if _in_test_split(problem, seed, test_fraction) == (split == "test"):
            rows["problem"].append(problem)
            rows["answer"].append(str(answer))
            rows["difficulty"].append(difficulty)
    return Dataset.from_dict(rows)


def default_instruction(dataset_name: str | None) -> str:
    """The instruction appended to each problem when none is set: the paper's, or the arithmetic set's own."""
    return ARITHMETIC_INSTRUCTION if dataset_name == ARITHMETIC_DATASET else PAPER_INSTRUCTION


# ---------------------------------------------------------------------------------------------------------------------
# The splits of `trl-laser train`, from its script arguments (`config.LaSeRScriptArguments`).


def prompt_settings(script_args: LaSeRScriptArguments) -> PromptSettings:
    """How the training prompts are built, saved with the model so that `trl-laser eval` builds them the same way."""
    name = script_args.dataset_name
    return PromptSettings(
        system_prompt=script_args.system_prompt,
        instruction=script_args.instruction if script_args.instruction is not None else default_instruction(name),
        instruction_separator=script_args.instruction_separator,
        dataset_name=name,
        dataset_seed=script_args.dataset_seed,
    )


def load_split(script_args: LaSeRScriptArguments, split: str, limit: int | None, seed: int) -> Dataset:
    """One split as TRL's GRPOTrainer wants it: a conversational `prompt` plus the `answer` for the verifier."""
    name = script_args.dataset_name
    if not name:
        raise RecipeError(
            "`dataset_name` is not set: give a Hub dataset, a local JSON/JSONL/parquet/CSV file, or builtin:arithmetic."
        )
    if name == ARITHMETIC_DATASET:
        dataset = make_arithmetic_dataset(split, seed=seed)
    else:
        dataset = load_problems(
            name, split, script_args.problem_column, script_args.answer_column, script_args.dataset_config
        )
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    instruction = script_args.instruction if script_args.instruction is not None else default_instruction(name)
    return to_prompt_dataset(dataset, script_args.system_prompt, instruction, script_args.instruction_separator)


def filter_long_prompts(
    dataset: Dataset, tokenizer: Any, max_length: int, chat_template_kwargs: dict | None
) -> Dataset:
    """Drop the problems whose templated prompt is longer than `max_length` tokens (the paper's 2048 filter)."""

    def keep(row):
        ids = tokenizer.apply_chat_template(
            row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True, **(chat_template_kwargs or {})
        )["input_ids"]
        return len(ids) <= max_length

    kept = dataset.filter(keep, desc=f"dropping prompts over {max_length} tokens")
    if len(kept) == 0:
        raise RecipeError(f"Every prompt is longer than `max_prompt_length={max_length}` tokens.")
    return kept
