"""`trl-laser probe`: grouped folds, the cross-validated read-out against analytic AUROCs, the AUROC table, the CLI."""

from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch
from conftest import EOS, SELF_REWARD_TOKEN, ZC, answering_model
from transformers import AutoTokenizer

from trl_laser.cli import main as cli_main
from trl_laser.data import make_conversation
from trl_laser.metrics import auroc
from trl_laser.probe import SIGNALS, auroc_table
from trl_laser.readout import DEFAULT_C_VALUES, fit_logistic, grouped_folds, readout_probabilities
from trl_laser.ref_constant import c_ref_statistics
from trl_laser.settings import PromptSettings, SelfRewardSettings


def phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def gaussian_set(n_groups: int, per_group: int, mean: tuple[float, float], seed: int):
    """2-D data: correct ~ N(+mean, I), incorrect ~ N(-mean, I) (mean 0: labels independent of the features)."""
    generator = torch.Generator().manual_seed(seed)
    n = n_groups * per_group
    labels = (torch.rand(n, generator=generator) < 0.5).tolist()
    sign = torch.tensor([1.0 if y else -1.0 for y in labels], dtype=torch.float64)
    features = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    features += sign[:, None] * torch.tensor(mean, dtype=torch.float64)
    groups = [f"problem {i // per_group}" for i in range(n)]
    return features, labels, groups


# ------------------------------------------------------------------------------------------ folds
def test_grouped_folds_keep_each_problem_in_one_fold_and_are_seeded():
    rng = random.Random(0)
    groups = [rng.randrange(23) for _ in range(300)]  # unequal group sizes, interleaved
    labels = [rng.random() < 0.3 for _ in groups]
    for stratify in (None, labels):
        folds = grouped_folds(groups, 5, seed=3, labels=stratify)
        assert len(folds) == len(groups)
        fold_of = {}
        for g, f in zip(groups, folds):
            assert fold_of.setdefault(g, f) == f  # no problem split across folds
        # Dealt in blocks of 5: every fold gets 23 // 5 or 23 // 5 + 1 problems.
        assert sorted(sum(f == k for f in fold_of.values()) for k in range(5)) == [4, 4, 5, 5, 5]
        assert grouped_folds(groups, 5, seed=3, labels=stratify) == folds
        assert grouped_folds(groups, 5, seed=4, labels=stratify) != folds
    with pytest.raises(ValueError, match="at least 2 folds"):
        grouped_folds(groups, 1)
    with pytest.raises(ValueError, match="3 problems cannot fill 5 folds"):
        grouped_folds(["a", "b", "c", "a"], 5)


def test_stratified_folds_balance_the_correct_samples():
    # 10 problems always right, 10 always wrong, 3 samples each; 2 folds. Stratified: each fold has 5 of each kind
    # (the 10 right ones sort together and are dealt in blocks of 2, one to each fold).
    groups = [p for p in range(20) for _ in range(3)]
    labels = [p % 2 == 0 for p in groups]
    for seed in range(10):
        folds = grouped_folds(groups, 2, seed=seed, labels=labels)
        assert sum(y for y, f in zip(labels, folds) if f == 0) == 15
        assert sum(f == 0 for f in folds) == 30
    # Without labels, some seed gives the folds different class balances.
    unbalanced = [sum(y for y, f in zip(labels, grouped_folds(groups, 2, seed=s)) if f == 0) for s in range(10)]
    assert any(count != 15 for count in unbalanced)


