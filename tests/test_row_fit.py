"""`trl_laser.row_fit` and `trl-laser fit-row`: the closed-form refit of z_c's row after training."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import EOS, SELF_REWARD_TOKEN, ZC, answering_model, load_benchmark
from huggingface_hub import HfApi
from safetensors.torch import load_file

from trl_laser.cli import main as cli_main
from trl_laser.hub import CARD_START, ROW_FIT_END, ROW_FIT_START, write_row_fit_card
from trl_laser.metrics import auroc, auroc_within_group
from trl_laser.row_fit import (
    ROW_FIT_FILE,
    choice,
    cross_validate_row_fit,
    load_fitting_states,
    refitted_logps,
    row_fit_step,
)
from trl_laser.settings import SELF_REWARD_CONFIG_NAME, SelfRewardSettings


BETA, REF = 0.1, -16.0


def toy_batch(n_groups: int = 6, per_group: int = 5, d: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    n = n_groups * per_group
    states = torch.randn(n, d, generator=generator, dtype=torch.float64)
    labels = (torch.rand(n, generator=generator) < 0.4).double()
    labels[:2] = torch.tensor([1.0, 0.0])  # both classes present
    groups = torch.arange(n) // per_group
    return states, labels, groups


def hand_weights(labels: torch.Tensor) -> torch.Tensor:
    n_c, n = float(labels.sum()), len(labels)
    return torch.where(labels > 0.5, n / (2 * n_c), n / (2 * (n - n_c))) / n


def test_row_fit_step_is_the_ridge_regression_of_the_residual():
    # log pi(z_c) so low that pi(z_c) ~ 1e-17: the score is linear in the row, and the Gauss-Newton step must be the
    # exact minimiser of sum_i c_i (r_s_i + beta h_i . step - r_v_i)^2 + beta^2 lambda |step|^2, solved here by
    # least squares on the stacked rows (lambda = ridge * trace(B) / d, B = sum_i c_i h_i h_i^T).
    states, labels, groups = toy_batch()
    logps = -40.0 + torch.linspace(0, 3, len(labels), dtype=torch.float64)
    ridge, d = 0.05, states.size(1)
    step = row_fit_step(states, logps, labels, groups, BETA, REF, ridge)
    c = hand_weights(labels)
    residual = BETA * (logps - REF) - labels
    lam = ridge * float((c[:, None] * states * states).sum()) / d
    a = torch.cat([c.sqrt()[:, None] * BETA * states, BETA * lam**0.5 * torch.eye(d, dtype=torch.float64)])
    b = torch.cat([-c.sqrt() * residual, torch.zeros(d, dtype=torch.float64)])
    expected = torch.linalg.lstsq(a, b[:, None]).solution.squeeze(1)
    torch.testing.assert_close(step, expected, rtol=1e-6, atol=1e-12)  # class_weights are float32


def test_row_fit_step_down_weights_the_fit_between_problems():
    # between weight w: minimise sum_i c_i (e_i - ebar_g)^2 + w sum_g C_g ebar_g^2 (+ the ridge), with e_i the residual
    # after the step and ebar_g its c-weighted mean in problem g: the within-problem errors and, weighted, the means.
    states, labels, groups = toy_batch(seed=1)
    logps = torch.full((len(labels),), -40.0, dtype=torch.float64)
    ridge, weight, d = 0.02, 0.25, states.size(1)
    step = row_fit_step(states, logps, labels, groups, BETA, REF, ridge, between_weight=weight)
    c = hand_weights(labels)
    residual = BETA * (logps - REF) - labels
    rows, targets = [], []
    for g in groups.unique():
        m = groups == g
        cg = c[m].sum()
        mean_h, mean_r = (c[m, None] * states[m]).sum(0) / cg, (c[m] * residual[m]).sum() / cg
        rows.append(c[m].sqrt()[:, None] * BETA * (states[m] - mean_h))
        targets.append(-c[m].sqrt() * (residual[m] - mean_r))
        rows.append((weight * cg).sqrt() * BETA * mean_h[None])
        targets.append(-(weight * cg).sqrt() * mean_r[None])
    # The damping is relative to the trace of this system's own matrix: sum of the squared norms of the rows above.
    lam = ridge * float(sum((r / BETA).square().sum() for r in rows)) / d
    rows.append(BETA * lam**0.5 * torch.eye(d, dtype=torch.float64))
    targets.append(torch.zeros(d, dtype=torch.float64))
    expected = torch.linalg.lstsq(torch.cat(rows), torch.cat(targets)[:, None]).solution.squeeze(1)
    torch.testing.assert_close(step, expected, rtol=1e-6, atol=1e-12)  # class_weights are float32
    # Weight 1 is the pooled fit.
    torch.testing.assert_close(
        row_fit_step(states, logps, labels, groups, BETA, REF, ridge, between_weight=1.0),
        row_fit_step(states, logps, labels, groups, BETA, REF, ridge),
    )


def test_row_fit_step_keeps_z_c_in_place_inside_the_answers():
    # other_weight w adds w * mean_t (beta h_t . step)^2 for the answers' own positions h_t: in the stacked least
    # squares, one row sqrt(w / M) * beta * h_t with target 0 each (the damping is relative to the whole system).
    states, labels, groups = toy_batch(seed=4)
    logps = torch.full((len(labels),), -40.0, dtype=torch.float64)
    inside = torch.randn(11, states.size(1), generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 1.0
    ridge, weight, d = 0.01, 3.0, states.size(1)
    gram = inside.T @ inside / len(inside)
    step = row_fit_step(states, logps, labels, groups, BETA, REF, ridge, 1.0, gram, weight)
    c = hand_weights(labels)
    residual = BETA * (logps - REF) - labels
    rows = [c.sqrt()[:, None] * BETA * states, (weight / len(inside)) ** 0.5 * BETA * inside]
    lam = ridge * float(sum((r / BETA).square().sum() for r in rows)) / d
    rows.append(BETA * lam**0.5 * torch.eye(d, dtype=torch.float64))
    targets = torch.cat([-c.sqrt() * residual, torch.zeros(len(inside) + d, dtype=torch.float64)])
    expected = torch.linalg.lstsq(torch.cat(rows), targets[:, None]).solution.squeeze(1)
    torch.testing.assert_close(step, expected, rtol=1e-6, atol=1e-12)  # class_weights are float32
    # The term moves z_c's logit inside the answers less than the fit without it.
    free = row_fit_step(states, logps, labels, groups, BETA, REF, ridge)
    assert (inside @ step).square().mean() < (inside @ free).square().mean()
    torch.testing.assert_close(row_fit_step(states, logps, labels, groups, BETA, REF, ridge, 1.0, gram, 0.0), free)


def test_answer_positions_against_plain_forwards(tokenizer):
    from trl_laser.row_fit import answer_positions, zc_inside_answers

    model = answering_model(tokenizer).eval()
    generator = torch.Generator().manual_seed(6)
    # Lengths 12, 7, 12 and 10: the first and last answer one prompt, whose prefill they share in a batch of two;
    # batches are grouped by prompt, not by order, and the results keep their order.
    prompts = [torch.randint(10, 200, (n,), generator=generator).tolist() for n in (9, 5, 7)]
    prompts.append(prompts[0])
    answers = [[36, 36, EOS], [36, EOS], [36, 36, 36, 36, EOS], [EOS]]
    sequences = [p + a for p, a in zip(prompts, answers)]
    lengths = [len(a) for a in answers]
    out = answer_positions(model, sequences, lengths, ZC, EOS, batch_size=2)
    head_input = []
    hook = model.lm_head.register_forward_pre_hook(lambda m, args: head_input.append(args[0]))
    # z_c's row moved (its logit up by 24 at the mean state): its log-probs inside the answers after the fit.
    mean = out["states"].mean(0)
    step = 24 * mean / mean.dot(mean)
    gram, positions, states, after = torch.zeros(32, 32, dtype=torch.float64), 0, [], []
    try:
        for i, (seq, n) in enumerate(zip(sequences, lengths)):
            with torch.no_grad():
                logps = model(torch.tensor([seq])).logits[0].log_softmax(-1)[:, ZC]
                model.lm_head.weight[ZC] += step
                after.append(model(torch.tensor([seq])).logits[0].log_softmax(-1)[:, ZC])
                model.lm_head.weight[ZC] -= step
            span = slice(len(seq) - n - 1, len(seq) - 1)  # the positions that sampled the answer's n tokens
            assert out["draws"][i] == pytest.approx(float(logps[span].exp().sum()), rel=1e-4)
            assert out["max_logprob"][i] == pytest.approx(float(logps[span].max()), abs=1e-4)
            assert out["eos_logps"][i] == pytest.approx(float(logps[-1]), abs=1e-4)  # the EOS's: the score's
            torch.testing.assert_close(out["eos_states"][i], head_input[-2][0, -1], rtol=1e-4, atol=1e-4)
            h = head_input[-2][0, span]
            states.append(h)
            gram += h.double().T @ h.double()
            positions += n
            after[-1] = after[-1][span]
    finally:
        hook.remove()
    assert out["positions"] == positions == 11
    assert out["answer"].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 3]
    torch.testing.assert_close(out["states"], torch.cat(states), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["gram"], gram / positions, rtol=1e-4, atol=1e-4)
    draws, peak = zc_inside_answers(refitted_logps(out["states"], out["logps"], step), out["answer"], 4)
    assert max(peak) > -5  # a real move: z_c likely somewhere inside an answer
    assert draws == pytest.approx([float(a.exp().sum()) for a in after], rel=1e-4)
    assert peak == pytest.approx([float(a.max()) for a in after], abs=1e-4)


def test_refitted_logps_equal_a_log_softmax_with_the_moved_row():
    generator = torch.Generator().manual_seed(2)
    head = torch.randn(50, 6, generator=generator, dtype=torch.float64)
    head[ZC] *= 0.3
    states = torch.randn(9, 6, generator=generator, dtype=torch.float64) * 2
    step = torch.randn(6, generator=generator, dtype=torch.float64)
    before = torch.log_softmax(states @ head.T, -1)[:, ZC]
    moved = head.clone()
    moved[ZC] += step
    after = torch.log_softmax(states @ moved.T, -1)[:, ZC]
    assert (after - before).abs().max() > 1.0  # a real move, with pi(z_c) far from 0 for some states
    torch.testing.assert_close(refitted_logps(states, before, step), after, rtol=0, atol=1e-10)


def test_cross_validation_table_and_choice():
    # Within each problem, correct answers sit along +x; the problems' levels differ along y: a fit that ranks within
    # a problem must read x, which the fitted row does out of fold.
    generator = torch.Generator().manual_seed(3)
    n_groups, per_group = 20, 6
    groups = [f"p{i // per_group}" for i in range(n_groups * per_group)]
    labels = [bool(i % per_group < 3) for i in range(n_groups * per_group)]
    x = torch.tensor([1.0 if y else -1.0 for y in labels], dtype=torch.float64)
    level = torch.randn(n_groups, generator=generator, dtype=torch.float64).repeat_interleave(per_group)
    states = torch.stack([x + 0.3 * torch.randn(len(x), generator=generator, dtype=torch.float64), level], 1)
    logps = torch.full((len(x),), -30.0, dtype=torch.float64) + level
    before = auroc_within_group(logps.tolist(), labels, groups)
    table = cross_validate_row_fit(states, logps, labels, groups, BETA, REF, (0.01, 1.0), (1.0, 0.5), folds=4)
    assert [(r["ridge"], r["between_weight"]) for r in table] == [(0.01, 1.0), (1.0, 1.0), (0.01, 0.5), (1.0, 0.5)]
    assert before == 0.5 and all(r["auroc_within_problem"] > 0.95 for r in table)
    best = choice(table)
    assert (best["auroc"] + best["auroc_within_problem"]) == max(r["auroc"] + r["auroc_within_problem"] for r in table)
    # No problem with both classes: the overall AUROC alone decides.
    unmixed = [{"auroc": 0.6, "auroc_within_problem": None}, {"auroc": 0.7, "auroc_within_problem": None}]
    assert choice(unmixed) is unmixed[1]


# ------------------------------------------------------------------------------------------ the command
@pytest.fixture(scope="module")
def laser_dir(tokenizer, tmp_path_factory) -> str:
    """A model saved as training saves it, with its self-reward settings."""
    path = str(tmp_path_factory.mktemp("fit_row") / "model")
    answering_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    SelfRewardSettings(SELF_REWARD_TOKEN, ZC, 0.1, -5.0, eos_token_ids=[EOS]).save_pretrained(path)
    with open(os.path.join(path, "laser_recipe.yaml"), "w", encoding="utf-8") as f:
        f.write("max_steps: 1\n")
    # What training leaves beside the weights: its log history and a card with the LaSeR section.
    with open(os.path.join(path, "trainer_state.json"), "w", encoding="utf-8") as f:
        json.dump({"log_history": [{"step": 1, "reward": 0.25, "self_reward/auroc": 0.625}]}, f)
    with open(os.path.join(path, "README.md"), "w", encoding="utf-8") as f:
        f.write("# Model Card for model\n\nTRL's part of the card.\n")
    write_row_fit_card(path)  # without a row_fit.json: the LaSeR section alone, as training writes it
    return path


def test_cli_fits_the_row_and_changes_nothing_else(laser_dir, tmp_path, capsys):
    # builtin:arithmetic's first 6 test problems, as the probe's test: problem 5's answer is 4, which this model writes.
    out = str(tmp_path / "fitted")
    argv = [
        "fit-row",
        "--model",
        laser_dir,
        "--dataset",
        "builtin:arithmetic",
        "--split",
        "test",
        "--max-problems",
        "6",
    ]
    argv += ["--num-samples", "8", "--max-new-tokens", "6", "--folds", "3", "--ridges", "0.01", "0.1"]
    states_file = str(tmp_path / "states.pt")
    assert cli_main([*argv, "--output-dir", out, "--json", "--save-states", states_file]) == 0
    printed = json.loads(capsys.readouterr().out)
    with open(os.path.join(out, ROW_FIT_FILE), encoding="utf-8") as f:
        result = json.load(f)
    # What the fit read, saved: the cross-validation and the step come back from it without sampling.
    saved = load_fitting_states(states_file)
    assert len(saved["states"]) == result["n_finished"] and int(saved["labels"].sum()) == result["n_correct_finished"]
    free = auroc(saved["mean_token_logprobs"].tolist(), saved["labels"].bool().tolist())
    assert free == pytest.approx(result["fitting_samples"]["mean_token_logprob"]["auroc"])
    args = (saved["states"], saved["logps"], saved["labels"].bool().tolist(), saved["groups"].tolist())
    kwargs = {"folds": saved["folds"], "seed": saved["seed"], "other_gram": saved["other_gram"]}
    assert (
        cross_validate_row_fit(*args, saved["beta"], saved["ref"], (0.01, 0.1), **kwargs)
        == result["cross_validation"]["table"]
    )
    fit_args = (saved["beta"], saved["ref"], result["chosen"]["ridge"], result["chosen"]["between_weight"])
    step = row_fit_step(saved["states"], saved["logps"], saved["labels"], saved["groups"], *fit_args)
    assert float(step.norm()) == pytest.approx(result["step_norm"], rel=1e-9)
    assert printed["chosen"] == result["chosen"] and result["split"] == "test"
    assert len(result["cross_validation"]["table"]) == 2 * 5  # 2 ridges x the 5 default between weights
    assert result["chosen"] == choice(result["cross_validation"]["table"])
    assert 0 < result["n_correct_finished"] < result["n_finished"] <= 48

    before, after = (
        load_file(os.path.join(laser_dir, "model.safetensors")),
        load_file(os.path.join(out, "model.safetensors")),
    )
    assert set(before) == set(after)
    moved = after["lm_head.weight"][ZC] - before["lm_head.weight"][ZC]
    assert float(moved.norm()) == pytest.approx(result["step_norm"], rel=1e-5) and result["step_norm"] > 0
    for name in before:
        rest = torch.ones(before[name].shape[0], dtype=torch.bool)
        if name == "lm_head.weight":
            rest[ZC] = False
        assert torch.equal(before[name][rest], after[name][rest]), name
    # z_c is suppressed while sampling: its logit may now be high inside answers, and every other token keeps the
    # probability it had. Made huge here, the raw forward would sample it at once; `generate` never does.
    from transformers import AutoModelForCausalLM, GenerationConfig

    assert ZC in GenerationConfig.from_pretrained(out).suppress_tokens
    fitted = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        fitted.lm_head.weight[ZC] = fitted.lm_head.weight[EOS] * 10
    prompt = torch.tensor([[1, 50, 60, 70]])
    assert fitted(prompt).logits[0, -1].softmax(-1)[ZC] > 0.99
    torch.manual_seed(0)
    sampled = fitted.generate(prompt, do_sample=True, max_new_tokens=6, num_return_sequences=8, pad_token_id=EOS)
    assert ZC not in sampled[:, prompt.shape[1] :].flatten().tolist()
    saved = SelfRewardSettings.from_pretrained(out)
    assert saved == SelfRewardSettings.from_pretrained(laser_dir)
    assert os.path.isfile(os.path.join(out, "laser_recipe.yaml"))
    # In sample, the least-squares row ranks the fitting samples at least as the current one does overall.
    fitting = result["fitting_samples"]
    assert fitting["self_reward_after"]["auroc"] >= fitting["self_reward_before"]["auroc"]
    assert set(fitting) == {"mean_token_logprob", "min_token_logprob", "answer_agreement"} | {
        "self_reward_before",
        "self_reward_after",
    }

    # A used folder is refused (an earlier fit is never replaced by accident), and replaced with --overwrite.
    assert cli_main([*argv, "--output-dir", out]) == 1
    err = capsys.readouterr().err
    assert "already holds files" in err and "--overwrite" in err and "Traceback" not in err
    fresh = str(tmp_path / "fresh")
    for states_argv, needle in (
        ([fresh, states_file], "exists"),
        ([out, os.path.join(out, "s.pt"), "--overwrite"], "inside"),
    ):
        assert cli_main([*argv, "--output-dir", states_argv[0], "--save-states", *states_argv[1:]]) == 1
        err = capsys.readouterr().err
        assert "--save-states" in err and needle in err and "Traceback" not in err
    assert not os.path.exists(fresh)
    assert load_file(os.path.join(out, "model.safetensors"))["lm_head.weight"].equal(after["lm_head.weight"])
    assert cli_main([*argv, "--output-dir", out, "--overwrite"]) == 0
    table = capsys.readouterr().out
    assert "<- chosen" in table and "self_reward_after" in table and ROW_FIT_FILE in table
    assert "z_c inside the answers" in table
    inside = result["inside_answers"]
    assert inside["other_weight"] == 0.0 and inside["positions"] >= result["n_finished"]
    assert set(inside["expected_zc_draws_per_answer"]) == {"before", "after"}


def test_a_refit_from_saved_states_is_fit_rows_row_and_takes_another_grid(laser_dir, tmp_path, capsys):
    refit = load_benchmark("refit_from_states")
    out, states_file = str(tmp_path / "fitted"), str(tmp_path / "states.pt")
    argv = ["fit-row", "--model", laser_dir, "--dataset", "builtin:arithmetic", "--split", "test"]
    argv += ["--max-problems", "6", "--num-samples", "8", "--max-new-tokens", "6", "--folds", "3"]
    assert cli_main([*argv, "--output-dir", out, "--save-states", states_file, "--ridges", "0.01", "0.1"]) == 0
    capsys.readouterr()
    with open(os.path.join(out, ROW_FIT_FILE), encoding="utf-8") as f:
        fit_rows = json.load(f)

    def run(output_dir: str, *grid: str) -> dict:
        options = ["--model", laser_dir, "--states", states_file, "--output-dir", output_dir, *grid]
        refit.main(refit.make_parser().parse_args(options))
        with open(os.path.join(output_dir, ROW_FIT_FILE), encoding="utf-8") as f:
            return json.load(f)

    # fit-row's grid: its choice, its table and its row, to the last bit; every other file as fit-row saved it.
    same = run(str(tmp_path / "same"), "--ridges", "0.01", "0.1")
    assert "saved to" in capsys.readouterr().out
    assert same["chosen"] == fit_rows["chosen"] and same["cross_validation"] == fit_rows["cross_validation"]
    fitted, again = (load_file(os.path.join(d, "model.safetensors")) for d in (out, str(tmp_path / "same")))
    assert set(fitted) == set(again) and all(torch.equal(fitted[k], again[k]) for k in fitted)
    assert set(os.listdir(out)) == set(os.listdir(tmp_path / "same"))
    # Another grid: the choice is among its cells alone, and only z_c's row moves from the trained model's.
    other = run(str(tmp_path / "other"), "--ridges", "3.0", "--between-weights", "0.05")
    assert [(r["ridge"], r["between_weight"]) for r in other["cross_validation"]["table"]] == [(3.0, 0.05)]
    before = load_file(os.path.join(laser_dir, "model.safetensors"))["lm_head.weight"]
    moved = load_file(os.path.join(tmp_path / "other", "model.safetensors"))["lm_head.weight"] - before
    assert float(moved[ZC].norm()) == pytest.approx(other["step_norm"], rel=1e-5) and other["step_norm"] > 0
    assert torch.count_nonzero(moved.abs().sum(-1)) == 1
    with pytest.raises(ValueError, match="already holds files"):
        run(str(tmp_path / "other"))


def test_cli_pushes_the_fitted_model_with_its_card(laser_dir, tmp_path, uploads, capsys):
    out = str(tmp_path / "fitted")
    argv = ["fit-row", "--model", laser_dir, "--dataset", "builtin:arithmetic", "--split", "test"]
    argv += ["--max-problems", "6", "--num-samples", "8", "--max-new-tokens", "6", "--folds", "3", "--ridges", "0.1"]
    argv += ["--output-dir", out, "--push-to-hub", "--hub-model-id", "someone/laser-fit", "--hub-token", "hf_secret"]
    assert cli_main([*argv, "--hub-private"]) == 0
    assert (
        capsys.readouterr().out.splitlines()[-1]
        == "Model pushed to the Hub in https://huggingface.co/someone/laser-fit."
    )
    assert uploads.created == [
        {"repo_id": "someone/laser-fit", "token": "hf_secret", "private": True, "exist_ok": True}
    ]
    assert len(uploads) == 1 and uploads[0]["repo_id"] == "someone/laser-fit"
    files = uploads[0]["files"]
    assert {"model.safetensors", "tokenizer.json", ROW_FIT_FILE, SELF_REWARD_CONFIG_NAME, "laser_recipe.yaml"} <= set(
        files
    )
    assert not any("hf_secret" in text for text in files.values() if text)
    card, fit = files["README.md"], json.loads(files[ROW_FIT_FILE])
    # TRL's part is kept; the LaSeR section names the new repository once; the fit's section follows it, once.
    assert card.startswith("# Model Card for model") and card.count(CARD_START) == 1 and card.count(ROW_FIT_START) == 1
    assert 'from_pretrained("someone/laser-fit")' in card and "path/to/this/model" not in card
    assert "| `self_reward/auroc` | 0.6250 |" in card  # the training run's final metrics, from trainer_state.json
    section = card[card.index(ROW_FIT_START) : card.index(ROW_FIT_END)]
    chosen = fit["chosen"]
    assert f"({chosen['ridge']:g})" in section and f"{fit['n_finished']} finished samples" in section
    after = fit["fitting_samples"]["self_reward_after"]
    assert f"| LaSeR score after the fit (in-sample) | {after['auroc']:.3f} |" in section

    # Without the Hub: one line that says where the fitted model is and how to upload it later.
    def offline(self, repo_id, **kwargs):
        raise ConnectionError("Cannot reach https://huggingface.co: offline mode is enabled.")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(HfApi, "create_repo", offline)
        assert cli_main([*argv, "--overwrite"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("trl-laser fit-row: error:")]
    assert "Traceback" not in err and len(lines) == 1
    assert "offline mode" in lines[0] and f"hf upload someone/laser-fit {out}" in lines[0]
    assert os.path.isfile(os.path.join(out, "model.safetensors")) and len(uploads) == 1


def test_the_command_fits_on_training_problems_by_default():
    from trl_laser.scripts.fit_row import make_parser

    args = make_parser().parse_args(["--model", "m", "--dataset", "builtin:arithmetic"])
    assert (args.split, args.num_samples, args.folds) == ("train", 8, 5)


def error_of(capsys, *argv) -> str:
    assert cli_main(["fit-row", *argv]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("trl-laser fit-row: error:")]
    assert len(lines) == 1
    return lines[0]


def test_bad_input_is_a_one_line_error(laser_dir, tokenizer, tmp_path, capsys):
    missing = str(tmp_path / "no-model")
    base = ["--dataset", "builtin:arithmetic", "--output-dir", str(tmp_path / "never")]
    assert "--ridges" in error_of(capsys, "--model", missing, *base, "--ridges", "0")
    assert "--between-weights" in error_of(capsys, "--model", missing, *base, "--between-weights", "0")
    assert "--folds" in error_of(capsys, "--model", missing, *base, "--folds", "1")
    assert "--other-weight" in error_of(capsys, "--model", missing, *base, "--other-weight", "-1")
    assert "--output-dir" in error_of(
        capsys, "--model", laser_dir, "--dataset", "builtin:arithmetic", "--output-dir", laser_dir
    )
    assert "--hub-model-id" in error_of(capsys, "--model", laser_dir, *base, "--push-to-hub")
    assert not os.path.exists(tmp_path / "never")
    plain = str(tmp_path / "plain")
    answering_model(tokenizer).save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    line = error_of(capsys, "--model", plain, *base, "--max-problems", "5", "--max-new-tokens", "4")
    assert "self_reward_config.json" in line and "--self-reward-token" in line


def test_copies_of_a_problem_share_a_group_and_a_fold():
    from trl_laser.evaluation.summary import problem_groups
    from trl_laser.readout import grouped_folds

    records = [{"problem": text, "problem_index": i} for i, text in enumerate("abacbba")]
    groups = problem_groups(records)
    assert groups == [0, 1, 0, 2, 1, 1, 0]
    folds = grouped_folds(groups, 3, seed=0)
    assert all(
        folds[i] == folds[j] for i in range(7) for j in range(7) if records[i]["problem"] == records[j]["problem"]
    )
