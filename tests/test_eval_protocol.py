"""`trl-laser eval` beyond one run: the paper protocol, several benchmarks, prompt settings read back from the model,
inputs checked before the model loads, and resuming an interrupted run (real processes, SIGINT and SIGKILL)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import SELF_REWARD_TOKEN, answering_model
from test_eval_cli import PROBLEMS, error_of, read_samples, read_summary, run

from trl_laser.data import make_arithmetic_dataset, make_conversation
from trl_laser.evaluation import (
    Benchmark,
    grade_paper,
    graded_record,
    paper_conventions,
    paper_table,
    parse_benchmark,
    results_markdown,
    summarize,
)
from trl_laser.rewards import boxed_math_verify_reward
from trl_laser.scoring import ScoredCompletion
from trl_laser.settings import PromptSettings, SelfRewardSettings


ZC, EOS, FOUR = 7, 2, 36
BETA, C_REF = 20.0, -16.0
COLS = ["--problem-column", "question", "--answer-column", "solution"]


@pytest.fixture(scope="module")
def models(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("protocol")
    trained = str(root / "trained")
    answering_model(tokenizer).save_pretrained(trained)
    tokenizer.save_pretrained(trained)
    SelfRewardSettings(SELF_REWARD_TOKEN, ZC, BETA, C_REF, eos_token_ids=[EOS]).save_pretrained(trained)
    prompted = str(shutil.copytree(trained, root / "prompted"))
    prompt = PromptSettings("Be brief.", "Say it.", " | ", "builtin:arithmetic", 3)
    settings = SelfRewardSettings(SELF_REWARD_TOKEN, ZC, BETA, C_REF, eos_token_ids=[EOS], prompt=prompt)
    settings.chat_template_kwargs = {"unused_flag": True}
    settings.save_pretrained(prompted)
    data = root / "problems.jsonl"
    data.write_text("".join(json.dumps({"question": p, "solution": a}) + "\n" for p, a in PROBLEMS))
    return {"root": root, "trained": trained, "prompted": prompted, "data": str(data)}


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the model's weights are loaded: every input must be checked before."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr("trl_laser.evaluation.runner.load_model", refuse)


# ------------------------------------------------------------------------------------------ syntax and protocol
def test_benchmark_syntax():
    assert parse_benchmark("aime24=HuggingFaceH4/aime_2024:32,split=train") == Benchmark(
        "aime24", "HuggingFaceH4/aime_2024", 32, "train"
    )
    assert parse_benchmark("arith=builtin:arithmetic") == Benchmark("arith", "builtin:arithmetic")
    assert parse_benchmark("m=data/m.jsonl,n=3,problem_column=q,answer_column=a") == Benchmark(
        "m", "data/m.jsonl", 3, None, "q", "a"
    )
    assert parse_benchmark("gsm8k=openai/gsm8k,config=main,split=test") == Benchmark(
        "gsm8k", "openai/gsm8k", None, "test", config="main"
    )
    for bad, needle in (
        ("just/a/path", "NAME=SOURCE"),
        ("a b=x", "name"),
        ("m=x.jsonl,colour=red", "colour"),
        ("m=x.jsonl,n=0", "integer >= 1"),
        ("m=x.jsonl:0", "integer >= 1"),
        ("m=x.jsonl:-3", "integer >= 1"),  # a negative count is refused as :0 is, not read as part of the path
    ):
        with pytest.raises(ValueError, match=needle):
            parse_benchmark(bad)


def test_paper_table_by_hand():
    summaries = {
        "MATH500": {"n_problems": 2, "n_samples": 4, "accuracy": 0.5, "sv_f1_paper": 0.8, "auroc": 0.9, "ece": 0.1},
        "AIME24": {"n_problems": 1, "n_samples": 32, "accuracy": 0.25, "sv_f1_paper": 0.6, "auroc": None, "ece": 0.3},
    }
    table = paper_table(summaries, {"MATH500": 2, "AIME24": 32})
    assert table["average"] == pytest.approx({"accuracy": 0.375, "sv_f1_paper": 0.7, "auroc": None, "ece": 0.2})
    assert table["benchmarks"]["AIME24"]["n"] == 32
    md = results_markdown(table, "paper")
    assert "| | MATH500 (n=2) | AIME24 (n=32) | Avg. |" in md
    assert "| Accuracy (%) | 50.0 | 25.0 | 37.5 |" in md
    assert "| Self-verification F1 (%) | 80.0 | 60.0 | 70.0 |" in md
    assert "| AUROC | 0.900 | n/a | n/a |" in md and "| ECE | 0.100 | 0.300 | 0.200 |" in md


def test_paper_grading_is_the_official_evaluations_last_box():
    # Several boxes: the official evaluation grades the last one; the training verifier gives 0 to any of them.
    assert grade_paper("first \\boxed{3}, then \\boxed{4}", "4") == ("4", True)
    assert boxed_math_verify_reward(["first \\boxed{3}, then \\boxed{4}"], ["4"]) == [0.0]
    assert grade_paper("\\boxed{\\frac{1}{2}}", "0.5") == ("\\frac{1}{2}", True)
    assert grade_paper("\\fbox{4}", "4") == (None, False)  # found, but not unwrapped (official `remove_boxed`)
    assert grade_paper("the answer is 4", "4") == (None, False)  # no fallback to plain numbers


def test_paper_conventions_on_hand_made_samples(models, tokenizer):
    """Official conventions: a truncated response with a box is scored as if it had ended (EOS appended), one
    without a box gets 0 and counts; correctness is the official verifier (exactly one box)."""
    model = answering_model(tokenizer)
    settings = SelfRewardSettings(SELF_REWARD_TOKEN, ZC, BETA, C_REF, eos_token_ids=[EOS])
    texts = [
        ("The answer is \\boxed{4}", True, 0.9),  # finished, right: its generation-time score stays
        ("So \\boxed{4", False, None),  # truncated, unclosed box: no answer, score 0
        ("It is \\boxed{4} so", False, None),  # truncated with a box: scored with EOS appended
        ("It is 4", True, 0.7),  # finished without a box: score 0, wrong (no fallback)
        ("\\boxed{4} or \\boxed{5}", True, 0.2),  # two boxes: the official evaluation grades the last one
    ]
    problems = [{"problem": "What is 2 + 2?", "answer": "4"}]
    batch = [
        ScoredCompletion(
            0,
            i,
            t,
            tokenizer(t, add_special_tokens=False)["input_ids"] + ([EOS] if done else []),
            done,
            score,
            None,
            -1.0,
            -2.0,
        )
        for i, (t, done, score) in enumerate(texts)
    ]
    rows = [graded_record(problems[0], s, "paper") for s in batch]
    conversations = [make_conversation(problems[0]["problem"])]
    paper_conventions(model, tokenizer, settings, conversations, batch, rows, None)
    assert [r["pred"] for r in rows] == ["4", None, "4", None, "5"]
    assert [r["correct"] for r in rows] == [True, False, True, False, False]
    # Row 2 by hand: a plain full-logits forward of prompt + completion + EOS.
    prompt_ids = tokenizer.apply_chat_template(
        conversations[0], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([list(prompt_ids) + batch[2].token_ids + [EOS]])).logits[0, -1]
    expected = BETA * (torch.log_softmax(logits.double(), -1)[ZC].item() - C_REF)
    assert rows[2]["self_reward"] == pytest.approx(expected, abs=BETA * 2e-4)  # 2e-4 nats in log pi(z_c)
    assert [rows[i]["self_reward"] for i in (0, 1, 3, 4)] == [0.9, 0.0, 0.0, 0.2]
    assert [r.get("paper_convention") for r in rows] == [
        None,
        "no_box_score_0",
        "truncated_with_box_scored",
        "no_box_score_0",
        None,
    ]
    # Every sample is scored and counts: right {0.9, r_2}, wrong {0, 0, 0.2}; all wrong ones predicted wrong.
    for r in rows:
        r["answer_agreement"] = 0.0
    summary = summarize(rows, 1)
    assert summary["n_scored"] == 5
    tpr = (1 + (expected > 0.5)) / 2
    assert summary["tnr"] == 1.0 and summary["tpr"] == pytest.approx(tpr)
    assert summary["sv_f1_paper"] == pytest.approx(2 * tpr / (tpr + 1))


def test_several_benchmarks_paper_protocol(models):
    out = str(models["root"] / "multi")
    data = models["data"]
    argv = ["--model", models["trained"], "--protocol", "paper", "--benchmark", f"MATH-500={data}"]
    argv += ["--benchmark", f"aime24={data}:3", "--max-problems", "2", "--max-new-tokens", "6", *COLS]
    assert run(*argv, "--output-dir", out) == 0
    top = read_summary(out)
    config = top["config"]
    # The paper's sampling unless given: n = 2 for MATH500 by name, 3 given for aime24, 6 tokens given.
    assert (config["temperature"], config["top_p"], config["max_new_tokens"]) == (1.0, 1.0, 6)
    assert config["num_samples"] == {"MATH-500": 2, "aime24": 3} and config["protocol"] == "paper"
    for name, n in (("MATH-500", 2), ("aime24", 3)):
        samples = read_samples(os.path.join(out, name))
        summary = read_summary(os.path.join(out, name))
        assert len(samples) == 2 * n and summary["n_samples"] == 2 * n
        # This model never boxes: every sample is wrong and scored 0 by the convention, so TNR = 1, no AUROC.
        assert all(s["self_reward"] == 0.0 and not s["correct"] for s in samples)
        assert summary["accuracy"] == 0.0 and summary["tnr"] == 1.0
        assert top["benchmarks"][name]["accuracy"] == summary["accuracy"]
        assert top["benchmarks"][name]["ece"] == pytest.approx(summary["ece"])
    assert top["average"]["ece"] == pytest.approx(
        (top["benchmarks"]["MATH-500"]["ece"] + top["benchmarks"]["aime24"]["ece"]) / 2
    )
    with open(os.path.join(out, "results.md"), encoding="utf-8") as f:
        assert "| | MATH-500 (n=2) | aime24 (n=3) | Avg. |" in f.read()


def test_prompt_settings_are_read_back_from_the_model(models):
    out = str(models["root"] / "prompted-out")
    argv = ["--model", models["prompted"], "--dataset", "builtin:arithmetic", "--num-samples", "1"]
    assert run(*argv, "--max-problems", "2", "--max-new-tokens", "2", "--output-dir", out) == 0
    config = read_summary(out)["config"]
    assert (config["system_prompt"], config["instruction"], config["instruction_separator"]) == (
        "Be brief.",
        "Say it.",
        " | ",
    )
    assert (config["chat_template_kwargs"], config["dataset_seed"]) == ({"unused_flag": True}, 3)
    assert set(config["settings_from"].values()) == {"model"}
    expected = make_arithmetic_dataset("test", seed=3)["problem"][:2]
    assert [s["problem"] for s in read_samples(out)] == expected
    # An argument wins over the saved value, and says so.
    out2 = str(models["root"] / "prompted-out2")
    assert run(*argv, "--max-problems", "1", "--max-new-tokens", "2", "--instruction", "", "--output-dir", out2) == 0
    config = read_summary(out2)["config"]
    assert config["instruction"] == "" and config["settings_from"]["instruction"] == "argument"


def test_build_trainer_saves_the_prompt_settings(tiny_model_dir, tmp_path):
    from test_quickstart import QUICKSTART, SHORT

    from trl_laser.recipe import parse_args
    from trl_laser.scripts.train import build_trainer

    argv = ["--config", QUICKSTART, "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path), *SHORT]
    parsed = parse_args([*argv, "--self_reward_ref_constant", "-12", "--system_prompt", "Hi.", "--dataset_seed", "5"])
    settings = build_trainer(parsed.script_args, parsed.training_args, parsed.model_args).self_reward_settings()
    assert settings.prompt == PromptSettings("Hi.", "Answer with just the number.", "\n", "builtin:arithmetic", 5)
    assert settings.cast_lm_head_to_fp32 is False
    path = settings.save_pretrained(tmp_path / "saved")
    assert SelfRewardSettings.from_pretrained(tmp_path / "saved") == settings
    with open(path, encoding="utf-8") as f:  # a file of format 1 (no prompt block) still loads
        old = {k: v for k, v in json.load(f).items() if k not in ("prompt", "cast_lm_head_to_fp32")}
    assert SelfRewardSettings.from_dict({**old, "format_version": 1}).prompt is None


# ------------------------------------------------------------------------------------------ inputs first
def test_inputs_are_checked_before_the_model_loads(models, tmp_path, capsys, no_model_load):
    model, data = models["trained"], models["data"]
    base = ["--model", model, "--dataset", data, *COLS]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert "is a file" in error_of(capsys, *base, "--output-dir", str(a_file))
    message = error_of(capsys, *base, "--self-reward-ref-constant", "5", "--output-dir", str(tmp_path / "o"))
    assert "--self-reward-ref-constant" in message and "auto" not in message
    assert "NAME=SOURCE" in error_of(capsys, "--model", model, "--benchmark", data)
    assert "not both" in error_of(capsys, *base, "--benchmark", f"x={data}")
    message = error_of(capsys, "--model", model, "--protocol", "paper", "--benchmark", f"mine={data}", *COLS)
    assert "'mine'" in message and "mine=" in message
    assert "--top-p" in error_of(capsys, *base, "--top-p", "0")
    assert not os.path.exists(tmp_path / "o")


def test_another_runs_folder_is_refused_unless_overwrite(models, tmp_path, capsys):
    out = str(tmp_path / "out")
    base = ["--model", models["trained"], "--dataset", models["data"], *COLS, "--num-samples", "1"]
    assert run(*base, "--max-problems", "1", "--max-new-tokens", "2", "--output-dir", out) == 0
    before = {name: os.path.getmtime(os.path.join(out, name)) for name in os.listdir(out)}
    message = error_of(capsys, *base, "--max-problems", "1", "--max-new-tokens", "3", "--output-dir", out)
    assert "max_new_tokens" in message and "2 -> 3" in message and "--overwrite" in message
    assert before == {name: os.path.getmtime(os.path.join(out, name)) for name in os.listdir(out)}  # untouched
    assert run(*base, "--max-problems", "2", "--max-new-tokens", "3", "--overwrite", "--output-dir", out) == 0
    assert len(read_samples(out)) == 2 and read_summary(out)["config"]["max_new_tokens"] == 3


# ------------------------------------------------------------------------------------------ interruptions
def _command(models, out):
    argv = ["--model", models["trained"], "--dataset", models["data"], *COLS, "--num-samples", "16"]
    argv += ["--batch-size", "2", "--max-new-tokens", "12", "--output-dir", out]
    return [sys.executable, "-m", "trl_laser", "eval", *argv]


# `trl-laser eval` that stops itself (SIGSTOP) once its first new batch is on disk, before it samples the next: the test
# signals a process held at a known point. The poll for the file's growth that this replaces raced the tiny model
# (a batch in milliseconds): in whole-suite runs it saw no batch land before the run ended (3 of 3, 2026-12-02).
_PAUSED_EVAL = """
import os, signal, sys
from trl_laser.cli import main
from trl_laser.evaluation import runner

