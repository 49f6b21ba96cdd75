"""The choice of the evaluation backend and the `vllm` extra, checked without vLLM (tests/test_vllm.py runs vLLM)."""

from __future__ import annotations

import configparser
import importlib.metadata
import os

import pytest
from conftest import ROOT, SELF_REWARD_TOKEN

from trl_laser.scripts.common import exit_status
from trl_laser.scripts.eval import main, make_parser
from trl_laser.vllm_scoring import is_vllm_available


def run_eval(*argv: str) -> int:
    return exit_status(main, make_parser().parse_args(list(argv)))


@pytest.fixture
def common(tiny_model_dir, tmp_path) -> list[str]:
    return [
        "--model",
        tiny_model_dir,
        "--dataset",
        "builtin:arithmetic",
        "--max-problems",
        "2",
        "--output-dir",
        str(tmp_path / "out"),
        "--self-reward-token",
        SELF_REWARD_TOKEN,
        "--self-reward-ref-constant",
        "-10",
    ]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--backend", "vllm", "--device", "cpu"], "`device` (--device) is for the transformers backend"),
        (["--vllm-kwargs", '{"tensor_parallel_size": 2}'], "`vllm_kwargs` (--vllm-kwargs) are for `backend='vllm'`"),
    ],
)
def test_backend_options_that_do_not_go_together(common, tmp_path, capsys, extra, message):
    assert run_eval(*common, *extra) == 1
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")  # refused before anything is written or loaded


@pytest.mark.skipif(is_vllm_available(), reason="vLLM is installed here")
def test_backend_vllm_without_vllm_says_how_to_install_it(common, tmp_path, capsys):
    assert run_eval(*common, "--backend", "vllm") == 1
    assert "needs vLLM: `pip install trl-laser[vllm]`" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_unknown_backend_is_refused(capsys):
    with pytest.raises(SystemExit):
        make_parser().parse_args(["--model", "m", "--dataset", "d", "--backend", "sglang"])
    assert "invalid choice: 'sglang'" in capsys.readouterr().err


def test_vllm_extra_is_trls_supported_range():
    """`pip install trl-laser[vllm]` asks for exactly the vLLM versions that TRL's own `vllm` extra accepts."""
    from packaging.requirements import Requirement

    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"))
    ours = [Requirement(r) for r in config["options.extras_require"]["vllm"].strip().splitlines()]
    trl = [Requirement(r.split(";")[0]) for r in importlib.metadata.requires("trl") if 'extra == "vllm"' in r]
    assert {(r.name, r.specifier) for r in ours} == {(r.name, r.specifier) for r in trl}