# ------------------------------------------------------------------------------------------ the read-out
def test_fit_logistic_reaches_the_optimum_of_its_objective():
    # At the minimum of mean(v * log-loss) + ||w||^2 / (2 C n) the gradient vanishes: Z^T (v (p - y)) / n + w / (C n)
    # = 0 and sum(v (p - y)) = 0 (the bias is not penalised), with v the class weights n / (2 N_c), n / (2 N_i) (or
    # 1). Checked from the returned parameters, independently of the fit; unequal classes (about 1 in 4 correct).
    features, labels, _ = gaussian_set(60, 5, (0.4, -0.2), seed=1)
    labels = [y and i % 3 == 0 for i, y in enumerate(labels)]
    features = torch.cat([features, 0.01 * features[:, :1] + 3.0], dim=1) * torch.tensor([1.0, 10.0, 0.5])
    y = torch.tensor([float(v) for v in labels], dtype=torch.float64)
    n, n_c = len(y), float(y.sum())
    z = (features - features.mean(0)) / features.std(0, unbiased=False)
    balanced_v = torch.where(y > 0, n / (2 * n_c), n / (2 * (n - n_c))).double()
    for balanced, v in ((True, balanced_v), (False, torch.ones(n, dtype=torch.float64))):
        for c in (0.01, 1.0):
            readout = fit_logistic(features, labels, c, balanced=balanced)
            p = torch.sigmoid(z @ readout.weight + readout.bias)
            assert torch.allclose(readout.probabilities(features), p)
            gradient = z.T @ (v * (p - y)) / n + readout.weight / (c * n)
            assert torch.allclose(gradient, torch.zeros(3, dtype=torch.float64), atol=1e-6)
            assert abs(float((v * (p - y)).sum())) / n < 1e-6
        # Unweighted, the mean probability is the base rate (the bias's condition).
        if not balanced:
            assert float(p.mean()) == pytest.approx(n_c / n, abs=1e-6)
    # Stronger regularisation, smaller weights.
    assert fit_logistic(features, labels, 0.001).weight.norm() < fit_logistic(features, labels, 1.0).weight.norm()
    with pytest.raises(ValueError, match="both classes"):
        fit_logistic(features[:3], [True, True, True], 1.0)


@pytest.mark.parametrize(("mean", "expected"), [((0.5, 0.5), phi(1.0)), ((0.0, 0.35), phi(0.35 * math.sqrt(2)))])
def test_readout_auroc_matches_the_analytic_one(mean, expected):
    # Classes N(+m, I) and N(-m, I): the Bayes-optimal score is x . m, whose AUROC is Phi(|2 m| / sqrt(2)).
    features, labels, groups = gaussian_set(400, 5, mean, seed=0)
    probs, chosen = readout_probabilities(features, labels, groups, num_folds=5, seed=0)
    assert len(chosen) == 5 and set(chosen) <= set(DEFAULT_C_VALUES)
    got = auroc(probs, labels)
    assert got == pytest.approx(expected, abs=0.03)
    # Out-of-fold, it cannot beat the Bayes-optimal direction measured on the same sample by more than noise.
    oracle = auroc((features @ torch.tensor(mean, dtype=torch.float64)).tolist(), labels)
    assert got <= oracle + 0.005
    assert all(0.0 < p < 1.0 for p in probs)


def test_readout_on_separable_and_on_unrelated_data():
    features, labels, groups = gaussian_set(100, 4, (0.0, 0.0), seed=2)
    labels = [bool(x > 0) for x in features[:, 0].tolist()]
    features[:, 0] += torch.tensor([1.0 if y else -1.0 for y in labels], dtype=torch.float64)  # a margin of 2
    probs, _ = readout_probabilities(features, labels, groups)
    assert auroc(probs, labels) == 1.0
    # Labels independent of the features: chance, within 3 null stds (sqrt((n + 1) / (12 n_c n_i)) ~ 0.013).
    features, labels, groups = gaussian_set(400, 5, (0.0, 0.0), seed=3)
    probs, _ = readout_probabilities(features, labels, groups)
    assert auroc(probs, labels) == pytest.approx(0.5, abs=0.04)


def test_readout_is_deterministic_and_checks_its_input():
    features, labels, groups = gaussian_set(30, 4, (0.5, 0.0), seed=4)
    assert readout_probabilities(features, labels, groups, seed=1) == readout_probabilities(
        features, labels, groups, seed=1
    )
    with pytest.raises(ValueError, match="labels"):
        readout_probabilities(features, labels[:-1], groups)
    with pytest.raises(ValueError, match="> 0"):
        readout_probabilities(features, labels, groups, c_values=(0.0,))