def append_batches(path, batches, write=runner.append_batches):
    def paused():
        it = iter(batches)
        yield next(it)
        os.kill(os.getpid(), signal.SIGSTOP)  # asked for the second batch: the first is on disk
        yield from it
    write(path, paused())

runner.append_batches = append_batches
sys.exit(main(sys.argv[1:]))
"""


def _default_sigint() -> None:
    """In the child, before it starts: SIGINT handled and unblocked, whatever the test process inherited."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _interrupt(command, out, sig, tmp_path) -> subprocess.CompletedProcess:
    """Run `command` until its first new batch is on disk, send `sig` there, and return the finished process."""
    command = [sys.executable, "-c", _PAUSED_EVAL, *command[3:]]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    # Files, not pipes: a full pipe would block the child before its first batch.
    with open(tmp_path / "stdout", "w+") as stdout, open(tmp_path / "stderr", "w+") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, preexec_fn=_default_sigint)
        deadline = time.time() + 300
        while process.returncode is None:
            pid, status = os.waitpid(process.pid, os.WUNTRACED | os.WNOHANG)
            if pid and os.WIFSTOPPED(status):
                process.send_signal(sig)
                process.send_signal(signal.SIGCONT)  # the signal is delivered as the process runs on
                process.wait(timeout=120)
            elif pid:  # it ended before its first batch: the failure to show
                process.returncode = os.waitstatus_to_exitcode(status)
            else:
                assert time.time() < deadline, "the eval wrote no batch in 300 s"
                time.sleep(0.05)
        stdout.seek(0)
        stderr.seek(0)
        return subprocess.CompletedProcess(command, process.returncode, stdout.read(), stderr.read())


