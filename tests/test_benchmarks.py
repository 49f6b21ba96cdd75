"""The pure parts of the benchmark scripts (no model, no training): the miniature's per-band AUROC, second verifier
rules, results table and seeds comparison; the overhead benchmark's aggregation, ratios and identical-batch check."""

from __future__ import annotations

import pytest
from conftest import load_benchmark as load


miniature = load("miniature")
overhead = load("bench_overhead")
seeds = load("miniature_seeds")


def record(problem_index: int, score: float | None, correct: bool, completion: str = "", gold: str = "0") -> dict:
    return {
        "problem_index": problem_index,
        "self_reward": score,
        "correct": correct,
        "completion": completion,
        "gold": gold,
    }


def test_band_metrics_by_hand():
    bands = ["hard", "easy", "easy"]  # problem 0 is hard, 1 and 2 are easy
    records = [
        record(1, 0.9, True),
        record(1, 0.2, False),
        record(2, 0.4, True),
        record(2, 0.5, False),
        record(2, None, False),  # unfinished: no score, still a sample
        record(0, 0.1, False),
        record(0, 0.3, False),
    ]
    out = miniature.band_metrics(records, bands)
    assert list(out) == ["easy", "hard"]  # the generator's order, not the data's
    # easy: correct scores {0.9, 0.4}, incorrect {0.2, 0.5}: pairs won 0.9>0.2, 0.9>0.5, 0.4>0.2, lost 0.4<0.5 -> 3/4.
    assert out["easy"]["auroc"] == pytest.approx(0.75)
    assert (out["easy"]["n_samples"], out["easy"]["n_scored"], out["easy"]["n_correct"]) == (5, 4, 2)
    assert out["easy"]["accuracy"] == pytest.approx(0.4)
    assert out["hard"]["auroc"] is None and out["hard"]["accuracy"] == 0.0  # one class only


def test_second_verifier_rules():
    assert miniature.first_number_correct("12. Because 7 plus 5 is 12.", "12")
    assert not miniature.first_number_correct("7 plus 5 is 12.", "12")  # the restated operand comes first
    assert not miniature.first_number_correct("I don't know.", "12")
    assert miniature.math_verify_default_correct("The answer is $12$.", "12")
    assert not miniature.math_verify_default_correct("The answer is $13$.", "12")


def test_verifier_agreement_counts_both_directions():
    records = [
        record(0, 0.5, True, "12", "12"),  # all rules agree
        record(0, 0.5, True, "7 plus 5 is 12", "12"),  # first-number rule says wrong
        record(0, 0.5, False, "12, or maybe 13", "12"),  # verifier (last number) says wrong, first number right
    ]
    out = miniature.verifier_agreement(records)
    first = out["first_number"]
    assert first["disagreement_rate"] == pytest.approx(2 / 3)
    assert (first["verifier_only_correct"], first["rule_only_correct"]) == (1, 1)


def test_results_table_puts_each_arm_beside_its_free_baselines():
    entry = {
        k: 0.5 for k in ("accuracy", "sv_f1_paper", "auroc", "ece", "majority_at_n", "weighted_at_n", "best_of_n")
    }
    baselines = {
        "mean_token_logprob": {"auroc": 0.71, "weighted_at_n": 0.42},
        "min_token_logprob": {"auroc": 0.62},
        "answer_agreement": {"auroc": None},
    }
    arms = {
        arm: dict(entry, auroc_by_band={"easy": 0.6, "hard": None}, auroc_within_problem=0.55, baselines=baselines)
        for arm in ("initial", "grpo", "laser")
    }
    table = miniature.format_table({"arms": arms}).splitlines()
    assert "| auroc easy | auroc hard | auroc within problem | baseline auroc: mean_token_logprob |" in table[0]
    assert [line.split(" | ")[0] for line in table[2:]] == ["| initial", "| grpo", "| laser"]
    assert table[-1].endswith("| 0.600 | n/a | 0.550 | 0.710 | 0.620 | n/a | 0.420 |")