# ------------------------------------------------------------------------------------------ the AUROC table
def test_auroc_table_against_brute_force():
    rng = random.Random(5)
    n = 60
    labels = [rng.random() < 0.4 for _ in range(n)]
    problems = [i // 4 for i in range(n)]
    bands = [["easy", "medium", "hard"][p % 3] for p in problems]
    signals = {
        "noisy": [y + rng.gauss(0, 1) for y in labels],
        "ties": [float(rng.randrange(3)) for _ in labels],
        "with_none": [None if i % 7 == 0 else rng.random() + y for i, y in enumerate(labels)],
    }
    table = auroc_table(signals, labels, problems, bands)

    def brute(values, keep):
        right = pairs = 0
        for i in range(n):
            for j in range(n):
                if keep(i, j) and labels[i] and not labels[j] and values[i] is not None and values[j] is not None:
                    pairs += 1
                    right += 1.0 if values[i] > values[j] else 0.5 if values[i] == values[j] else 0.0
        return right / pairs if pairs else None

    for name, values in signals.items():
        row = table[name]
        assert row["auroc"] == pytest.approx(auroc(values, labels))
        assert row["auroc"] == pytest.approx(brute(values, lambda i, j: True))
        assert row["auroc_within_problem"] == pytest.approx(brute(values, lambda i, j: problems[i] == problems[j]))
        assert list(row["auroc_by_band"]) == ["easy", "medium", "hard"]
        for band, value in row["auroc_by_band"].items():
            assert value == pytest.approx(brute(values, lambda i, j, b=band: bands[i] == bands[j] == b))
    assert auroc_table({"x": [0.1, 0.2]}, [True, False], [0, 0])["x"]["auroc_by_band"] is None


def test_c_ref_statistics():
    stats = c_ref_statistics([-16.0, -15.0, -14.0])
    assert stats == {"n_finished": 3, "mean": -15.0, "std": 1.0, "min": -16.0, "max": -14.0}
    assert c_ref_statistics([-3.0])["std"] == 0.0


# ------------------------------------------------------------------------------------------ the command
@pytest.fixture(scope="module")
def answering_dir(tokenizer, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("probe") / "model")
    answering_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_on_the_tiny_model(answering_dir, tmp_path, capsys):
    # builtin:arithmetic's first 6 test problems (easy, medium and hard; problem 5's answer is 4, which this model
    # writes): both classes occur among the finished samples.
    out = str(tmp_path / "probe")
    argv = ["probe", "--model", answering_dir, "--dataset", "builtin:arithmetic", "--max-problems", "6"]
    argv += ["--num-samples", "4", "--max-new-tokens", "6", "--folds", "3", "--self-reward-token", SELF_REWARD_TOKEN]
    assert cli_main([*argv, "--output-dir", out, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    with open(os.path.join(out, "probe.json"), encoding="utf-8") as f:
        result = json.load(f)
    assert printed == result
    assert set(result) >= {"model", "dataset", "counts", "c_ref", "bands", "signals", "readout", "config", "seconds"}
    assert set(result["signals"]) == set(SIGNALS)
    counts = result["counts"]
    assert (counts["n_problems"], counts["n_samples"]) == (6, 24)
    assert 0 < counts["n_correct_finished"] < counts["n_finished"] <= 24
    assert result["bands"] == ["easy", "medium", "hard"]
    for row in result["signals"].values():
        assert set(row) == {"auroc", "auroc_within_problem", "auroc_by_band"}
        assert row["auroc"] is not None and list(row["auroc_by_band"]) == ["easy", "medium", "hard"]
    ref = result["c_ref"]
    assert ref["min"] <= ref["mean"] <= ref["max"] < 0 and ref["n_finished"] == counts["n_finished"]
    assert (ref["used"], ref["source"]) == (ref["mean"], "measured mean")
    assert len(result["readout"]["c_per_fold"]) == 3 and "sv_f1_paper" in result["readout"]

    with open(os.path.join(out, "samples.jsonl"), encoding="utf-8") as f:
        samples = [json.loads(line) for line in f]
    assert len(samples) == 24
    for s in samples:
        assert "token_ids" not in s and s["difficulty"] in ("easy", "medium", "hard")
        assert (s["eos_readout"] is None) == (not s["finished"]) == (s["self_reward"] is None)
        if s["finished"]:  # r_s = 0.1 (log pi(z_c) - measured mean)
            assert s["self_reward"] == pytest.approx(0.1 * (s["self_reward_logprob"] - ref["mean"]), abs=1e-9)
    finished = [s for s in samples if s["finished"]]
    labels = [s["correct"] for s in finished]
    for name in SIGNALS:
        assert result["signals"][name]["auroc"] == pytest.approx(auroc([s[name] for s in finished], labels))

    # The table: one row per signal, a column per band.
    assert cli_main([*argv, "--output-dir", str(tmp_path / "table")]) == 0
    table = capsys.readouterr().out
    assert all(label in table for label in SIGNALS.values())
    assert "auroc easy" in table and "within problem" in table and "Wrote probe.json" in table


@pytest.fixture(scope="module")
def prompted_dir(tiny_model_dir, tokenizer, tmp_path_factory) -> str:
    """A model saved as training saves it: prompt settings, and chat-template arguments its template reads."""
    path = str(tmp_path_factory.mktemp("probe") / "prompted")
    answering_model(tokenizer).save_pretrained(path)
    templated = AutoTokenizer.from_pretrained(tiny_model_dir)
    templated.chat_template = "{% if hint %}{{ hint }}{% endif %}" + templated.chat_template
    templated.save_pretrained(path)
    prompt = PromptSettings("Be brief.", "Say it.", " | ", "builtin:arithmetic", 0)
    settings = SelfRewardSettings(SELF_REWARD_TOKEN, ZC, 0.1, -16.0, eos_token_ids=[EOS], prompt=prompt)
    settings.chat_template_kwargs = {"hint": "Think first.\n"}
    settings.save_pretrained(path)
    return path


def test_cli_prompts_as_the_model_was_trained(prompted_dir, tmp_path, capsys):
    # The saved chat-template argument changes the prompt's tokens: a forward without it would read other EOS states
    # than the sampled ones (the probe checks that they agree), and the saved instruction replaces the dataset's.
    templated = AutoTokenizer.from_pretrained(prompted_dir)
    conversation = make_conversation("What is 1 plus 2?", "Be brief.", "Say it.", " | ")
    assert templated.apply_chat_template(conversation, tokenize=False) != templated.apply_chat_template(
        conversation, tokenize=False, hint="Think first.\n"
    )
    out = str(tmp_path / "probe")
    argv = ["probe", "--model", prompted_dir, "--dataset", "builtin:arithmetic", "--max-problems", "6"]
    assert cli_main([*argv, "--num-samples", "4", "--max-new-tokens", "6", "--folds", "3", "--output-dir", out]) == 0
    assert "Wrote probe.json" in capsys.readouterr().out
    with open(os.path.join(out, "probe.json"), encoding="utf-8") as f:
        config = json.load(f)["config"]
    assert (config["system_prompt"], config["instruction"], config["instruction_separator"]) == (
        "Be brief.",
        "Say it.",
        " | ",
    )
    assert config["chat_template_kwargs"] == {"hint": "Think first.\n"}
    assert set(config["settings_from"].values()) == {"model"}
    # An argument still wins over the saved value, and says so.
    argv += ["--num-samples", "4", "--max-new-tokens", "6", "--folds", "3", "--instruction", ""]
    assert cli_main([*argv, "--output-dir", str(tmp_path / "given"), "--json"]) == 0
    config = json.loads(capsys.readouterr().out)["config"]
    assert config["instruction"] == "" and config["settings_from"]["instruction"] == "argument"


def error_of(capsys, *argv) -> str:
    assert cli_main(["probe", *argv]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("trl-laser probe: error:")]
    assert len(lines) == 1
    return lines[0]


def test_bad_input_is_a_one_line_error_before_loading(answering_dir, tmp_path, capsys):
    missing = str(tmp_path / "no-model")  # never loaded: the checks come first
    base = ["--dataset", "builtin:arithmetic", "--output-dir", str(tmp_path / "never")]
    assert "--num-samples" in error_of(capsys, "--model", missing, *base, "--num-samples", "0")
    assert "--folds" in error_of(capsys, "--model", missing, *base, "--folds", "1")
    assert "3 problems cannot fill 5 folds" in error_of(capsys, "--model", missing, *base, "--max-problems", "3")
    assert "--readout-c" in error_of(capsys, "--model", missing, *base, "--readout-c", "0")
    data = tmp_path / "problems.jsonl"
    data.write_text('{"question": "1+1", "answer": "2"}\n')
    assert "'problem'" in error_of(capsys, "--model", missing, "--dataset", str(data))
    assert "--self-reward-token" in error_of(capsys, "--model", answering_dir, *base)
    assert not os.path.exists(tmp_path / "never")


def test_too_few_problems_for_the_folds_is_said_in_good_english():
    from trl_laser.probe import finished_records

    one = [
        {"finished": True, "problem_index": 0, "problem": "a"},
        {"finished": False, "problem_index": 1, "problem": "b"},
    ]
    with pytest.raises(ValueError, match=r"^Only 1 problem has a finished completion, fewer than the 5 folds"):
        finished_records(one, max_new_tokens=8, folds=5)
    two = [{"finished": True, "problem_index": p, "problem": text} for p, text in enumerate("abab")]
    with pytest.raises(ValueError, match=r"^Only 2 problems have a finished completion"):  # copies count once
        finished_records(two, max_new_tokens=8, folds=5)
