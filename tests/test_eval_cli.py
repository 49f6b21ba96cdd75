"""`trl-laser eval` end to end on a tiny local model and a local JSONL, and the summary against hand computations."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from conftest import SELF_REWARD_TOKEN, answering_model, dataset_with_configs
from PIL import Image

from trl_laser import SelfRewardSettings
from trl_laser.data import PAPER_INSTRUCTION, make_conversation
from trl_laser.evaluation import format_table, scaling_curves, summarize
from trl_laser.metrics import auroc
from trl_laser.probe import load_problems as probe_problems
from trl_laser.scoring import score_completions
from trl_laser.scripts.eval import main, make_parser


ZC, EOS, FOUR = 7, 2, 36  # <gh_stars>, <|im_end|>, "4"
BETA = 20.0  # a large beta_v spreads the tiny model's scores around the 0.5 threshold
PROBLEMS = [("What is 2 + 2?", "4"), ("What is 8 / 2?", "\\frac{8}{2}"), ("Write 44.", "44"), ("Write 444.", "444")]
SAMPLE_FIELDS = {"problem", "gold", "completion", "pred", "correct", "finished", "self_reward", "sample_index"}


@pytest.fixture(scope="module")
def workdir(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    bare = str(root / "bare")
    model = answering_model(tokenizer)
    model.save_pretrained(bare)
    tokenizer.save_pretrained(bare)
    # c_ref at the median log pi(z_c | x, y, EOS), so that scores fall on both sides of 0.5.
    logps = score_completions(
        model,
        tokenizer,
        [make_conversation(p) for p, _ in PROBLEMS] * 2,
        [[EOS]] * 4 + [[FOUR, FOUR, EOS]] * 4,
        overrides={"self_reward_token": SELF_REWARD_TOKEN, "self_reward_ref_constant": 0.0, "self_reward_beta": 1.0},
    )
    c_ref = sorted(logps)[4] - 0.025
    trained = shutil.copytree(bare, root / "trained")
    SelfRewardSettings(SELF_REWARD_TOKEN, ZC, BETA, c_ref, eos_token_ids=[EOS]).save_pretrained(trained)
    data = root / "problems.jsonl"
    data.write_text("".join(json.dumps({"question": p, "solution": a}) + "\n" for p, a in PROBLEMS))
    return {"root": root, "bare": bare, "trained": str(trained), "data": str(data), "c_ref": c_ref}


def run(*argv: str) -> int:
    return main(make_parser().parse_args(list(argv)))


@pytest.fixture(scope="module")
def result(workdir):
    out = str(workdir["root"] / "out")
    common = ["--problem-column", "question", "--answer-column", "solution", "--max-new-tokens", "8"]
    assert run("--model", workdir["trained"], "--dataset", workdir["data"], *common, "--output-dir", out) == 0
    return {"out": out, "samples": read_samples(out), "summary": read_summary(out)}


def read_samples(out: str) -> list[dict]:
    with open(os.path.join(out, "samples.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def read_summary(out: str) -> dict:
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        return json.load(f)


def hand_votes(rows):
    """Votes written out for plain-integer answers, where equivalence is string equality."""
    preds = [r["pred"] for r in rows]
    answered = [i for i, p in enumerate(preds) if p is not None]
    weights = {p: 0.0 for p in preds if p is not None}
    counts = {p: 0 for p in weights}
    for i in answered:
        counts[preds[i]] += 1
        weights[preds[i]] += min(max(rows[i]["self_reward"] or 0.0, 0.0), 1.0)
    order = list(dict.fromkeys(preds[i] for i in answered))
    majority = max(order, key=lambda p: (counts[p], -order.index(p)), default=None)
    weighted = max(order, key=lambda p: (weights[p], counts[p], -order.index(p)), default=None)
    scored = [(r["self_reward"] if r["self_reward"] is not None else -1e9, -i) for i, r in enumerate(rows)]
    best = rows[-max(scored)[1]]
    first_correct = {p: rows[preds.index(p)]["correct"] for p in order}
    return first_correct.get(majority, False), first_correct.get(weighted, False), best["correct"]


def test_eval_writes_samples_with_all_fields(result, workdir):
    samples = result["samples"]
    assert len(samples) == 4 * 4  # the default --num-samples is 4 as well
    assert [(s["problem_index"], s["sample_index"]) for s in samples] == [(p, i) for p in range(4) for i in range(4)]
    for s in samples:
        assert SAMPLE_FIELDS <= set(s)
        assert (s["problem"], s["gold"]) == PROBLEMS[s["problem_index"]]
        assert isinstance(s["correct"], bool) and isinstance(s["finished"], bool)
        assert (s["self_reward"] is None) == (not s["finished"])
        if s["finished"]:  # the saved settings are used: r_s = beta_v (log pi(z_c) - c_ref)
            assert s["self_reward"] == pytest.approx(BETA * (s["self_reward_logprob"] - workdir["c_ref"]), abs=1e-9)
        # This model writes runs of "4": pred is that number, and it is right iff the gold equals it.
        text = s["completion"].strip()
        if text and set(text) == {"4"}:
            assert s["pred"] == text
            assert s["correct"] == (
                text == "4" and s["problem_index"] in (0, 1) or text == PROBLEMS[s["problem_index"]][1]
            )
        elif not text:
            assert s["pred"] is None and s["correct"] is False
    # Both labels and both sides of the threshold occur, so the self-verification numbers below are not degenerate.
    assert {s["correct"] for s in samples} == {True, False}
    assert any(s["self_reward"] > 0.5 for s in samples if s["finished"])
    assert any(s["self_reward"] <= 0.5 for s in samples if s["finished"])


def test_eval_summary_matches_hand_computations(result):
    samples, summary = result["samples"], result["summary"]
    assert all(s["pred"] is None or s["pred"].isdigit() for s in samples)  # premise of `hand_votes`
    assert (summary["n_problems"], summary["n_samples"]) == (4, 16)
    assert summary["config"]["instruction"] == PAPER_INSTRUCTION  # a local file: the paper's, as in training
    assert summary["accuracy"] == pytest.approx(sum(s["correct"] for s in samples) / 16)
    by_problem = [[s for s in samples if s["problem_index"] == p] for p in range(4)]
    votes = [hand_votes(rows) for rows in by_problem]
    for k, key in enumerate(("majority_at_n", "weighted_at_n", "best_of_n")):
        assert summary[key] == pytest.approx(sum(v[k] for v in votes) / 4), key
    scored = [s for s in samples if s["self_reward"] is not None]
    assert summary["sv_accuracy"] == pytest.approx(
        sum((s["self_reward"] > 0.5) == s["correct"] for s in scored) / len(scored)
    )
    for key in ("sv_f1_paper", "sv_f1_binary", "auroc", "ece"):
        assert key in summary and key in summary["filtered"]

    # The "answer extracted" variant: the same computations on the samples with a pred, over all 4 problems.
    answered = [s for s in samples if s["pred"] is not None]
    filtered = summary["filtered"]
    assert (filtered["n_problems"], filtered["n_samples"]) == (4, len(answered))
    assert filtered["accuracy"] == pytest.approx(sum(s["correct"] for s in answered) / len(answered))
    votes = [
        hand_votes([s for s in rows if s["pred"] is not None]) if any(s["pred"] for s in rows) else (0, 0, 0)
        for rows in by_problem
    ]
    assert filtered["best_of_n"] == pytest.approx(sum(v[2] for v in votes) / 4)

    # Scaling curves: k = 1..N, ending at the summary's votes; k = 1 is the accuracy of one sample in expectation.
    scaling = summary["scaling"]
    assert scaling["k"] == [1, 2, 3, 4]
    assert (scaling["majority"][-1], scaling["weighted"][-1], scaling["best_of_n"][-1]) == (
        summary["majority_at_n"],
        summary["weighted_at_n"],
        summary["best_of_n"],
    )
    assert all(0.0 <= v <= 1.0 for key in ("majority", "weighted", "best_of_n") for v in scaling[key])


def test_eval_reports_the_free_baselines_beside_laser(result):
    samples, summary = result["samples"], result["summary"]
    by_problem = [[s for s in samples if s["problem_index"] == p] for p in range(4)]
    for rows in by_problem:  # agreement with the other 3 samples; plain integers, so equivalence is equality
        for s in rows:
            others = [o["pred"] for o in rows if o is not s]
            expected = 0.0 if s["pred"] is None else sum(o == s["pred"] for o in others) / 3
            assert s["answer_agreement"] == pytest.approx(expected)
    for s in samples:
        assert s["min_token_logprob"] <= s["mean_token_logprob"] < 0
        assert "difficulty" not in s  # a local file without that column
    # Every AUROC on exactly the scored samples, as LaSeR's; within a problem: pairs of one problem only.
    scored = [s for s in samples if s["self_reward"] is not None]
    labels = [s["correct"] for s in scored]
    assert summary["auroc"] == pytest.approx(auroc([s["self_reward"] for s in scored], labels))
    baselines = summary["baselines"]
    assert set(baselines) == {"mean_token_logprob", "min_token_logprob", "answer_agreement"}
    for key in ("self_reward", *baselines):
        values = summary if key == "self_reward" else baselines[key]
        if key != "self_reward":
            assert values["auroc"] == pytest.approx(auroc([s[key] for s in scored], labels))
        right = pairs = 0
        for a in scored:
            for b in scored:
                if a["problem_index"] == b["problem_index"] and a["correct"] and not b["correct"]:
                    pairs += 1
                    right += 1.0 if a[key] > b[key] else 0.5 if a[key] == b[key] else 0.0
        assert pairs > 0
        assert values["auroc_within_problem"] == pytest.approx(right / pairs), key
        assert values["auroc_by_band"] is None
    assert summary["auroc_by_band"] is None
    # Votes weighted by the geometric-mean token probability exp(mean token log-prob); best-of-N by that mean.
    votes = [hand_votes([dict(s, self_reward=math.exp(s["mean_token_logprob"])) for s in rows]) for rows in by_problem]
    assert baselines["mean_token_logprob"]["weighted_at_n"] == pytest.approx(sum(v[1] for v in votes) / 4)
    assert baselines["mean_token_logprob"]["best_of_n"] == pytest.approx(sum(v[2] for v in votes) / 4)
    assert summary["laser_vs_mean_token_logprob_auroc"] == pytest.approx(
        summary["auroc"] - baselines["mean_token_logprob"]["auroc"]
    )
    assert set(summary["filtered"]["baselines"]) == set(baselines)


def test_copies_of_a_problem_are_one_problem_within():
    # Positions 0 and 1 hold the same text. Copy 0: right (r_s .9) and wrong (.5); copy 1: two right answers (.4, .6).
    # By text the pairs are .9 > .5, .4 < .5, .6 > .5 -> 2/3 (by position only copy 0's pair would count: 1). The
    # mean token log-prob: -.1 > -.15, -.2 and -.3 < -.15 -> 1/3. One problem carries it: every draw is that problem.
    rows = [
        (0, "1", True, 0.9, -0.1),
        (0, "2", False, 0.5, -0.15),
        (1, "1", True, 0.4, -0.2),
        (1, "1", True, 0.6, -0.3),
    ]
    records = [
        {
            "problem": "What is 0 + 1?",
            "problem_index": p,
            "sample_index": i % 2,
            "pred": pred,
            "correct": ok,
            "finished": True,
            "self_reward": r_s,
            "mean_token_logprob": m,
            "min_token_logprob": m,
            "answer_agreement": 0.0,
        }
        for i, (p, pred, ok, r_s, m) in enumerate(rows)
    ]
    summary = summarize(records, 2)
    assert summary["auroc_within_problem"] == pytest.approx(2 / 3)
    assert summary["baselines"]["mean_token_logprob"]["auroc_within_problem"] == pytest.approx(1 / 3)
    uncertainty = summary["within_problem_uncertainty"]
    assert (uncertainty["problems"], uncertainty["pairs"]) == (1, 3)
    assert uncertainty["auroc_interval"] == pytest.approx([2 / 3, 2 / 3])
    assert uncertainty["lead_over_mean_token_logprob_interval"] == pytest.approx([1 / 3, 1 / 3])
    assert summary["majority_at_n"] == pytest.approx(1.0)  # votes stay per query: copy 1 all right, copy 0 ties to "1"


def test_summary_auroc_by_difficulty_band():
    # Problem 0 easy, 1 and 2 medium; one unscored (truncated) sample, left out of every AUROC.
    rows = [
        (0, "easy", 0.9, True, -0.1),
        (0, "easy", 0.2, False, -0.9),
        (0, "easy", 0.6, False, -0.05),
        (1, "medium", 0.4, True, -0.4),
        (1, "medium", 0.7, False, -0.3),
        (2, "medium", 0.8, True, -0.2),
        (2, "medium", None, False, -0.01),
    ]
    records = [
        {
            "problem": f"problem {p}",
            "problem_index": p,
            "sample_index": i,
            "difficulty": band,
            "self_reward": r_s,
            "correct": ok,
            "finished": r_s is not None,
            "pred": str(i),
            "mean_token_logprob": m,
            "min_token_logprob": m,
            "answer_agreement": 0.0,
        }
        for i, (p, band, r_s, ok, m) in enumerate(rows)
    ]
    summary = summarize(records, 3)
    # easy: (.9 > .2, .9 > .6) -> 1.0; medium: .4 < .7, .8 > .7 -> 1/2. Mean token log-prob: easy -.1 > -.9 but
    # -.1 < -.05 -> 1/2; medium: -.4 < -.3, -.2 > -.3 -> 1/2 (the unscored -.01 would have made it worse).
    assert summary["auroc_by_band"] == {"easy": 1.0, "medium": 0.5}
    assert list(summary["auroc_by_band"]) == ["easy", "medium"]
    assert summary["baselines"]["mean_token_logprob"]["auroc_by_band"] == {"easy": 0.5, "medium": 0.5}
    # Within a problem: LaSeR right on 2 of 2 pairs of problem 0 and 0 of 1 of problem 1 -> 2/3.
    assert summary["auroc_within_problem"] == pytest.approx(2 / 3)
    # Problems 0 and 1 carry it (3 pairs; problem 2 has one scored sample). Resampling two of them gives the score
    # 1, 2/3 or 0 and its lead over the mean token log-prob (1/2, 1/3 or 0 of it) 1/2, 1/3 or 0, with probabilities
    # 1/4, 1/2, 1/4: the 95% intervals run from one extreme to the other.
    assert summary["within_problem_uncertainty"] == {
        "problems": 2,
        "pairs": 3,
        "level": 0.95,
        "auroc_interval": [0.0, 1.0],
        "lead_over_mean_token_logprob_interval": [0.0, 0.5],
    }
    # Overall: correct .9 .4 .8 vs incorrect .2 .6 .7: 3 + 1 + 3 = 7 of 9.
    assert summary["auroc"] == pytest.approx(7 / 9)
    assert "auroc easy" in format_table(summary) and "mean_token_logprob" in format_table(summary)


def test_eval_writes_png_plots_and_prints_a_table(result, capsys, workdir):
    for name in ("reliability.png", "scaling.png"):
        path = os.path.join(result["out"], name)
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
    out = str(workdir["root"] / "tiny")
    args = "--num-samples 1 --max-problems 1 --max-new-tokens 2 --problem-column question --answer-column solution"
    run("--model", workdir["trained"], "--dataset", workdir["data"], *args.split(), "--output-dir", out)
    table = capsys.readouterr().out
    assert "majority_at_n" in table and "answer extracted" in table and "sv_f1_paper" in table
    assert all(name in table for name in ("laser r_s", "mean_token_logprob", "min_token_logprob", "answer_agreement"))
    summary = read_summary(out)
    assert (summary["n_problems"], summary["n_samples"], summary["scaling"]["k"]) == (1, 1, [1])


def two_answers(mean_token_logprobs: tuple[float, float] | None = None) -> list[dict]:
    """One problem's records: "2" (wrong, r_s 0.2) then "1" (right, r_s 0.9), with their mean token log-probs."""
    rows = [
        {"problem": "1?", "problem_index": 0, "sample_index": i, "pred": pred, "correct": ok, "self_reward": r_s}
        for i, (pred, ok, r_s) in enumerate((("2", False, 0.2), ("1", True, 0.9)))
    ]
    for row, value in zip(rows, mean_token_logprobs or ()):
        row["mean_token_logprob"] = value
    return [dict(row, finished=True) for row in rows]