def test_ablation_table_sets_each_vote_beside_the_free_signal():
    free = {"auroc_within_problem": 0.7, "weighted_at_n": 0.61, "best_of_n": 0.6}
    entry = {
        "accuracy": 0.5,
        "auroc": 0.8,
        "auroc_within_problem": 0.36,
        "majority_at_n": 0.62,
        "weighted_at_n": 0.6,
        "best_of_n": 0.49,
        "sv_f1_paper": 0.7,
        "auroc_by_band": {"easy": 0.66, "medium": None},
        "baselines": {"mean_token_logprob": free},
    }
    table = miniature.ablation_table({"arms": {"laser": entry}}).splitlines()
    assert table[0].startswith("| arm | accuracy | AUROC | within problem | within (mean lp) | majority@N |")
    assert table[2] == (
        "| laser | 0.500 | 0.800 | 0.360 | 0.700 | 0.620 | 0.600 | 0.610 | 0.490 | 0.600 | 0.700 | 0.660 | n/a |"
    )


def test_goals_of_the_ranking_arm():
    free = {
        "mean_token_logprob": {"auroc": 0.80, "auroc_within_problem": 0.70},
        "min_token_logprob": {"auroc": 0.83, "auroc_within_problem": 0.68},
        "answer_agreement": {"auroc": None, "auroc_within_problem": None},
    }
    laser = {
        "auroc": 0.86,  # >= 0.85, and >= the best free signal (0.83) + 0.03
        "auroc_within_problem": 0.76,  # >= 0.75 and >= 0.70 + 0.03
        "weighted_at_n": 0.61,
        "majority_at_n": 0.60,  # weighted is only 1 point above majority: missed
        "best_of_n": 0.60,  # ties majority: met
        "sv_f1_paper": 0.719,
        "auroc_by_band": {"easy": 0.75, "medium": 0.74, "hard": None},
        "accuracy": 0.50,
        "baselines": free,
    }
    goals = miniature.goals(laser, {"accuracy": 0.52})
    assert goals == {
        "auroc_within_problem_ge_0.75": True,
        "auroc_within_problem_ge_mean_token_logprob_plus_0.03": True,
        "weighted_ge_majority_plus_0.02": False,
        "best_of_n_ge_majority": True,
        "auroc_ge_0.85": True,
        "auroc_ge_every_free_signal_plus_0.03": True,
        "f1_paper_ge_0.72": False,
        "auroc_easy_ge_0.75": True,
        "auroc_medium_ge_0.75": False,
        "accuracy_ge_grpo_minus_0.02": True,
    }
    assert not miniature.goals(dict(laser, auroc=0.859), {"accuracy": 0.52})["auroc_ge_every_free_signal_plus_0.03"]


def _run(seconds: list[float], rss_kib: int, batches: list | None = None, num_iterations: int = 1) -> dict:
    return {
        "num_iterations": num_iterations,
        "step_seconds": seconds,
        "seconds": seconds,
        "batches": batches if batches is not None else [[12, "aa"], [16, "bb"]],
        "logp_forwards_per_generation_batch": 1.0,
        "phases": [],
        "peak_rss_before_train_kib": 1024,
        "peak_rss_kib": rss_kib,
    }


def test_summarize_quartiles_and_a_single_value():
    s = overhead.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["n"], s["median"], s["min"], s["max"]) == (5, 3.0, 1.0, 5.0)
    assert (s["p25"], s["p75"], s["iqr"]) == (2.0, 4.0, 2.0)
    one = overhead.summarize([2.5])
    assert (one["median"], one["p25"], one["p75"], one["iqr"]) == (2.5, 2.5, 2.5, 0.0)


