"""Resuming never loses work or lies, and the distributed launch never leaves processes behind or hangs (issue 19).

Runs are real `trl-laser train` runs of the tiny model of conftest; the launch tests start real launchers with their
accelerate-launched processes and send them real signals, looking the processes up by pid. No test sends traffic
beyond loopback: addresses that are not this machine's are only bound to (refused by the kernel, nothing is sent), and
the reachability of another machine is checked against a stand-in for `socket.create_connection`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from types import SimpleNamespace

import psutil
import pytest
from test_user_errors_cli import QUICKSTART, ROOT, SAVE_EVERY_STEP, SHORT, TRAIN_ENV, error_lines, folder_digest

from trl_laser import LaSeRConfig
from trl_laser.cli import main as cli_main
from trl_laser.hub import RECIPE_FILE
from trl_laser.launch import LaunchError, check_main_process_address, launch_plan
from trl_laser.row_update import ROW_STATE_NAME
from trl_laser.run_dir import checkpoint_problem, is_complete, latest_checkpoint


# The paper's row update, for runs under DeepSpeed or across processes: the recipe's least-squares row does not run
# there (and a row-only MSE needs it).
OPTIMIZER_ROW = ["--self_reward_row_update", "optimizer", "--self_reward_row_only", "false"]


def train_cli(argv, capsys) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of `trl-laser train ARGV` run in this process."""
    try:
        code = cli_main(["train", *argv])
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_argv(model_dir, out, *extra: str) -> list[str]:
    return ["--config", QUICKSTART, "--model_name_or_path", model_dir, "--output_dir", str(out), *SHORT, *extra]


def trained_run(model_dir, out, *extra: str) -> str:
    """A run trained to its end by `trl-laser train` in this process, a checkpoint per step."""
    assert cli_main(["train", *run_argv(model_dir, out, *SAVE_EVERY_STEP, *extra)]) == 0
    return str(out)


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory) -> str:
    """2 steps of the quickstart recipe (constant learning rate, least-squares row update): checkpoint-1 and -2."""
    return trained_run(tiny_model_dir, tmp_path_factory.mktemp("constant") / "run", "--max_steps", "2")


@pytest.fixture
def run_copy(finished_run, tmp_path) -> str:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return str(copy)


# ---------------------------------------------------------------------------------------------------- finished runs
def test_resuming_a_finished_run_says_so_and_changes_nothing(tiny_model_dir, run_copy, capsys):
    before = folder_digest(run_copy)
    argv = run_argv(tiny_model_dir, run_copy, *SAVE_EVERY_STEP, "--max_steps", "2", "--resume_from_checkpoint", "true")
    code, out, err = train_cli(argv, capsys)
    assert code == 0
    assert (
        f"[trl-laser] The run is finished: {run_copy}/checkpoint-2 is at step 2 and `max_steps` gives 2 steps, so "
        "there is nothing to resume" in out
    )
    assert "raise `max_steps`" in out and "Traceback" not in err
    assert folder_digest(run_copy) == before


def test_a_larger_max_steps_on_a_constant_schedule_continues_the_run(tiny_model_dir, run_copy, capsys):
    argv = run_argv(tiny_model_dir, run_copy, *SAVE_EVERY_STEP, "--max_steps", "3", "--resume_from_checkpoint", "true")
    code, _, err = train_cli(argv, capsys)
    assert code == 0, err
    with open(os.path.join(run_copy, "trainer_state.json")) as f:
        state = json.load(f)
    assert state["global_step"] == 3
    assert [e["learning_rate"] for e in state["log_history"] if "loss" in e] == [2e-5] * 3
    # the saved recipe says what ran: the command of the first 2 steps, then the one that resumed at step 2
    with open(os.path.join(run_copy, RECIPE_FILE)) as f:
        recipe = f.read()
    first, resumed = recipe.split(f"# Resumed from {run_copy}/checkpoint-2 (step 2) with:\n")
    assert "--max_steps 2" in first.splitlines()[0] and "--resume_from_checkpoint" not in first
    assert "--max_steps 3" in resumed and "--resume_from_checkpoint true" in resumed


