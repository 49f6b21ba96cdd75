"""`trl_laser.launch`: what `trl-laser train --accelerate_config ...` hands to `accelerate launch`, with and without GPU."""

from types import SimpleNamespace

import pytest

from trl_laser.launch import LaunchError, launch_plan, packaged_accelerate_configs, resolve_accelerate_config


def settings(bf16=False, fp16=False, ddp_backend=None, use_cpu=False):
    return SimpleNamespace(bf16=bf16, fp16=fp16, ddp_backend=ddp_backend, use_cpu=use_cpu)


@pytest.mark.parametrize(
    "name, extra",
    [
        ("zero3", ["--ddp_backend", "gloo"]),
        ("zero2", ["--ddp_backend", "gloo"]),
        ("ddp", ["--ddp_backend", "gloo", "--use_cpu", "true"]),  # accelerate's multi-CPU mode needs use_cpu
    ],
)
def test_without_gpu_the_launch_is_gloo_and_fp32(name, extra, capsys):
    pytest.importorskip("deepspeed", reason="the test extra installs deepspeed")
    args, added = launch_plan(["--accelerate_config", name, "--num_processes", "2"], settings(), gpu=False)
    assert args == [
        "--config_file",
        str(resolve_accelerate_config(name)),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
    ]
    assert added == extra
    # one line of its own (DeepSpeed's import may log its own before it)
    lines = capsys.readouterr().out.splitlines()
    assert (
        lines.count("[trl-laser] No GPU here: the launch runs on CPU, with gloo and fp32 (mixed_precision no).") == 1
    )
    assert not [line for line in lines if line.startswith("[trl-laser]") and "No GPU here" not in line]


def test_with_gpu_the_precision_follows_the_recipe(capsys):
    pytest.importorskip("deepspeed", reason="the test extra installs deepspeed")
    args, added = launch_plan(["--accelerate_config=zero3"], settings(bf16=True), gpu=True)
    assert args[2:] == ["--mixed_precision", "bf16"] and added == []
    # The shipped configs say bf16; a recipe in fp32 launches in fp32 instead of failing inside DeepSpeed.
    args, _ = launch_plan(["--accelerate_config", "zero3"], settings(), gpu=True)
    assert args[2:] == ["--mixed_precision", "no"]
    args, _ = launch_plan(["--accelerate_config", "ddp", "--mixed_precision", "fp16"], settings(fp16=True), gpu=True)
    assert args.count("--mixed_precision") == 1
    assert "No GPU here" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "launch, recipe, gpu, needle",
    [
        (["--accelerate_config", "zero3"], settings(bf16=True), False, "`bf16: true` cannot train under DeepSpeed"),
        (["--accelerate_config", "zero2"], settings(fp16=True), False, "`fp16: false`"),
        (["--accelerate_config", "ddp"], settings(ddp_backend="nccl"), False, "`ddp_backend: nccl` needs a GPU"),
        (
            ["--mixed_precision", "bf16"],
            settings(),
            True,
            "`--mixed_precision bf16` contradicts the recipe's precision",
        ),
        (["--accelerate_config", "zero4"], settings(), True, "neither a file nor one of the shipped configs"),
    ],
)
def test_what_cannot_work_is_refused_naming_the_setting(launch, recipe, gpu, needle):
    pytest.importorskip("deepspeed", reason="the test extra installs deepspeed")
    with pytest.raises(LaunchError, match=needle.replace("(", r"\(").replace("`", "`")):
        launch_plan(launch, recipe, gpu=gpu)


def test_shipped_configs_are_packaged():
    assert sorted(packaged_accelerate_configs()) == ["ddp", "zero2", "zero3", "zero3_multinode"]


@pytest.mark.parametrize(
    "launch, generation_batch",
    [
        (["--accelerate_config", "zero3", "--num_processes", "2"], 8),
        (["--num_processes=2"], 8),
        (["--accelerate_config", "ddp"], 32),  # the config's num_processes: 8
    ],
)
def test_batch_sizes_are_checked_for_the_launched_processes(launch, generation_batch):
    """4 completions per process make one group of 8 only when the launch has 2 processes or more: the launching
    process (alone) checks the recipe as the launched ones will see it."""
    pytest.importorskip("deepspeed", reason="the test extra installs deepspeed")
    from trl_laser.recipe import RecipeError, parse_args

    argv = ["--model_name_or_path", "m", "--output_dir", "o", "--use_cpu", "true", "--bf16", "false"]
    argv += ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--num_generations", "8"]
    argv += ["--self_reward_token", "<gh_stars>", "--report_to", "none"]
    parsed = parse_args(argv + launch)
    assert parsed.training_args.generation_batch_size == generation_batch
    assert parsed.training_args.world_size == 1  # this process is still alone
    with pytest.raises(RecipeError, match=r"generation_batch_size \(4\) must be divisible by num_generations \(8\)"):
        parse_args(argv)  # no launch: one process
    with pytest.raises(RecipeError, match=r"generation_batch_size \(12\) must be divisible by num_generations \(8\)"):
        parse_args(argv + ["--accelerate_config", "zero3", "--num_processes", "3"])


def test_ddp_backend_is_for_the_launched_processes(monkeypatch):
    """accelerate starts a process group for any `ddp_backend`: the launching process plans with it but does not
    start one, and a run of one process is told to drop it."""
    pytest.importorskip("deepspeed", reason="the test extra installs deepspeed")
    from trl_laser.recipe import RecipeError, parse_args

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["--model_name_or_path", "m", "--output_dir", "o", "--use_cpu", "true", "--bf16", "false"]
    argv += ["--num_generations", "8", "--self_reward_token", "<gh_stars>", "--report_to", "none"]
    parsed = parse_args(argv + ["--ddp_backend", "gloo", "--accelerate_config", "zero3", "--num_processes", "2"])
    assert parsed.training_args.ddp_backend == "gloo"
    assert parsed.script_argv[-2:] == ["--ddp_backend", "gloo"]  # the launched processes get it
    _, added = launch_plan(parsed.launch_args, parsed.training_args, gpu=False)
    assert added == []  # gloo already: not added twice
    parsed = parse_args(argv + ["--ddp_backend=nccl", "--num_processes", "2"])
    with pytest.raises(LaunchError, match="`ddp_backend: nccl` needs a GPU"):
        launch_plan(parsed.launch_args, parsed.training_args, gpu=False)
    with pytest.raises(RecipeError, match="`ddp_backend: gloo` sets the backend of several processes"):
        parse_args(argv + ["--ddp_backend", "gloo"])


def test_the_command_line_wins_over_the_recipe():
    """Launch arguments come recipe first, command line after: the last of a repeated one counts, as in argparse."""
    pytest.importorskip("deepspeed", reason="the test extra installs deepspeed")
    from trl_laser.launch import launch_world_size

    args, _ = launch_plan(["--accelerate_config=zero3", "--accelerate_config", "ddp"], settings(), gpu=True)
    assert args == ["--config_file", str(resolve_accelerate_config("ddp")), "--mixed_precision", "no"]
    assert launch_world_size(["--num_processes=4", "--accelerate_config", "zero3", "--num_processes", "2"]) == 2
    assert launch_world_size(["--accelerate_config", "zero3"]) == 8  # the config's
    with pytest.raises(LaunchError, match="`--num_processes` must be an integer"):
        launch_world_size(["--num_processes", "two"])