def test_scaling_curves_average_random_subsets():
    # One problem, 2 samples: "1" (right, r_s 0.9) and "2" (wrong, r_s 0.2). With k = 1 every vote is right iff
    # the drawn sample is the right one: 1/2 in expectation; with k = 2 majority ties (first wins), weighted and
    # best-of-N pick the right one.
    rows = two_answers()
    curves = scaling_curves(rows, 2, num_subsets=4000, seed=0)
    for key in ("majority", "weighted", "best_of_n"):
        assert curves[key][0] == pytest.approx(0.5, abs=0.03)
    assert (curves["majority"][1], curves["weighted"][1], curves["best_of_n"][1]) == (0.0, 1.0, 1.0)
    assert curves == scaling_curves(rows, 2, num_subsets=4000, seed=0)  # seeded
    summary = summarize(rows, 1)
    assert (summary["majority_at_n"], summary["weighted_at_n"], summary["best_of_n"]) == (0.0, 1.0, 1.0)


def test_scaling_curves_vote_with_the_mean_token_logprob_too():
    # The free signal prefers the wrong answer "2" (mean token log-prob -0.1 against -2.0): with both samples its
    # weighted vote (e^-0.1 > e^-2) and its best-of-N pick "2", where r_s picks "1"; at k = N they equal the summary.
    rows = two_answers(mean_token_logprobs=(-0.1, -2.0))
    curves = scaling_curves(rows, 2, num_subsets=4000, seed=0)
    assert (curves["weighted_mean_token_logprob"][1], curves["best_of_n_mean_token_logprob"][1]) == (0.0, 0.0)
    assert curves["weighted_mean_token_logprob"][0] == pytest.approx(0.5, abs=0.03)
    assert (curves["weighted"][1], curves["best_of_n"][1]) == (1.0, 1.0)
    baseline = summarize(rows, 1)["baselines"]["mean_token_logprob"]
    assert (baseline["weighted_at_n"], baseline["best_of_n"]) == (0.0, 0.0)


