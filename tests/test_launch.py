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
    assert (
        capsys.readouterr().out
        == "[trl-laser] No GPU here: the launch runs on CPU, with gloo and fp32 (mixed_precision no).\n"
    )


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