def test_rounds_are_pooled_ratios_are_of_medians_and_rss_is_the_max():
    runs = {
        "grpo": [_run([1.0, 3.0], 2048 * 1024), _run([2.0], 2000 * 1024)],
        "laser": [_run([1.1, 2.0], 2060 * 1024), _run([3.0], 2070 * 1024)],
    }
    summary = overhead.aggregate(runs)
    assert summary["grpo"]["seconds"] == [1.0, 3.0, 2.0]
    assert summary["laser"]["median"] == 2.0
    assert summary["grpo"]["peak_rss_mib"] == 2048
    assert summary["grpo"]["peak_rss_mib_rounds"] == [2048, 2000]
    assert summary["laser"]["completion_tokens"] == [[12, 16], [12, 16]]
    time_ratios = overhead.ratios(summary, overhead.TIME_RATIOS, "median")
    assert time_ratios == {"step_time_ratio": pytest.approx(1.0)}  # configurations not run give no ratio
    memory = overhead.ratios(summary, overhead.MEMORY_RATIOS, "peak_rss_mib")
    assert memory == {"peak_memory_ratio": pytest.approx(2070 / 2048)}


def test_identical_batches_compares_paired_configurations_over_all_rounds():
    same = [[12, "aa"], [16, "bb"]]
    runs = {
        "grpo": [_run([1.0], 1, same), _run([1.0], 1, same)],
        "laser": [_run([1.0], 1, same), _run([1.0], 1, same)],
        "grpo_old_logps": [_run([1.0], 1, same, 2)],
        "laser_mixing_old_logps": [_run([1.0], 1, [[12, "aa"], [16, "cc"]], 2)],
    }
    assert overhead.identical_batches(runs) == {
        "laser_vs_grpo": True,
        "laser_mixing_old_logps_vs_grpo_old_logps": False,
    }
    runs["grpo"][1] = _run([1.0], 1, [[12, "aa"], [17, "bb"]])  # a round that differs from the others
    assert overhead.identical_batches(runs)["laser_vs_grpo"] is False


def test_a_fitted_arm_trains_its_base_once_then_fits_its_row():
    args = miniature.make_parser().parse_args(
        ["--arms", "laser,laser_fit,laser_row_only_no_mix_fit", "--skip-initial"]
    )
    trained = miniature.train_commands(args, "/out", -16.5)
    assert list(trained) == ["train_laser", "train_laser_row_only_no_mix"]
    fits = miniature.fit_commands(args, "/out")
    assert list(fits) == ["fit_laser_fit", "fit_laser_row_only_no_mix_fit"]
    command = fits["fit_laser_fit"]
    assert command[command.index("fit-row") + 1 : command.index("fit-row") + 3] == ["--model", "/out/laser"]
    assert (
        command[-2:] == ["--output-dir", "/out/laser_fit"] and "--max-problems" in command and "--overwrite" in command
    )
    assert command[command.index("--save-states") + 1] == "/out/laser_fit_states.pt"
    evaluated = miniature.eval_commands(args, "/out", -16.5)
    assert evaluated["eval_laser_fit"][evaluated["eval_laser_fit"].index("--model") + 1] == "/out/laser_fit"


def test_fits_run_beside_the_evals_that_do_not_wait_for_them():
    args = miniature.make_parser().parse_args(["--arms", "grpo,laser_row_only_no_mix_fit"])
    assert [list(stage) for stage in miniature.stages(args, "/out", -16.5)] == [
        ["train_grpo", "train_laser_row_only_no_mix"],
        ["fit_laser_row_only_no_mix_fit", "eval_initial", "eval_grpo"],
        ["eval_laser_row_only_no_mix_fit"],
    ]
    skip_train = miniature.make_parser().parse_args(["--arms", "grpo,laser_fit", "--skip-initial", "--skip-train"])
    assert [list(stage) for stage in miniature.stages(skip_train, "/out", -16.5)] == [["eval_grpo", "eval_laser_fit"]]
    summary_only = miniature.make_parser().parse_args(["--skip-train", "--skip-eval"])
    assert miniature.stages(summary_only, "/out", -16.5) == []