# ------------------------------------------------------------------------------------------ errors
def error_of(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run(*argv)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("trl-laser eval: error:")]
    assert len(lines) == 1
    return lines[0]


def test_errors_are_one_line_and_name_the_problem(workdir, capsys, tmp_path):
    model, data = workdir["trained"], workdir["data"]
    cols = ["--problem-column", "question", "--answer-column", "solution"]
    out = ["--output-dir", str(tmp_path / "never")]
    assert "'nope'" in error_of(capsys, "--model", model, "--dataset", data, "--problem-column", "nope", *out)
    assert "solution_x" in error_of(
        capsys, "--model", model, "--dataset", data, "--problem-column", "question", "--answer-column", "solution_x"
    )
    assert "--num-samples" in error_of(capsys, "--model", model, "--dataset", data, *cols, "--num-samples", "0")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "empty" in error_of(capsys, "--model", model, "--dataset", str(empty), *cols)
    empty_list = tmp_path / "empty.json"
    empty_list.write_text("[]")
    assert "empty" in error_of(capsys, "--model", model, "--dataset", str(empty_list), *cols)
    message = error_of(capsys, "--model", workdir["bare"], "--dataset", data, *cols, *out)
    assert "self_reward_config.json" in message and "--self-reward-ref-constant" in message
    assert "missing.jsonl" in error_of(capsys, "--model", model, "--dataset", str(tmp_path / "missing.jsonl"))
    assert not os.path.exists(tmp_path / "never")  # nothing was written


