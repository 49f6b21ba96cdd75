"""Problem datasets and prompts, shared by training and evaluation so that both format prompts identically."""

from __future__ import annotations

import os

from datasets import Dataset, load_dataset


# The paper's instruction (as in DeepMath-103K / Open-Reasoner-Zero prompts): reason, then box the final answer.
PAPER_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def make_conversation(problem: str, system_prompt: str | None = None, instruction: str = PAPER_INSTRUCTION) -> list:
    """The chat messages of one problem: optional system prompt, then the problem followed by the instruction."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    content = f"{problem}\n{instruction}" if instruction else problem
    return messages + [{"role": "user", "content": content}]


def load_problems(
    name_or_path: str,
    split: str = "train",
    problem_column: str = "problem",
    answer_column: str = "answer",
    config_name: str | None = None,
) -> Dataset:
    """Load a Hub dataset by name or a local JSON/JSONL/parquet/CSV file, with `problem` and `answer` columns.

    Raises a `ValueError` naming the missing column (and the columns there are), or saying the dataset is empty.
    """
    extension = os.path.splitext(str(name_or_path))[1].lower()
    if os.path.isfile(name_or_path):
        if extension not in _LOCAL_FORMATS:
            raise ValueError(
                f"Unsupported data file {name_or_path!r}: use one of {sorted(_LOCAL_FORMATS)} or a Hub dataset name."
            )
        dataset = load_dataset(_LOCAL_FORMATS[extension], data_files=str(name_or_path), split="train")
    elif extension in _LOCAL_FORMATS:
        raise FileNotFoundError(f"Data file {name_or_path!r} does not exist.")
    else:
        dataset = load_dataset(name_or_path, config_name, split=split)
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


def to_prompt_dataset(
    dataset: Dataset, system_prompt: str | None = None, instruction: str = PAPER_INSTRUCTION
) -> Dataset:
    """Add the conversational `prompt` column that TRL's GRPOTrainer expects; `answer` feeds the verifier reward."""
    return dataset.map(lambda x: {"prompt": make_conversation(x["problem"], system_prompt, instruction)})
