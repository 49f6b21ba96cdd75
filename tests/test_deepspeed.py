"""`trl-laser train` under DDP, DeepSpeed ZeRO-2/ZeRO-3 and two loopback "machines", for real, on CPU with gloo.

Every launch runs in its own process group with a bounded timeout, and the group is killed whatever happens, so no
rank outlives its test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from conftest import answering_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_laser import score_completions
from trl_laser.cli import main as cli_main
from trl_laser.settings import SELF_REWARD_CONFIG_NAME


pytest.importorskip("deepspeed", reason="the test extra installs deepspeed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "recipes", "quickstart", "laser", "config_smollm2_arithmetic.yaml")
# The quickstart recipe on a tiny model: one generation batch of 2 prompts x 4 completions over 2 processes.
# The recipe's least-squares row update (and so its row-only MSE) does not run under DeepSpeed: the optimizer trains
# z_c's row here.
SHORT = [
    "--per_device_train_batch_size",
    "4",
    "--gradient_accumulation_steps",
    "1",
    "--num_generations",
    "4",
    "--max_completion_length",
    "8",
    "--self_reward_warmup_steps",
    "1",
    "--self_reward_row_update",
    "optimizer",
    "--self_reward_row_only",
    "false",
]
TIMEOUT = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*commands: list[str], timeout: float = TIMEOUT, cwd=None) -> list[tuple[int, str]]:
    """Run the commands side by side, each in its own process group; every group is killed on the way out."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=cwd
        )
        for cmd in commands
    ]
    deadline = time.monotonic() + timeout
    try:
        return [(p.wait(max(deadline - time.monotonic(), 1)), p.stdout.read()) for p in procs]
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
            p.stdout.close()