def test_a_dataset_configuration_is_chosen_by_name(workdir, capsys, tmp_path):
    folder = dataset_with_configs(tmp_path, {"main": PROBLEMS[:2], "other": PROBLEMS[2:]})
    cols = ["--problem-column", "question", "--answer-column", "solution", "--max-new-tokens", "4"]
    out = str(tmp_path / "main")
    model = ["--model", workdir["trained"], "--num-samples", "1"]
    assert run(*model, "--dataset", folder, "--dataset-config", "main", *cols, "--output-dir", out) == 0
    assert [s["problem"] for s in read_samples(out)] == [p for p, _ in PROBLEMS[:2]]
    benchmark = f"b={folder},config=other,problem_column=question,answer_column=solution"
    out = str(tmp_path / "other")
    assert run(*model, "--benchmark", benchmark, "--max-new-tokens", "4", "--output-dir", out) == 0
    assert [s["problem"] for s in read_samples(os.path.join(out, "b"))] == [p for p, _ in PROBLEMS[2:]]
    message = error_of(capsys, *model, "--dataset", folder, *cols, "--output-dir", str(tmp_path / "never"))
    assert "needs a configuration" in message and "--dataset-config" in message and "['main', 'other']" in message
    message = error_of(capsys, *model, "--dataset", folder, "--dataset-config", "nope", *cols)
    assert "has no configuration 'nope'" in message and "['main', 'other']" in message
    assert not os.path.exists(tmp_path / "never")
    # probe and fit-row read their problems the same way
    _, _, problems = probe_problems(
        workdir["trained"], folder, "test", ("question", "solution", "other"), None, None, 2
    )
    assert [p["problem"] for p in problems] == [p for p, _ in PROBLEMS[2:]]