def test_a_training_seed_reaches_every_trained_arm_and_nothing_else():
    args = miniature.make_parser().parse_args(["--arms", "grpo,laser_row_only_no_mix_fit", "--train-seed", "7"])
    for command in miniature.train_commands(args, "/out", -16.5).values():
        assert command[command.index("--seed") + 1] == "7"
    for command in [
        *miniature.fit_commands(args, "/out").values(),
        *miniature.eval_commands(args, "/out", -16.5).values(),
    ]:
        assert command[command.index("--seed") + 1] == "0"  # evaluation sampling and the fit keep --seed
    default = miniature.make_parser().parse_args(["--arms", "grpo"])
    assert "--seed" not in miniature.train_commands(default, "/out", -16.5)["train_grpo"]  # the recipe's own seed


def test_the_splits_reach_the_fit_and_the_evals():
    args = miniature.make_parser().parse_args(
        ["--arms", "grpo,laser_fit", "--fit-split", "train_distinct", "--eval-split", "test_distinct"]
    )
    (fit,) = miniature.fit_commands(args, "/out").values()
    assert fit[fit.index("--split") + 1] == "train_distinct"
    evaluated = miniature.eval_commands(args, "/out", -16.5)
    assert list(evaluated) == ["eval_initial", "eval_grpo", "eval_laser_fit"]
    assert {command[command.index("--split") + 1] for command in evaluated.values()} == {"test_distinct"}
    default = miniature.make_parser().parse_args(["--arms", "laser_fit"])
    assert (default.fit_split, default.eval_split) == ("train", "test")  # the splits of the recorded runs


def _arm(accuracy: float, within: float, seed: int | None) -> dict:
    train = {"recipe": "recipes/SmolLM2-135M-Instruct/grpo/config_arithmetic.yaml", "seed": seed}
    free = {"mean_token_logprob": {"auroc_within_problem": 0.6}}
    figures = {"majority_at_n": 0.5, "weighted_at_n": 0.52, "best_of_n": 0.51, "auroc": 0.9}
    return {"accuracy": accuracy, "auroc_within_problem": within, "baselines": free, "train": train, **figures}


def test_seeds_are_compared_per_seed_and_on_the_mean():
    # seed 42 from the recipe (a run without --train-seed), seed 1 recorded; LaSeR -3.5 and +0.5 points: mean -1.5
    first = {"arms": {"grpo": _arm(0.517, 0.53, None), "laser": _arm(0.482, 0.84, None), "other": _arm(0.9, 0.9, 0)}}
    second = {"arms": {"grpo": _arm(0.50, 0.55, 1), "laser": _arm(0.505, 0.80, 1)}}
    rows = seeds.seed_rows([first, second], ["grpo", "laser"])
    assert [(r["arm"], r["seed"]) for r in rows] == [("grpo", 42), ("laser", 42), ("grpo", 1), ("laser", 1)]
    assert rows[1]["within_mean_token_logprob"] == 0.6
    means = {m["arm"]: m for m in seeds.mean_rows(rows, ["grpo", "laser"])}
    assert means["laser"]["accuracy"] == pytest.approx((0.482 + 0.505) / 2) and means["laser"]["n_seeds"] == 2
    assert means["laser"]["auroc_within_problem"] == pytest.approx(0.82)
    goal = seeds.accuracy_goal(rows, "laser", "grpo")
    assert goal["seeds"] == [1, 42]
    assert goal["difference_by_seed"][42] == pytest.approx(-0.035) and goal["difference_by_seed"][1] == pytest.approx(
        0.005
    )
    assert goal["mean_difference"] == pytest.approx(-0.015) and goal["met"]
    worse = seeds.seed_rows(
        [first, {"arms": {"grpo": _arm(0.50, 0.5, 1), "laser": _arm(0.49, 0.8, 1)}}], ["grpo", "laser"]
    )
    assert not seeds.accuracy_goal(worse, "laser", "grpo")["met"]  # -3.5 and -1 points: mean -2.25
    table = seeds.format_table(rows).splitlines()
    assert table[2].startswith("| `grpo` | 42 | 0.517 | 0.530 | 0.600 |")