def train_command(model_dir, output_dir, *extra: str) -> list[str]:
    command = [sys.executable, "-m", "trl_laser", "train", "--config", QUICKSTART, "--model_name_or_path", model_dir]
    return [*command, "--output_dir", str(output_dir), *SHORT, *extra]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """A tiny model that answers "4", "44", ... with a context-dependent z_c logit: text that survives decoding."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = str(tmp_path_factory.mktemp("answering") / "model")
    answering_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "model.safetensors"))


def log_at(output_dir, step: int) -> dict:
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        entries = [e for e in json.load(f)["log_history"] if e.get("step") == step and "loss" in e]
    assert len(entries) == 1
    return entries[0]


def test_zero3_trains_checkpoints_resumes_and_scores_like_training(model_dir, tmp_path):
    first, resumed = tmp_path / "run", tmp_path / "resumed"
    dist = ["--accelerate_config", "zero3", "--num_processes", "2"]
    steps = ["--max_steps", "3", "--save_strategy", "steps", "--save_steps", "2", "--log_completions", "true"]
    [(status, out)] = launch(train_command(model_dir, first, *steps, *dist))
    assert status == 0, out[-6000:]
    assert "No GPU here: the launch runs on CPU, with gloo and fp32" in out
    assert "zero3.yaml --num_processes 2 --mixed_precision no" in out

    # Full weights, loadable by plain transformers; the settings, the recipe and the card beside them.
    for name in (SELF_REWARD_CONFIG_NAME, "laser_recipe.yaml", "README.md", "config.json", "tokenizer.json"):
        assert os.path.isfile(first / name), name
    final = weights(first)
    initial = weights(model_dir)
    assert {k: v.shape for k, v in final.items()} == {k: v.shape for k, v in initial.items()}
    assert max((final[k] - initial[k]).abs().max().item() for k in initial) > 0
    assert AutoModelForCausalLM.from_pretrained(first).num_parameters() == sum(v.numel() for v in initial.values())
    log = log_at(first, 3)
    assert log["self_reward/phase"] == 2.0 and log["self_reward/c_ref"] < 0  # mixing after 1 warm-up step

    # Resume from checkpoint-2 elsewhere: c_ref, phase, step, RNG and the Adam state carry on; step 3 is the same.
    checkpoint = first / "checkpoint-2"
    assert os.path.isfile(checkpoint / SELF_REWARD_CONFIG_NAME)
    resume = ["--resume_from_checkpoint", str(checkpoint)]
    [(status, out)] = launch(train_command(model_dir, resumed, *steps, *resume, *dist))
    assert status == 0, out[-6000:]
    again = weights(resumed)
    for name in final:
        torch.testing.assert_close(again[name], final[name], atol=1e-6, rtol=0, msg=name)
    resumed_log = log_at(resumed, 3)
    for key in ("loss", "self_reward/c_ref", "self_reward/phase", "self_reward/mse", "self_reward/w_correct"):
        assert resumed_log[key] == pytest.approx(log[key], rel=1e-5, abs=1e-7), key

    # Step 3 scored its completions with the weights of checkpoint-2: scoring them after the fact gives the same.
    table = pd.read_parquet(first / "completions" / "completions_00003.parquet")
    assert len(table) == 8
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    finished = table[table["self_reward"].notna()]
    assert len(finished) >= 4
    prompts = [list(p) for p in finished["prompt"]]
    # TRL logs the completion text without its EOS; the EOS text makes it the finished completion that was scored.
    completions = [c[0]["content"] + tokenizer.eos_token for c in finished["completion"]]
    scores = score_completions(model, tokenizer, prompts, completions, settings=str(checkpoint))
    assert scores == pytest.approx(finished["self_reward"].tolist(), abs=1e-4)


@pytest.mark.parametrize("config", ["ddp", "zero2"])
def test_ddp_and_zero2_train_and_save(model_dir, tmp_path, config):
    out_dir = tmp_path / config
    command = train_command(model_dir, out_dir, "--max_steps", "1", "--self_reward_warmup_steps", "0")
    # The refit after training: each process releases its training state (under ZeRO-2 the DeepSpeed engine's), the
    # main one fits while the other waits, then both end.
    command += ["--fit_row_problems", "5"]
    [(status, out)] = launch(command + ["--accelerate_config", config, "--num_processes", "2"])
    assert status == 0, out[-6000:]
    assert out.count(f"Model with the refitted row saved to {out_dir}-fit.") == 1
    assert os.path.isfile(f"{out_dir}-fit/row_fit.json") and os.path.isfile(f"{out_dir}-fit/model.safetensors")
    assert f"{config}.yaml --num_processes 2 --mixed_precision no" in out and "--ddp_backend gloo" in out
    assert ("--use_cpu true" in out) == (config == "ddp")  # DeepSpeed picks its CPU accelerator itself
    final, initial = weights(out_dir), weights(model_dir)
    assert max((final[k] - initial[k]).abs().max().item() for k in initial) > 0
    for name in (SELF_REWARD_CONFIG_NAME, "laser_recipe.yaml", "README.md"):
        assert os.path.isfile(out_dir / name), name
    log = log_at(out_dir, 1)  # the class counts cover the whole generation batch: 8 completions over 2 processes
    finished = log["self_reward/n_correct"] + log["self_reward/n_incorrect"]
    assert finished == pytest.approx(8 * (1 - log["self_reward/frac_truncated"]))


def test_two_machines_over_loopback(model_dir, tmp_path):
    out_dir = tmp_path / "multinode"
    command = train_command(model_dir, out_dir, "--max_steps", "1", "--self_reward_warmup_steps", "0")
    command += ["--accelerate_config", "zero3_multinode", "--num_machines", "2", "--num_processes", "2"]
    command += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    results = launch(command + ["--machine_rank", "0"], command + ["--machine_rank", "1"])
    for status, out in results:
        assert status == 0, out[-6000:]
    final, initial = weights(out_dir), weights(model_dir)
    assert max((final[k] - initial[k]).abs().max().item() for k in initial) > 0
    assert os.path.isfile(out_dir / SELF_REWARD_CONFIG_NAME)
    # Only the main node saves and reports; the other node says it trained.
    assert "saved to" in results[0][1] and "saved to" not in results[1][1]


def test_a_failing_rank_ends_the_others(model_dir, tmp_path):
    (tmp_path / "rank_rewards.py").write_text(
        "import os\n\n\n"
        "def fail_on_rank_one(completions, **kwargs):\n"
        "    if os.environ.get('RANK') == '1':\n"
        "        raise RuntimeError('reward server unreachable on rank 1')\n"
        "    return [0.0] * len(completions)\n"
    )
    command = train_command(model_dir, tmp_path / "out", "--max_steps", "2")
    command += [
        "--reward_funcs",
        "rank_rewards.fail_on_rank_one",
        "--accelerate_config",
        "zero3",
        "--num_processes",
        "2",
    ]
    start = time.monotonic()
    # Reward modules are imported from the working directory, as in TRL's scripts.
    [(status, out)] = launch(command, timeout=150, cwd=tmp_path)
    assert status != 0
    assert "reward server unreachable on rank 1" in out
    # the launcher's own report is one line naming the rank, not torch.distributed's banner
    assert re.search(r"trl-laser train: error: the launched process of rank \d failed \(exit code -?\d+\)", out)
    assert "ChildFailedError" not in out
    assert time.monotonic() - start < 150


def test_bf16_under_deepspeed_without_gpu_is_refused_before_launch(model_dir, tmp_path, capsys):
    argv = ["train", "--config", QUICKSTART, "--model_name_or_path", model_dir, "--output_dir", str(tmp_path / "o")]
    argv += ["--bf16", "true", "--use_cpu", "true", "--accelerate_config", "zero3", "--num_processes", "2"]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "`bf16: true` cannot train under DeepSpeed on a machine without a GPU" in err
    assert "Traceback" not in err and not os.path.exists(tmp_path / "o")


def test_ds3_gather_for_generation_false_is_refused_at_start(model_dir, tmp_path):
    command = train_command(model_dir, tmp_path / "o", "--max_steps", "1", "--ds3_gather_for_generation", "false")
    [(status, out)] = launch(command + ["--accelerate_config", "zero3", "--num_processes", "2"], timeout=150)
    assert status != 0
    assert "`ds3_gather_for_generation: false` under DeepSpeed ZeRO-3 without vLLM" in out
    assert not os.path.exists(tmp_path / "o" / "model.safetensors")
