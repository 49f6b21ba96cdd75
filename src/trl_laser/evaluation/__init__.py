"""Test-time evaluation of a LaSeR model: sample N solutions per problem, grade them, score them, vote, report.

`run_evaluation` is what `trl-laser eval` runs. Every number comes from one set of samples: the votes over 1..N
samples (inference-time scaling) are recomputed on random subsets of them, never regenerated. Each metric is also
reported on the "answer extracted" subset (the paper's "filtered" variant: samples whose answer could be read).
Beside the LaSeR score stand the free confidence signals every sample has without training (`BASELINES`: mean and
minimum token log-prob, agreement with the other samples), ranked on the same samples: a LaSeR score that does not
beat them is not worth its training.

The modules: `protocol` (benchmarks, the paper's protocol and grading), `prompts` (the prompt as trained),
`sampling` (the one sampler, batch by batch and resumable), `summary` (metrics of the graded samples), `report`
(tables and plots), `output` (the output folder and resume) and `runner` (the run).
"""

from .output import RUN_FILE
from .prompts import Prompt, resolve_prompt, saved_settings
from .protocol import (
    BENCHMARK_SYNTAX,
    DEFAULT_SAMPLING,
    PAPER_NUM_SAMPLES,
    PAPER_SAMPLING,
    PROTOCOLS,
    Benchmark,
    grade,
    grade_paper,
    load_benchmark,
    paper_benchmark_key,
    paper_conventions,
    parse_benchmark,
)
from .report import format_table, plot_reliability, plot_scaling, results_markdown, signal_table, verdict
from .runner import run_evaluation
from .sampling import Sampling, SelfRewardOverrides, graded_record, sample_batches
from .summary import (
    BASELINES,
    SUMMARY_KEYS,
    TABLE_METRICS,
    VOTE_KEYS,
    add_answer_agreement,
    auroc_null_std,
    band_names,
    paper_table,
    ranking,
    scaling_curves,
    summarize,
    summarize_subset,
)


__all__ = [
    "BASELINES",
    "BENCHMARK_SYNTAX",
    "DEFAULT_SAMPLING",
    "PAPER_NUM_SAMPLES",
    "PAPER_SAMPLING",
    "PROTOCOLS",
    "RUN_FILE",
    "SUMMARY_KEYS",
    "TABLE_METRICS",
    "VOTE_KEYS",
    "Benchmark",
    "Prompt",
    "Sampling",
    "SelfRewardOverrides",
    "add_answer_agreement",
    "auroc_null_std",
    "band_names",
    "format_table",
    "grade",
    "grade_paper",
    "graded_record",
    "load_benchmark",
    "paper_benchmark_key",
    "paper_conventions",
    "paper_table",
    "parse_benchmark",
    "plot_reliability",
    "plot_scaling",
    "ranking",
    "resolve_prompt",
    "results_markdown",
    "run_evaluation",
    "sample_batches",
    "saved_settings",
    "scaling_curves",
    "signal_table",
    "summarize",
    "summarize_subset",
    "verdict",
]
