"""What `LaSeRGRPOTrainer` logs about its score: the rows scored since the last log, turned into metrics beside the
free mean token log-prob, and the score column of TRL's completions table.

The trainer hands over plain tensors already gathered over processes; nothing here touches the model.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from .metrics import auroc, auroc_within_group, self_verification_metrics


# self_verification_metrics key -> logged name (`self_reward/<name>`)
_SV_NAMES = (
    ("sv_accuracy", "accuracy"),
    ("sv_f1_paper", "f1_paper"),
    ("sv_f1_binary", "f1"),
    ("auroc", "auroc"),
    ("ece", "ece"),
)
# Columns of the packed rows that `record` takes.
SCORE, TARGET, FINISHED, COEF, ROW, MEAN_LOGP = range(6)


class SelfRewardLog:
    """Per mode ("train", "eval"): a window of scored rows since the last log, and each row's score by row number.

    `group_size` gives, per mode, how many consecutive rows answer one prompt (TRL's `num_generations`): the
    within-problem AUROC compares only answers to the same prompt.
    """

    def __init__(self, group_size: dict[str, int]):
        self._group_size = group_size
        self._window = {mode: defaultdict(list) for mode in ("train", "eval")}
        self._rows = {"train": 0, "eval": 0}  # rows numbered so far (all processes)
        self._table: dict[str, dict[int, float]] = {"train": {}, "eval": {}}

    def generation_batch(self, mode: str, size: int) -> int:
        """Count a generation batch of `size` rows (all processes); returns the number of its first row."""
        first = self._rows[mode]
        self._rows[mode] = first + size
        self._window[mode]["generation_batches"].append(1.0)
        return first

    def verifier_missing(self, mode: str) -> None:
        self._window[mode]["verifier_missing"].append(1.0)

    def record(self, mode: str, mse: float, packed: torch.Tensor, keep_table: bool) -> None:
        """One micro-batch's summed class-weighted squared error and its rows (`packed`: columns SCORE .. MEAN_LOGP)."""
        window = self._window[mode]
        window["mse"].append(mse)
        keep = (packed[:, FINISHED] > 0) & (packed[:, COEF] != 0)
        window["score"].extend(packed[keep, SCORE].tolist())
        window["label"].extend(packed[keep, TARGET].tolist())
        window["mean_token_logprob"].extend(packed[keep, MEAN_LOGP].tolist())
        window["group"].extend((packed[keep, ROW].long() // self._group_size[mode]).tolist())
        if keep_table:
            rows = packed[packed[:, FINISHED] > 0]
            self._table[mode].update(zip(rows[:, ROW].long().tolist(), rows[:, SCORE].tolist()))

    def metrics(self, mode: str) -> dict[str, float]:
        """The `self_reward/*` metrics of the window, which is then emptied."""
        window = self._window[mode]
        metrics: dict[str, float] = {}
        if window["generation_batches"] and window["mse"]:
            metrics["self_reward/mse"] = sum(window["mse"]) / len(window["generation_batches"])
        if window["generation_batches"]:  # generation batches since the last log with no verifier value at all
            metrics["self_reward/verifier_missing"] = float(len(window["verifier_missing"]))
        if window["score"]:
            scores, labels = window["score"], [int(v > 0.5) for v in window["label"]]
            sv = self_verification_metrics(scores, labels)
            metrics.update({f"self_reward/{name}": sv[key] for key, name in _SV_NAMES if sv[key] is not None})
            mean_logp = window["mean_token_logprob"]
            ranked = {
                "auroc_mean_token_logprob": auroc(mean_logp, labels),
                # only pairs of answers to the same prompt: what choosing among one problem's answers needs
                "auroc_within_problem": auroc_within_group(scores, labels, window["group"]),
                "auroc_within_problem_mean_token_logprob": auroc_within_group(mean_logp, labels, window["group"]),
            }
            metrics.update({f"self_reward/{name}": value for name, value in ranked.items() if value is not None})
            for label, name in ((1, "score_correct"), (0, "score_incorrect")):
                values = [s for s, y in zip(scores, labels) if y == label]
                if values:
                    metrics[f"self_reward/{name}"] = sum(values) / len(values)
        window.clear()
        return metrics

    def table_column(self, mode: str, shown: int) -> list[float | None]:
        """The scores of the last `shown` rows (None for truncated ones); older rows are forgotten."""
        total, table = self._rows[mode], self._table[mode]
        self._table[mode] = {k: v for k, v in table.items() if k >= total - shown}
        return [table.get(row) for row in range(total - shown, total)]
