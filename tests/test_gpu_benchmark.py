"""The GPU benchmark (`benchmarks/gpu.py`) dry-run on CPU, so that the one prepared GPU command never rots: every
section runs on a tiny random model and the JSON has every key. Plus its pure parts, and the wheel bundle's plan."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from conftest import load_benchmark as load


gpu = load("gpu")
gpu_arms = load("gpu_arms")
workload = load("gpu_workload")
bundle = load("gpu_bundle")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[dict, str]:
    output = tmp_path_factory.mktemp("gpu") / "gpu.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--dry-run", "--output", str(output)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(output, encoding="utf-8") as f:
        return json.load(f), proc.stdout


def test_dry_run_runs_every_section_and_writes_every_key(dry_run):
    result, stdout = dry_run
    for key in gpu.REQUIRED_KEYS:
        assert key in result, key
    for key in ("step_time_ratio", "step_time_ratio_mixing", "peak_memory_ratio", "bf16_score_max_abs_err"):
        assert isinstance(result[key], float), key
    sections = result["sections"]
    ran = ("overhead", "bf16", "zero3") if importlib.util.find_spec("deepspeed") else ("overhead", "bf16")
    assert {name: sections[name]["status"] for name in ran} == dict.fromkeys(ran, "ran")
    if torch.cuda.is_available():
        assert sections["liger"]["status"] == "ran"
    else:  # Liger needs Triton on a GPU: the arm still trains, without it, and says why
        assert sections["liger"]["status"] == "skipped" and "GPU" in sections["liger"]["reason"]
        assert result["liger_ok"] is None and result["arms"]["liger"]["liger_kernel"] is False
    assert set(result["arms"]) == set(gpu.ARMS)
    assert result["identical_batches"] is True and len(result["identical_batches_pairs"]) == 3
    assert "written to" in stdout


def test_dry_run_checks_the_forwards_and_the_score(dry_run):
    result, _ = dry_run
    arms = result["arms"]
    assert arms["grpo"]["logp_forwards_per_generation_batch"] == 1.0
    assert arms["laser"]["phases"] == [1.0] and arms["laser_mixing"]["phases"] == [2.0]
    assert arms["laser_mixing"]["logp_forwards_per_generation_batch"] == 2.0  # the extra no-grad forward
    check = arms["fused_head"]["check"]
    assert check["finished"] > 0
    assert 0 <= result["bf16_score_max_abs_err"] < 0.05  # bf16 on a tiny model: well inside the goal
    assert check["plain_forward_dtype"] == "bfloat16" and check["plain_forward_score_max_abs_err"] >= 0
    assert check["mean_score_moved"] > 0  # a constant reward of 1: only LaSeR's term moves z_c, upwards


def test_dry_run_zero3_saves_reloads_and_scores(dry_run):
    pytest.importorskip("deepspeed", reason="the test extra installs deepspeed")
    result, _ = dry_run
    zero3 = result["zero3"]
    assert result["zero3_ok"] is True and zero3["self_reward_config_saved"]
    assert zero3["parameters_saved"] == zero3["parameters_trained"]
    assert zero3["score_max_abs_err"] < 1e-4  # fp32 on a CPU: reloaded and trained score agree


def test_scripted_rollouts_are_deterministic_and_well_formed():
    rollout = workload.ScriptedRollout(vocab=100, eos_token_id=1, prompt_length=8, completion_length=12, seed=3)
    prompts = ["a", "a", "a", "b"] * 8
    first, again = rollout(prompts), rollout(prompts)
    assert first == again and first["logprobs"] is None
    assert first["completion_ids"][0] != first["completion_ids"][1]  # copies of one prompt: different completions
    assert first["prompt_ids"][0] != first["prompt_ids"][1]
    specials = set(range(len(workload.SPECIAL_TOKENS)))
    for prompt, completion in zip(first["prompt_ids"], first["completion_ids"]):
        assert 6 <= len(prompt) <= 8 and not specials & set(prompt)
        finished = completion[-1] == 1
        assert not specials & set(completion[:-1] if finished else completion)
        assert 3 <= len(completion) <= 12 and (finished or len(completion) == 12)
    assert any(c[-1] != 1 for c in first["completion_ids"])  # some truncated
    assert any(c[-1] == 1 for c in first["completion_ids"])


def test_word_tokenizer_and_random_model_agree():
    tokenizer = workload.word_tokenizer(64)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<z_c>")) == (0, 1, 3)
    assert tokenizer("w5 w63")["input_ids"] == [5, 63]
    model = workload.random_model("tiny", tokenizer, torch.float32, seed=0)
    again = workload.random_model("tiny", tokenizer, torch.float32, seed=0)
    assert model.get_input_embeddings().num_embeddings == workload.SHAPES["tiny"]["vocab_size"]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_finished_rows_reads_z_c_after_each_eos():
    # Two rows, prompt width 3 (row 1 left-padded), completion width 4 (row 0: "7 EOS z_c", row 1 truncated).
    zc, eos, pad = 3, 1, 0
    first = {
        "input_ids": torch.tensor([[10, 11, 12, 7, eos, zc, pad], [pad, 20, 21, 8, 9, 9, 9]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1]]),
        "logits_to_keep": 4,
        "logps": torch.tensor([[-1.0, -2.0, -15.5, 0.0], [-1.0, -1.0, -1.0, -1.0]]),
    }
    prompts, completions, logps = gpu_arms.finished_rows(first, zc)
    assert (prompts, completions, logps) == ([[10, 11, 12]], [[7, eos]], [-15.5])


def test_plan_puts_liger_last_or_alone():
    assert gpu.plan_workers(list(gpu.SECTIONS), rounds=2, liger_alone=True) == [
        ["grpo", "laser", "laser_mixing", "fused_head", "grpo", "laser", "laser_mixing"],
        ["liger"],
    ]
    assert gpu.plan_workers(["liger"], rounds=1, liger_alone=False) == [["fused_head", "liger"]]
    assert gpu.plan_workers(["overhead"], rounds=1, liger_alone=True) == [["grpo", "laser", "laser_mixing"]]


def test_section_status_reports_missing_arms_and_short_rounds():
    runs = [{"arm": name} for name in ("grpo", "laser", "laser_mixing", "fused_head")]
    arms = ["grpo", "laser", "laser_mixing", "fused_head", "grpo", "laser", "laser_mixing"]
    status = gpu.section_status(["overhead", "bf16", "liger"], arms, runs, [], None, ["...\n"])
    assert status["bf16"] == {"status": "ran"}
    assert status["overhead"]["status"] == "ran" and status["overhead"]["note"] == "3 later run(s) not done: timed out"
    assert "liger" not in status  # not this worker's
    crash = [{"arm": "laser", "round": 0, "error": "Traceback ...\nValueError: bad\n"}]
    failed = gpu.section_status(["overhead"], arms, runs[:1], crash, 0, ["Traceback\n"])["overhead"]
    assert failed["status"] == "failed"
    assert (
        failed["reason"]
        == "arms not done: ['laser', 'laser_mixing']; laser failed: ValueError: bad; exited with status 0"
    )
    assert failed["log_tail"] == "Traceback\n"


def test_liger_verdict_needs_kernels_finite_losses_and_a_moving_score():
    arm = {"liger_kernel": True, "liger_applied": True, "losses_finite": True, "check": {"mean_score_moved": 0.2}}
    assert gpu.liger_verdict({"liger": arm})[0] is True
    assert gpu.liger_verdict({"liger": {**arm, "check": {"mean_score_moved": 0.0}}})[0] is False
    assert gpu.liger_verdict({"liger": {**arm, "liger_applied": False}})[0] is False
    skipped = {"liger_kernel": False, "liger_skipped": "no GPU"}
    assert gpu.liger_verdict({"liger": skipped}) == (None, "no GPU")


def test_bundle_covers_what_the_device_lacks():
    # Every requirement of the package (and its extras for the GPU check) is either on the device image or pinned.
    missing = bundle.uncovered(bundle.package_requirements(os.path.join(ROOT, "setup.cfg")))
    assert missing == []
    # The GPU check runs the TRL and transformers this suite tests (their pins); transitive pins (pydantic ...) only
    # need to satisfy the requirements above, whatever a fresh install here resolves them to.
    for name, version in ((n, v) for n, v in bundle.PINS.items() if n in ("trl", "transformers")):
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        assert installed == version, name