def test_a_model_rewritten_in_place_is_not_resumed(workdir, capsys, tmp_path):
    from transformers import AutoModelForCausalLM

    model = str(shutil.copytree(workdir["trained"], tmp_path / "model"))
    out = str(tmp_path / "out")
    argv = ["--model", model, "--dataset", workdir["data"], "--problem-column", "question", "--answer-column"]
    argv += ["solution", "--num-samples", "1", "--max-new-tokens", "4", "--output-dir", out]
    assert run(*argv) == 0
    assert run(*argv) == 0 and "Resuming the run" in capsys.readouterr().out  # the same model: nothing to sample
    rewritten = AutoModelForCausalLM.from_pretrained(model)  # a refit into the same folder
    with torch.no_grad():
        rewritten.lm_head.weight[ZC] += 1.0
    rewritten.save_pretrained(model)
    message = error_of(capsys, *argv)
    assert "--overwrite" in message
    assert run(*argv, "--overwrite") == 0 and "Resuming the run" not in capsys.readouterr().out
    assert len(read_samples(out)) == len(PROBLEMS)


def test_a_model_that_suppresses_z_c_reads_its_free_signals_without_it(workdir, result, tokenizer, tmp_path):
    """As after `fit-row`: the free signals are the sampler's log-probs, z_c left out; the run record says so, so a
    folder sampled before (raw log-probs) is not resumed."""
    from transformers import AutoModelForCausalLM

    model = str(shutil.copytree(workdir["trained"], tmp_path / "model"))
    fitted = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():  # z_c as likely as "4" wherever that is sampled: a large share of the raw distribution
        fitted.lm_head.weight[ZC] = fitted.lm_head.weight[FOUR]
    fitted.generation_config.suppress_tokens = [ZC]
    fitted.save_pretrained(model)
    out = str(tmp_path / "out")
    argv = ["--model", model, "--dataset", workdir["data"], "--problem-column", "question", "--answer-column"]
    assert run(*argv, "solution", "--num-samples", "2", "--max-new-tokens", "6", "--output-dir", out) == 0
    assert read_summary(out)["config"]["free_signals_exclude"] == [ZC]
    assert "free_signals_exclude" not in result["summary"]["config"]
    shares = []
    for s in read_samples(out):
        conversation = make_conversation(s["problem"])
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
        prompt = list(ids["input_ids"])
        completion = tokenizer(s["completion"], add_special_tokens=False)["input_ids"] + (
            [EOS] if s["finished"] else []
        )
        with torch.no_grad():
            logits = fitted(input_ids=torch.tensor([prompt + completion])).logits[0].double()
        positions = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
        raw = logits.log_softmax(-1)[positions, completion].mean().item()
        logits[:, ZC] = float("-inf")
        kept = logits.log_softmax(-1)[positions, completion].mean().item()
        assert s["mean_token_logprob"] == pytest.approx(kept, abs=1e-3)
        shares.append(kept - raw)
    assert max(shares) > 0.1  # the raw log-probs would be far off