# ---------------------------------------------------------------------------------------------------- incomplete
def truncate(path) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize(
    "name, problem",
    [
        ("optimizer.pt", "its optimizer.pt is missing (resuming from it would continue with a fresh optimizer)"),
        (
            "scheduler.pt",
            "its scheduler.pt is missing (resuming from it would continue with its learning-rate schedule",
        ),
        ("rng_state.pth", "its rng_state.pth is missing"),
        (ROW_STATE_NAME, f"its {ROW_STATE_NAME} is missing"),
        ("model.safetensors", "its model.safetensors is cut short (the run stopped while writing it)"),
        ("optimizer.pt.cut", "its optimizer.pt is cut short"),
    ],
)
def test_a_given_incomplete_checkpoint_is_refused_naming_the_file(tiny_model_dir, run_copy, capsys, name, problem):
    checkpoint = os.path.join(run_copy, "checkpoint-2")
    if name.endswith(".cut") or name == "model.safetensors":
        truncate(os.path.join(checkpoint, name.removesuffix(".cut")))
    else:
        os.remove(os.path.join(checkpoint, name))
    before = folder_digest(run_copy)
    argv = run_argv(tiny_model_dir, run_copy, "--max_steps", "3", "--resume_from_checkpoint", checkpoint)
    code, _, err = train_cli(argv, capsys)
    assert code == 2 and "Traceback" not in err and "SafetensorError" not in err
    [line] = error_lines(err)
    assert f"`resume_from_checkpoint` '{checkpoint}' cannot continue its run: {problem}" in line
    assert f"its earlier complete checkpoint is {run_copy}/checkpoint-1" in line
    assert folder_digest(run_copy) == before


def test_the_latest_checkpoint_skips_one_with_weights_cut_short(tiny_model_dir, run_copy, capsys):
    truncate(os.path.join(run_copy, "checkpoint-2", "model.safetensors"))
    argv = run_argv(tiny_model_dir, run_copy, *SAVE_EVERY_STEP, "--max_steps", "2", "--resume_from_checkpoint", "true")
    code, out, err = train_cli(argv, capsys)
    assert code == 0, err
    assert (
        f"[trl-laser] Skipping {run_copy}/checkpoint-2: its model.safetensors is cut short (the run stopped while "
        f"writing it); resuming from {run_copy}/checkpoint-1." in out
    )
    assert "Traceback" not in err and checkpoint_problem(os.path.join(run_copy, "checkpoint-2")) is None  # rewritten


def test_the_latest_checkpoint_skips_one_without_its_states(run_copy):
    os.remove(os.path.join(run_copy, "checkpoint-2", "optimizer.pt"))
    said = []
    assert latest_checkpoint(run_copy, say=said.append) == os.path.join(run_copy, "checkpoint-1")
    assert said == [
        f"[trl-laser] Skipping {run_copy}/checkpoint-2: its optimizer.pt is missing (resuming from it would continue "
        f"with a fresh optimizer); resuming from {run_copy}/checkpoint-1."
    ]
    os.remove(os.path.join(run_copy, "checkpoint-1", ROW_STATE_NAME))
    assert latest_checkpoint(run_copy, say=said.append) == os.path.join(run_copy, "checkpoint-1")
    with pytest.raises(Exception, match="holds no complete checkpoint-N folder"):
        latest_checkpoint(run_copy, say=said.append, row_update=True)


# ---------------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize(
    "change, listed",
    [
        (["--learning_rate", "1e-5"], "`learning_rate` is 1e-05 here but 2e-05 in the checkpoint"),
        (["--lr_scheduler_type", "cosine"], "`lr_scheduler_type` is 'cosine' here but 'constant' in the checkpoint"),
        (["--warmup_steps", "1"], "`warmup_steps` is 1.0 here but 0 in the checkpoint"),
    ],
)
def test_resuming_with_another_schedule_is_refused_listing_it(tiny_model_dir, run_copy, capsys, change, listed):
    before = folder_digest(run_copy)
    argv = run_argv(tiny_model_dir, run_copy, "--max_steps", "3", "--resume_from_checkpoint", "true", *change)
    code, _, err = train_cli(argv, capsys)
    assert code == 2 and "Traceback" not in err
    [line] = error_lines(err)
    assert f"Resuming from {run_copy}/checkpoint-2 with a learning-rate schedule other than the one it was" in line
    assert listed in line and "Resume with the checkpoint's values, or start a new run" in line
    assert folder_digest(run_copy) == before


def test_a_longer_run_on_a_decaying_schedule_is_refused(tiny_model_dir, tmp_path, capsys):
    run = trained_run(tiny_model_dir, tmp_path / "run", "--max_steps", "1", "--lr_scheduler_type", "linear")
    capsys.readouterr()
    before = folder_digest(run)
    resume = ["--lr_scheduler_type", "linear", "--resume_from_checkpoint", "true"]
    code, _, err = train_cli(run_argv(tiny_model_dir, run, "--max_steps", "4", *resume), capsys)
    assert code == 2 and "Traceback" not in err
    [line] = error_lines(err)
    assert "`max_steps` is 4 here but 1 in the checkpoint" in line
    assert "Its `lr_scheduler_type: linear` schedule depends on the run's length" in line
    # the same command: finished, and said that a longer run starts afresh
    code, out, err = train_cli(run_argv(tiny_model_dir, run, "--max_steps", "1", *resume), capsys)
    assert code == 0 and "The run is finished" in out and "`lr_scheduler_type: linear` schedule has ended" in out
    assert folder_digest(run) == before


