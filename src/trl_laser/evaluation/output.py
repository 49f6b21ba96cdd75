"""The output folder of `trl-laser eval`: what a run writes, the record of its arguments, and resuming it.

Samples are appended to `samples.jsonl` batch by batch, each on disk before the next is sampled; a second run with the
same arguments (`eval_run.json`) resumes after the last complete batch, while another run's folder is refused unless
overwritten, which removes only the files listed here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any


RUN_FILE = "eval_run.json"
# What a run writes into its output folder (and per benchmark, into NAME/): `--overwrite` removes only these.
_OUTPUT_FILES = ("samples.jsonl", "summary.json", "reliability.png", "scaling.png", "results.md", RUN_FILE)


def prepare_output(
    output_dir: str, run: dict, dirs: dict[str, str], totals: dict[str, int], overwrite: bool
) -> dict[str, int]:
    """Check the output folder against `run` and return, per benchmark, the samples already there to resume from.

    Same arguments: resume (incomplete last batches are dropped). Another run's samples: refused unless `overwrite`,
    which removes the files this module writes (and nothing else). Nothing is written before all checks passed.
    """
    _check_writable(output_dir)
    previous = read_json(os.path.join(output_dir, RUN_FILE))
    leftovers = [os.path.join(d, n) for d in {output_dir, *dirs.values()} for n in _OUTPUT_FILES]
    leftovers = [p for p in leftovers if os.path.exists(p)]
    if previous != run and (previous is not None or leftovers):
        if not overwrite:
            why = _changed(previous, run) if previous is not None else "it was written without a run record"
            raise ValueError(
                f"`output_dir` (--output-dir) {output_dir!r} holds the samples of another evaluation ({why}). Use "
                "another --output-dir, or pass --overwrite to replace them."
            )
        old_dirs = [os.path.join(output_dir, b["name"]) for b in (previous or {}).get("benchmarks", [])]
        for folder in {output_dir, *dirs.values(), *old_dirs}:
            for name in _OUTPUT_FILES:
                if os.path.isfile(os.path.join(folder, name)):
                    os.remove(os.path.join(folder, name))
    for folder in dirs.values():
        os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(output_dir, RUN_FILE), run)
    return {
        name: _keep_complete_batches(os.path.join(folder, "samples.jsonl"), run["batch_size"], totals[name])
        for name, folder in dirs.items()
    }


def _check_writable(output_dir: str) -> None:
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"`output_dir` (--output-dir) {output_dir!r} is a file, not a folder.")
    parent = output_dir
    while not os.path.exists(parent):
        parent = os.path.dirname(os.path.abspath(parent))
    if not os.access(parent, os.W_OK):
        raise ValueError(f"`output_dir` (--output-dir) {output_dir!r} cannot be written (no permission in {parent}).")


def _changed(previous: dict, run: dict) -> str:
    keys = [k for k in run if previous.get(k) != run[k]] + [k for k in previous if k not in run]
    key = keys[0]
    if key == "benchmarks":
        return f"argument `benchmarks` changed: {_benchmark_specs(previous.get(key))} -> {_benchmark_specs(run[key])}"
    return f"argument `{key}` changed: {previous.get(key)!r} -> {run.get(key)!r}"


def _benchmark_specs(benchmarks: Any) -> str:
    return ", ".join(f"{b['name']}={b['source']}:{b['num_samples']}" for b in benchmarks or [])


def _keep_complete_batches(path: str, batch_size: int, total: int) -> int:
    """Cut `samples.jsonl` after its last complete batch (a killed run can leave a half batch or half line)."""
    if not os.path.isfile(path):
        return 0
    lines = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                json.loads(line)
            except json.JSONDecodeError:
                break
            if not line.endswith("\n"):
                break
            lines.append(line)
    keep = total if len(lines) >= total else len(lines) - len(lines) % batch_size
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines[:keep])
    return keep


def append_batches(path: str, batches: Iterable[list[dict]]) -> None:
    """Append each batch of records to the JSON Lines file `path`, on disk before the next batch is asked for."""
    with open(path, "a", encoding="utf-8") as f:
        for rows in batches:
            f.write(_lines(rows))
            f.flush()
            os.fsync(f.fileno())


def read_records(path: str) -> list[dict]:
    """The records of a JSON Lines file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def replace_records(path: str, records: Iterable[dict]) -> None:
    """Rewrite the JSON Lines file `path` at once (a killed run leaves the old or the new file, never half of one)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(_lines(records))
    os.replace(tmp, path)


def _lines(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_json(path: str, data: Any) -> None:
    """`data` as indented JSON, with a final newline."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def read_json(path: str) -> Any:
    """The JSON in `path`, or None when there is none (or it cannot be read)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