selection = load("row_fit_selection")


FIXED_CELL = {"ridge": 0.1, "between_weight": 0.5, "auroc": 0.0, "auroc_within_problem": 0.0}


def fitting_states(seed: int, n_groups: int, per_group: int, dim: int, stride: int) -> dict:
    """Synthetic `fit-row --save-states` content: states shifted by the label, log pi(z_c) shifted by the group."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    groups = torch.arange(n_groups).repeat_interleave(per_group)
    labels = torch.tensor([float((i * stride + g) % 3 == 0) for i, g in enumerate(groups.tolist())])
    states = torch.randn(len(labels), dim, generator=generator, dtype=torch.float64) + labels[:, None]
    logps = torch.full((len(labels),), -20.0, dtype=torch.float64) + 0.1 * groups
    return {"states": states, "logps": logps, "labels": labels, "groups": groups, "beta": 0.1, "ref": -20.0}


def test_a_fixed_choice_nested_is_the_plain_cross_validation_of_that_cell():
    from trl_laser.row_fit import cross_validate_row_fit

    fitting, fixed = fitting_states(0, 15, 6, 4, 7), FIXED_CELL
    states, logps, labels, groups = (fitting[key] for key in ("states", "logps", "labels", "groups"))
    nested = selection.nested_selection(fitting, {"fixed": lambda table: fixed}, (0.1, 1.0), (1.0, 0.5), 3, 3)
    plain = cross_validate_row_fit(
        states, logps, labels.bool().tolist(), groups.tolist(), 0.1, -20.0, (0.1,), (0.5,), 3
    )
    assert nested["fixed"]["auroc"] == pytest.approx(plain[0]["auroc"])
    assert nested["fixed"]["auroc_within_problem"] == pytest.approx(plain[0]["auroc_within_problem"])
    assert nested["fixed"]["chosen"] == [{"ridge": 0.1, "between_weight": 0.5}] * 3


def test_a_fit_on_the_first_problems_scores_the_same_outer_folds_by_hand():
    import torch

    from trl_laser.evaluation.summary import ranking
    from trl_laser.readout import grouped_folds
    from trl_laser.row_fit import refitted_logps, row_fit_step

    fitting, fixed = fitting_states(1, 12, 5, 3, 5), FIXED_CELL
    states, logps, labels, groups = (fitting[key] for key in ("states", "logps", "labels", "groups"))
    mask = selection.first_problems(groups, 7)
    assert mask.tolist() == [True] * 35 + [False] * 25
    nested = selection.nested_selection(fitting, {"fixed": lambda t: fixed}, (0.1,), (0.5,), 3, 3, train_mask=mask)
    # By hand: the folds of all 12 problems, each scored by the row fitted on its other folds' problems 0-6 only.
    fold_of = torch.tensor(grouped_folds(groups.tolist(), 3, 0, labels.bool().tolist()))
    scores = torch.empty(len(labels), dtype=torch.float64)
    for k in range(3):
        train = (fold_of != k) & (groups < 7)
        step = row_fit_step(states[train], logps[train], labels[train], groups[train], 0.1, -20.0, 0.1, 0.5)
        scores[fold_of == k] = refitted_logps(states[fold_of == k], logps[fold_of == k], step)
    rank = ranking(scores.tolist(), labels.bool().tolist(), groups.tolist())
    assert nested["fixed"]["auroc"] == pytest.approx(rank["auroc"])
    assert nested["fixed"]["auroc_within_problem"] == pytest.approx(rank["auroc_within_problem"])
    everything = selection.nested_selection(fitting, {"fixed": lambda t: fixed}, (0.1,), (0.5,), 3, 3)
    assert everything["fixed"]["auroc"] != pytest.approx(rank["auroc"])


def test_a_grid_reaches_every_table_and_choice(tmp_path):
    import json

    import torch

    fitting = {**fitting_states(2, 12, 5, 3, 5), "other_gram": None, "folds": 3, "seed": 0}
    torch.save(fitting, tmp_path / "states.pt")
    out = tmp_path / "grid.json"
    args = ["--sizes", "--outer-folds", "3", "--ridges", "0.01", "2.0", "--between-weights", "0.3", "--output"]
    selection.main(selection.make_parser().parse_args([str(tmp_path / "states.pt"), *args, str(out)]))
    result = json.loads(out.read_text())
    assert result["grid"] == {"ridges": [0.01, 2.0], "between_weights": [0.3]}
    cells = {(row["ridge"], row["between_weight"]) for row in result["cross_validation"]["table"]}
    assert cells == {(0.01, 0.3), (2.0, 0.3)}
    for rule in result["nested"].values():
        assert all((c["ridge"], c["between_weight"]) in cells for c in rule["chosen"])


def test_a_subset_keeps_the_first_problems_samples():
    import torch

    groups = torch.tensor([5, 5, 2, 2, 9])
    fitting = {"states": torch.arange(10.0).reshape(5, 2), "logps": torch.zeros(5), "labels": torch.ones(5)}
    part = selection.subset({**fitting, "groups": groups, "beta": 0.1}, 2)
    assert part["groups"].tolist() == [5, 5, 2, 2] and part["states"][:, 0].tolist() == [0, 2, 4, 6]
    assert part["beta"] == 0.1


def test_band_rankings_and_the_bands_of_a_fit_by_hand():
    import torch

    from trl_laser.data import make_arithmetic_dataset

    # Problem 0 (easy): right .9, wrong .2 and .95 -> 1/2; problem 1 (easy): all right; problem 2 (medium): .3 < .4.
    scores, labels = [0.9, 0.2, 0.95, 0.5, 0.3, 0.4], [True, False, False, True, True, False]
    bands = ["easy", "easy", "easy", "easy", "medium", "medium"]
    out = selection.band_rankings(scores, labels, [0, 0, 0, 1, 2, 2], bands)
    assert out == {
        "easy": {"problems": 2, "problems_with_both_classes": 1, "auroc_within_problem": 0.5},
        "medium": {"problems": 1, "problems_with_both_classes": 1, "auroc_within_problem": 0.0},
    }
    # A fit's problem ids follow the first appearance of each text among the first N problems of its split.
    data = make_arithmetic_dataset("train").select(range(40))
    texts = list(dict.fromkeys(data["problem"]))
    groups = [texts.index(p) for p in data["problem"] for _ in range(2)]
    expected = [band for band in data["difficulty"] for _ in range(2)]
    assert selection.arithmetic_bands(groups, "train", 40) == expected
    with pytest.raises(ValueError, match="give the split and --max-problems the fit used"):
        selection.arithmetic_bands(groups, "train", 60)
    part = selection.subset({"groups": torch.tensor([3, 1]), "mean_token_logprobs": torch.tensor([-1.0, -2.0])}, 1)
    assert part["mean_token_logprobs"].tolist() == [-1.0]


def test_choice_rules_by_hand():
    table = [
        {"ridge": 0.001, "between_weight": 1.0, "auroc": 0.90, "auroc_within_problem": 0.80},  # mean 0.850: best
        {"ridge": 0.01, "between_weight": 1.0, "auroc": 0.90, "auroc_within_problem": 0.79},  # 0.845: within 0.01
        {"ridge": 0.1, "between_weight": 1.0, "auroc": 0.88, "auroc_within_problem": 0.78},  # 0.830: too far
        {"ridge": 0.001, "between_weight": 0.5, "auroc": 0.80, "auroc_within_problem": 0.84},  # best within
    ]
    assert selection.RULES["mean (fit-row's)"](table) is table[0]
    assert selection.larger_ridge(table) is table[1]
    assert selection.within_only(table) is table[3]


objectives = load("row_fit_objectives")


def test_within_pairs_and_the_pair_loss_by_hand():
    import math

    import torch

    labels = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 2])  # problem 1 all right, problem 2 all wrong: no pairs there
    right, wrong = objectives.within_pairs(labels, groups)
    assert sorted(zip(right.tolist(), wrong.tolist())) == [(0, 1), (0, 2)]
    logps = torch.tensor([-2.0, -3.0, -1.0, 0.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
    loss = objectives.pair_loss(logps, right, wrong)
    # softplus(-(x_0 - x_1)) = log(1 + e^{-1}), softplus(-(x_0 - x_2)) = log(1 + e^{1}), averaged
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 2)
    loss.backward()
    s1, s2 = 1 / (1 + math.exp(1)), 1 / (1 + math.exp(-1))  # sigmoid(x_j - x_i) per pair
    assert logps.grad.tolist() == pytest.approx([-(s1 + s2) / 2, s1 / 2, s2 / 2, 0, 0, 0])
    assert objectives.pair_loss(logps, right[:0], wrong[:0]).item() == 0.0


def test_pair_refinement_stays_at_the_start_when_held_and_ranks_when_free():
    import torch

    generator = torch.Generator().manual_seed(0)
    groups = torch.arange(20).repeat_interleave(4)
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0] * 20)
    states = torch.randn(80, 6, generator=generator, dtype=torch.float64)
    states[:, 0] += 3 * labels  # within each problem the right answers lie further along the first axis
    logps = torch.full((80,), -20.0, dtype=torch.float64)
    start = torch.zeros(6, dtype=torch.float64)
    held = objectives.pair_refined_step(states, logps, labels, groups, start, strength=1e6)
    assert held.abs().max() < 1e-4
    free = objectives.pair_refined_step(states, logps, labels, groups, start, strength=1e-3)
    assert free[0] > 1.0 and free[0] > 3 * free[1:].abs().max()
    assert ranking_within(refitted(states, logps, free), labels, groups) > 0.95


def test_centred_and_a_free_signal_the_states_carry_exactly():
    import torch

    groups = torch.tensor([0, 0, 1, 1, 1])
    values = torch.tensor([[1.0], [3.0], [2.0], [4.0], [9.0]], dtype=torch.float64)
    assert objectives.centred(values, groups).flatten().tolist() == pytest.approx([-1, 1, -3, -1, 4])
    generator = torch.Generator().manual_seed(1)
    groups = torch.arange(30).repeat_interleave(4)
    states = torch.randn(120, 5, generator=generator, dtype=torch.float64)
    free = states @ torch.tensor([1.0, -2.0, 0.0, 0.5, 0.0], dtype=torch.float64)
    labels = (free > free.median()).double()
    fitting = {"states": states, "labels": labels, "groups": groups, "mean_token_logprobs": free}
    rows = objectives.free_signal_readout(fitting, (1e-6,), folds=3)
    assert rows[0]["within_problem_correlation"] == pytest.approx(1.0, abs=1e-6)
    exact = ranking_within(free, labels, groups)
    assert rows[0]["auroc_within_problem"] == pytest.approx(exact, abs=1e-6)


def refitted(states, logps, step):
    from trl_laser.row_fit import refitted_logps

    return refitted_logps(states, logps, step)


def ranking_within(scores, labels, groups) -> float:
    from trl_laser.evaluation.summary import ranking

    return ranking(scores.tolist(), labels.bool().tolist(), groups.tolist())["auroc_within_problem"]