def test_interrupted_runs_resume_to_the_uninterrupted_result(models, tmp_path, capsys):
    reference = str(tmp_path / "reference")
    assert run(*_command(models, reference)[4:]) == 0
    out = str(tmp_path / "interrupted")
    total = len(PROBLEMS) * 16

    stopped = _interrupt(_command(models, out), out, signal.SIGINT, tmp_path)
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr, stopped.stderr[-2000:]
    assert "run the same command again to resume" in stopped.stderr
    kept = len(read_samples(out))
    assert kept == 2 < total  # the batch on disk when the signal came, and no more

    killed = _interrupt(_command(models, out), out, signal.SIGKILL, tmp_path)
    assert killed.returncode == -signal.SIGKILL
    assert f"Resuming the run in {out}: {kept} of {total} samples already there." in killed.stdout
    assert len(read_samples(out)) == kept + 2

    capsys.readouterr()
    assert run(*_command(models, out)[4:]) == 0  # the last part in this process, as the reference
    assert sum("Resuming the run" in line for line in capsys.readouterr().out.splitlines()) == 1
    assert read_samples(out) == read_samples(reference)
    summary, expected = read_summary(out), read_summary(reference)
    for s in (summary, expected):
        s["config"].pop("generation_seconds")
    assert summary == expected


