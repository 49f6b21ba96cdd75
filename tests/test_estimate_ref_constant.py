"""`trl-laser estimate-ref-constant`: the measured log pi(z_c | x, y, EOS), its summary, warnings and errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SELF_REWARD_TOKEN
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_laser.cli import main as cli_main
from trl_laser.data import ARITHMETIC_INSTRUCTION, make_conversation
from trl_laser.ref_constant import estimate, token_warnings
from trl_laser.scoring import generate_with_self_rewards


def test_cli_json_on_the_tiny_model(tiny_model_dir, capsys):
    argv = ["estimate-ref-constant", "--model", tiny_model_dir, "--token", SELF_REWARD_TOKEN, "--num-samples", "8"]
    assert cli_main([*argv, "--max-new-tokens", "16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["token"] == SELF_REWARD_TOKEN and result["n_completions"] == 8
    assert 0 < result["n_finished"] <= 8 == result["n_completions"]
    assert result["min"] <= result["mean"] <= result["max"] < 0
    assert math.isclose(result["mean"], sum(result["log_probs"]) / result["n_finished"])
    assert result["std"] >= 0 and result["accuracy"] is not None
    assert result["dataset"] == "builtin:arithmetic"


def test_cli_text_output(tiny_model_dir, capsys):
    argv = ["estimate-ref-constant", "--model", tiny_model_dir, "--token", SELF_REWARD_TOKEN, "--num-samples", "4"]
    assert cli_main([*argv, "--max-new-tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert f"log pi({SELF_REWARD_TOKEN} | x, y, EOS)" in out
    assert "suggested self_reward_ref_constant:" in out and " +- " in out


def test_values_are_the_log_prob_after_eos_from_full_logits(tiny_model_dir):
    """Each value equals log_softmax of the raw logits at the EOS that ended the completion (temperature 1)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [make_conversation(p, None, ARITHMETIC_INSTRUCTION) for p in ("What is 1 plus 2?", "What is 9 minus 4?")]
    token_id = tokenizer.convert_tokens_to_ids(SELF_REWARD_TOKEN)
    torch.manual_seed(0)
    result = estimate(
        model, tokenizer, prompts, SELF_REWARD_TOKEN, ["3", "5"], samples_per_prompt=3, max_new_tokens=12
    )
    torch.manual_seed(0)
    samples = generate_with_self_rewards(
        model,
        tokenizer,
        prompts,
        3,
        overrides={"self_reward_token": SELF_REWARD_TOKEN, "self_reward_ref_constant": 0.0},
        max_new_tokens=12,
    )
    direct = []
    for p, group in enumerate(samples):
        prompt_ids = tokenizer.apply_chat_template(
            prompts[p], add_generation_prompt=True, tokenize=True, return_dict=True
        )
        for sample in group:
            if sample.finished:
                ids = torch.tensor([list(prompt_ids["input_ids"]) + sample.token_ids])
                with torch.no_grad():
                    logits = model(ids).logits[0, -1]
                direct.append(logits.log_softmax(-1)[token_id].item())
    assert len(direct) == result["n_finished"] > 0
    assert result["log_probs"] == pytest.approx(direct, abs=1e-4)


def test_warnings_for_a_poor_token(tokenizer):
    base = {"token": SELF_REWARD_TOKEN, "mean": -20.0, "std": 0.1, "auroc": 0.5, "auroc_null_std": 0.05}
    assert token_warnings(base, tokenizer, max_std=1.0) == []
    assert "varies a lot" in token_warnings({**base, "std": 1.5}, tokenizer, 1.0)[0]
    assert "tracks correctness" in token_warnings({**base, "auroc": 0.8}, tokenizer, 1.0)[0]
    assert token_warnings({**base, "auroc": 0.7, "auroc_null_std": 0.12}, tokenizer, 1.0) == []  # within chance
    assert "uses this token" in token_warnings({**base, "mean": -1.0}, tokenizer, 1.0)[0]
    assert "chat template" in token_warnings({**base, "token": "<|im_start|>"}, tokenizer, 1.0)[0]


def test_bad_input_is_a_one_line_error(tiny_model_dir, tmp_path, capsys):
    base = ["estimate-ref-constant", "--model", tiny_model_dir, "--max-new-tokens", "4"]
    assert cli_main([*base, "--token", "<|im_end|>", "--num-samples", "2"]) == 1  # EOS cannot be z_c
    assert "error:" in capsys.readouterr().err
    assert cli_main([*base, "--token", SELF_REWARD_TOKEN, "--num-samples", "0"]) == 1
    assert "--num-samples must be >= 1" in capsys.readouterr().err
    data = tmp_path / "problems.jsonl"
    data.write_text('{"question": "1+1", "answer": "2"}\n')
    assert cli_main([*base, "--token", SELF_REWARD_TOKEN, "--dataset", str(data)]) == 1
    err = capsys.readouterr().err
    assert "problem_column" in err and "Traceback" not in err