def test_resume_with_other_self_reward_settings_is_a_usage_error(tiny_model_dir, run_copy, capsys):
    """Found by the trainer while it sets the resume up, after the model has loaded: exit 2 as any usage error."""
    before = folder_digest(run_copy)
    argv = run_argv(tiny_model_dir, run_copy, "--max_steps", "3", "--resume_from_checkpoint", "true")
    code, _, err = train_cli([*argv, "--self_reward_beta", "0.2"], capsys)
    assert code == 2 and "Traceback" not in err
    [line] = error_lines(err)
    assert "`self_reward_beta` is 0.2 here but 0.1 in the checkpoint" in line
    assert folder_digest(run_copy) == before


# ---------------------------------------------------------------------------------------------------- launches
def launcher(argv, log_path) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "trl_laser", "train", *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**TRAIN_ENV, "PYTHONPATH": os.pathsep.join(sys.path)},
            cwd=ROOT,
            start_new_session=True,
        )


def end_all(processes: list[psutil.Process]) -> list[psutil.Process]:
    """The processes still alive, which are then killed (so that no test leaves one)."""
    alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        p.kill()
    return alive


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_the_launched_processes_end_with_the_launcher(tiny_model_dir, tmp_path, sig):
    """SIGKILL (the OOM killer, a scheduler's hard kill) leaves no process training; SIGINT stops them all, and the
    launcher says so in one line."""
    out = tmp_path / "run"
    argv = run_argv(tiny_model_dir, out, *SAVE_EVERY_STEP, "--max_steps", "50", *OPTIMIZER_ROW)
    argv += ["--per_device_train_batch_size", "4", "--accelerate_config", "ddp", "--num_processes", "2"]
    process = launcher(argv, tmp_path / "log.txt")
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 150
        while not is_complete(str(out / "checkpoint-1")):  # both processes train
            assert process.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.2)
        workers = psutil.Process(process.pid).children(recursive=True)
        assert len([w for w in workers if "train.py" in " ".join(w.cmdline())]) == 2
        os.kill(process.pid, sig)
        status = process.wait(timeout=60)
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"left running: {[p.pid for p in alive]}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        end_all(workers)
    if sig == signal.SIGINT:
        log = (tmp_path / "log.txt").read_text()
        assert status == 130 and "Traceback" not in log
        [line] = [line for line in log.splitlines() if line.startswith("trl-laser train: interrupted")]
        assert line.startswith("trl-laser train: interrupted. Its latest checkpoint is ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigint_ends_a_launch_waiting_for_another_machine(tiny_model_dir, tmp_path):
    pytest.importorskip("deepspeed", reason="the test extra installs deepspeed")
    argv = run_argv(tiny_model_dir, tmp_path / "run", "--max_steps", "1", *OPTIMIZER_ROW)
    argv += ["--per_device_train_batch_size", "4", "--accelerate_config", "zero3_multinode", "--num_machines", "2"]
    argv += ["--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    process = launcher([*argv, "--machine_rank", "0"], tmp_path / "log.txt")  # machine 1 never comes
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while "[trl-laser] accelerate launch" not in (tmp_path / "log.txt").read_text():
            assert process.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "no launch in time"
            time.sleep(0.2)
        time.sleep(8)  # inside torch.distributed's rendezvous, which waits 15 minutes for machine 1
        assert process.poll() is None
        children = psutil.Process(process.pid).children(recursive=True)
        start = time.monotonic()
        os.kill(process.pid, signal.SIGINT)
        assert process.wait(timeout=30) == 130
        assert time.monotonic() - start < 15
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = (tmp_path / "log.txt").read_text()
    assert "trl-laser train: interrupted" in log and "Traceback" not in log
    assert not end_all(children)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "launch, needle",
    [
        (["--accelerate_config", "zero3_multinode"], "(the config's `main_process_ip: 10.0.0.1` is a placeholder)"),
        (["--accelerate_config", "zero3_multinode", "--main_process_ip", "192.0.2.1"], "is not an address of this"),
        (["--accelerate_config", "ddp", "--machine_rank", "1"], "`--machine_rank 1` is the rank of this machine in a"),
        (["--machine_rank", "1"], "launch with a multi-node config (`--accelerate_config zero3_multinode`, or"),
        (["--accelerate_config", "zero3_multinode", "--machine_rank", "2"], "`--machine_rank` must be in 0..1"),
        (
            ["--accelerate_config", "zero3", "--ds3_gather_for_generation", "false"],
            "`ds3_gather_for_generation: false`",
        ),
        (["--accelerate_config", "zero2"], "Set `self_reward_row_update: optimizer`, or train without DeepSpeed."),
        (
            ["--accelerate_config", "zero2", "--self_reward_row_only", "true"],
            "Set `self_reward_row_update: optimizer` and `self_reward_row_only: false`, or train without DeepSpeed.",
        ),
    ],
)
def test_launches_that_cannot_work_are_refused_before_any_process_starts(tmp_path, capsys, launch, needle):
    if "--accelerate_config" in launch and launch[launch.index("--accelerate_config") + 1] != "ddp":
        pytest.importorskip("deepspeed", reason="the test extra installs deepspeed")
    out = tmp_path / "run"
    argv = ["--config", QUICKSTART, "--output_dir", str(out), "--num_processes", "2", *launch]
    if "zero2" not in launch:
        argv += [*OPTIMIZER_ROW]
    code, printed, err = train_cli(argv, capsys)
    assert code == 2 and "Traceback" not in err
    [line] = error_lines(err)
    assert needle in line
    assert "ddp_backend" not in line and "[trl-laser] accelerate launch" not in printed and not out.exists()


def test_machine_rank_above_zero_checks_that_machine_zero_is_reachable(monkeypatch):
    """Another machine's address is reachable (a refused connection: up, not listening yet) or refused before the
    launch; the stand-in connection sends nothing."""
    attempts = []

    def connect(address, timeout):
        attempts.append((address, timeout))
        raise errors.pop()

    monkeypatch.setattr(socket, "create_connection", connect)
    errors = [ConnectionRefusedError(111, "Connection refused")]
    check_main_process_address("192.0.2.1", 29500, machine_rank=1)
    errors = [TimeoutError(None, None)]
    with pytest.raises(LaunchError, match=r"`--main_process_ip 192.0.2.1` \(port 29500\): machine 0 is not reach"):
        check_main_process_address("192.0.2.1", 29500, machine_rank=1)
    assert attempts == [(("192.0.2.1", 29500), 3.0)] * 2
    check_main_process_address("127.0.0.1", 29500, machine_rank=1)  # this machine: nothing to reach
    assert len(attempts) == 2


def test_a_placeholder_address_in_a_config_of_ones_own_is_checked_as_an_address(tmp_path):
    config = tmp_path / "two_nodes.yaml"
    config.write_text("distributed_type: MULTI_GPU\nnum_machines: 2\nnum_processes: 2\nmain_process_ip: 127.0.0.1\n")
    settings = SimpleNamespace(bf16=False, fp16=False, ddp_backend=None, use_cpu=False)
    args, _ = launch_plan(["--accelerate_config", str(config), "--machine_rank", "1"], settings, gpu=True)
    assert args[:2] == ["--config_file", str(config)]


# ---------------------------------------------------------------------------------------------------- smaller
def test_a_reward_model_as_the_verifier_is_refused_at_construction(tiny_model_dir, tmp_path):
    from test_trainer import make_trainer, parity_reward

    with pytest.raises(ValueError) as err:
        make_trainer(tiny_model_dir, tmp_path, reward_funcs=[tiny_model_dir, parity_reward])
    message = str(err.value)
    assert "is a reward model, whose scores are not LaSeR's 0/1 target" in message
    assert "Put the 0/1 verifier function first in `reward_funcs`, or name it with `self_reward_verifier`" in message
    trainer = make_trainer(
        tiny_model_dir, tmp_path, reward_funcs=[tiny_model_dir, parity_reward], self_reward_verifier="parity_reward"
    )
    assert trainer.reward_func_names[1] == "parity_reward"


def test_mixing_an_untrained_score_warns(tmp_path):
    common = dict(output_dir=str(tmp_path), self_reward_token="<gh_stars>", bf16=False, report_to="none")
    with pytest.warns(UserWarning, match=r"`self_reward_loss_coef: 0` .* `self_reward_advantage_coef: 0.1`"):
        LaSeRConfig(self_reward_loss_coef=0.0, **common)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        LaSeRConfig(self_reward_loss_coef=0.0, self_reward_advantage_coef=0.0, **common)  # plain GRPO