def test_paper_table_reports_an_empty_class_f1_as_the_official_code():
    # AIME24: every sample wrong, so TPR is undefined; the official code reports F1 0.0 and averages it in.
    summaries = {
        "MATH500": {"n_problems": 2, "n_samples": 4, "accuracy": 0.5, "sv_f1_paper": 0.8, "auroc": 0.9, "ece": 0.1},
        "AIME24": {"n_problems": 1, "n_samples": 32, "accuracy": 0.0, "sv_f1_paper": None, "auroc": None, "ece": 0.3},
    }
    table = paper_table(summaries, {"MATH500": 2, "AIME24": 32})
    assert table["benchmarks"]["AIME24"]["sv_f1_paper"] == 0.0
    assert table["benchmarks"]["AIME24"]["sv_f1_paper_undefined"] is True
    assert table["benchmarks"]["MATH500"]["sv_f1_paper_undefined"] is False
    assert table["average"]["sv_f1_paper"] == pytest.approx(0.4)
    assert "| Self-verification F1 (%) | 80.0 | 0.0 | 40.0 |" in results_markdown(table, "paper")


def test_a_finished_run_resumes_to_nothing_whatever_its_batch_size():
    from trl_laser.evaluation.sampling import sample_batches

    # 1 problem x 3 samples in batches of 2: the finished run stopped at 3, not a multiple of the batch size.
    assert (
        list(sample_batches(None, None, None, [{"problem": "p", "answer": "1"}], [[]], 3, batch_size=2, start=3)) == []
    )