def test_overrides_score_a_model_saved_without_settings(workdir):
    out = str(workdir["root"] / "override")
    args = "--num-samples 2 --max-problems 2 --max-new-tokens 4 --problem-column question --answer-column solution"
    overrides = f"--self-reward-token {SELF_REWARD_TOKEN} --self-reward-ref-constant -16 --self-reward-beta 0.5"
    more = ["--instruction", "Answer with just the number.", "--output-dir", out]
    run("--model", workdir["bare"], "--dataset", workdir["data"], *args.split(), *overrides.split(), *more)
    summary = read_summary(out)
    settings = summary["config"]["self_reward"]
    assert settings["self_reward_token_id"] == ZC
    assert (settings["self_reward_ref_constant"], settings["self_reward_beta"]) == (-16.0, 0.5)
    assert summary["config"]["instruction"] == "Answer with just the number."
    for s in read_samples(out):
        if s["finished"]:
            assert s["self_reward"] == pytest.approx(0.5 * (s["self_reward_logprob"] + 16.0), abs=1e-9)


@pytest.mark.parametrize(
    "auroc, free, expected",
    [
        (0.8, 0.7, "LaSeR AUROC 0.800 beats the free mean token log-prob (0.700, +0.100)."),
        (0.6, 0.7, "LaSeR AUROC 0.600 does not beat the free mean token log-prob (0.700, -0.100)."),
        (None, 0.7, "no AUROC"),
    ],
)
def test_verdict_line(auroc, free, expected):
    from trl_laser.evaluation import verdict

    summary = {"auroc": auroc, "n_scored": 10, "baselines": {"mean_token_logprob": {"auroc": free}}}
    assert expected in verdict(summary)


def test_verdict_says_whether_the_score_chooses_within_a_problem():
    from trl_laser.evaluation import verdict

    summary = {
        "auroc": 0.85,
        "n_scored": 10,
        "auroc_within_problem": 0.72,
        "weighted_at_n": 0.55,
        "majority_at_n": 0.56,
        "best_of_n": 0.5,
        "baselines": {"mean_token_logprob": {"auroc": 0.7, "auroc_within_problem": 0.8}},
    }
    lines = verdict(summary).splitlines()
    assert lines[1] == (
        "Within a problem (what best-of-N and weighted voting need): LaSeR AUROC 0.720 does not beat the free mean "
        "token log-prob (0.800, -0.080)."
    )
    assert (
        lines[2]
        == "Voting: weighted by the score 0.550 does not beat majority 0.560 (-0.010); best-of-N by the score 0.500."
    )
    summary.update(auroc_within_problem=0.9, weighted_at_n=0.6)
    lines = verdict(summary).splitlines()
    assert "0.900 beats the free mean token log-prob (0.800, +0.100)" in lines[1]
    summary["within_problem_uncertainty"] = {"problems": 31, "lead_over_mean_token_logprob_interval": [-0.27, 0.24]}
    assert (
        verdict(summary)
        .splitlines()[1]
        .endswith(
            "LaSeR AUROC 0.900 beats the free mean token log-prob (0.800, +0.100; 95% interval -0.270 to +0.240 over 31 "
            "problems)."
        )
    )
    assert "0.600 beats majority 0.560 (+0.040)" in lines[2]
