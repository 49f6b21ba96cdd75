"""LaSeRGRPOTrainer inside TRL's data flow: exact scores, exact gradients, mixed advantages, end-to-end runs, errors."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import (
    EOS,
    EOS2,
    FINISHED,
    FIXED,
    MAX_LEN,
    SELF_REWARD_TOKEN,
    ZC,
    force_completions,
    training_zc_logps,
)
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl.trainer.utils import split_tensor_dict

from trl_laser import SELF_REWARD_CONFIG_NAME, LaSeRConfig, LaSeRGRPOTrainer
from trl_laser.core import class_weights


def prompts_dataset(n: int = 8) -> Dataset:
    return Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}], "answer": str(2 * i)} for i in range(n)]
    )


def parity_reward(completion_ids, **kwargs):
    """A 0/1 'verifier' that the tiny model can be scored against: even completion length is 'correct'."""
    return [float(len(ids) % 2 == 0) for ids in completion_ids]


def make_trainer(
    model_dir, tmp_path, reward_funcs=None, peft_config=None, eos_ids=(EOS, EOS2), eval_dataset=None, **overrides
):
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=MAX_LEN,
        max_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,  # fp32, so that scores can be compared to 1e-5 (TRL defaults to bf16 autocast)
        seed=0,
        self_reward_token=SELF_REWARD_TOKEN,
        self_reward_ref_constant=-10.0,
    )
    kwargs.update(overrides)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if eos_ids is not None:
        model.generation_config.eos_token_id = list(eos_ids)
    return LaSeRGRPOTrainer(
        model=model,
        reward_funcs=reward_funcs or [parity_reward],
        args=LaSeRConfig(**kwargs),
        train_dataset=prompts_dataset(),
        eval_dataset=eval_dataset,
        peft_config=peft_config,
    )


def generation_batch():
    return [
        {"prompt": [{"role": "user", "content": f"What is {i // 4} + {i // 4}?"}], "answer": "0"} for i in range(8)
    ]


def direct_zc_logps(model, trainer, batch):
    """log pi(z_c | x, y, EOS) from a plain full-logits forward of the unpadded sequence x, y (ending with EOS)."""
    values = []
    for row in range(batch["prompt_ids"].size(0)):
        prompt = batch["prompt_ids"][row][batch["prompt_mask"][row].bool()]
        completion = FIXED[row]
        ids = torch.cat([prompt, torch.tensor(completion)])[None]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1].double()
        values.append(torch.log_softmax(logits, -1)[ZC].item())
    return torch.tensor(values, dtype=torch.float64)


# ------------------------------------------------------------------------------------------ exactness
def test_score_from_training_forward_equals_full_logits(tiny_model_dir, tmp_path):
    seen = {}

    def recording_reward(completions, completion_ids, **kwargs):
        seen["ids"], seen["text"] = completion_ids, completions
        return parity_reward(completion_ids)

    trainer = make_trainer(tiny_model_dir, tmp_path, reward_funcs=[recording_reward], eos_ids=[EOS, EOS2])
    force_completions(trainer)
    trainer.model.train()
    batch = trainer._generate_and_score_completions(generation_batch())

    # z_c follows every finished completion and nothing else; EOS at the last allowed position adds a column.
    assert batch["completion_ids"].size(1) == MAX_LEN + 1
    expected_index = [len(c) if done else -1 for c, done in zip(FIXED, FINISHED)]
    assert batch["self_reward_index"].tolist() == expected_index
    for row, index in enumerate(expected_index):
        if index >= 0:
            assert batch["completion_ids"][row, index].item() == ZC
            # attended (scored) but out of the loss mask
            assert batch["completion_mask"][row, index] == 1 and batch["tool_mask"][row, index] == 0
            assert batch["tool_mask"][row, :index].eq(1).all()
    assert batch["num_items_in_batch"].item() == sum(len(c) for c in FIXED)

    # Reward functions never see z_c.
    assert seen["ids"] == FIXED
    assert all(SELF_REWARD_TOKEN not in str(text) for text in seen["text"])

    train_logps = training_zc_logps(trainer, batch)
    direct = direct_zc_logps(trainer.model, trainer, batch)
    finished = torch.tensor(FINISHED)
    assert torch.allclose(train_logps[finished].double(), direct[finished], atol=1e-5)
    # pad == EOS: a truncated row followed by pad ids is not mistaken for a finished one.
    assert (batch["self_reward_index"][~finished] == -1).all()


def test_mask_truncated_completions_goes_through_the_loss_mask(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, mask_truncated_completions=True)
    force_completions(trainer)
    trainer.model.train()
    batch = trainer._generate_and_score_completions(generation_batch())
    loss_mask = batch["completion_mask"] * batch["tool_mask"]
    for row, (completion, done) in enumerate(zip(FIXED, FINISHED)):
        assert loss_mask[row].sum().item() == (len(completion) if done else 0)
    assert batch["self_reward_index"].tolist() == [len(c) if d else -1 for c, d in zip(FIXED, FINISHED)]
    assert batch["num_items_in_batch"].item() == sum(len(c) for c, d in zip(FIXED, FINISHED) if d)


def test_gradient_over_micro_batches_equals_the_formula(tiny_model_dir, tmp_path):
    """The MSE gradient accumulated over a generation batch equals alpha * grad l_MSE, however it is split."""
    alpha, beta, c_ref = 0.1, 0.1, -10.0
    trainer = make_trainer(tiny_model_dir, tmp_path, self_reward_loss_coef=alpha)
    force_completions(trainer)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = trainer._generate_and_score_completions(generation_batch())
    batch["advantages"] = torch.zeros_like(batch["advantages"])  # isolate the LaSeR term: no policy gradient
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    def accumulated(num_chunks):
        trainer.model.zero_grad()
        for chunk in split_tensor_dict(batch, num_chunks):
            trainer._compute_loss(trainer.model, chunk).backward()
        return [p.grad.clone() for p in params]

    # Independent computation: full-logits forward of each finished sequence, the spec's formula written out.
    targets = torch.tensor(parity_reward(FIXED))
    finished = torch.tensor(FINISHED)
    n_c = int((targets[finished] == 1).sum())
    n_i = int((targets[finished] == 0).sum())
    trainer.model.zero_grad()
    total = 0.0
    for row in range(8):
        if not FINISHED[row]:
            continue
        prompt = batch["prompt_ids"][row][batch["prompt_mask"][row].bool()]
        ids = torch.cat([prompt, torch.tensor(FIXED[row])])[None]
        r_s = beta * (torch.log_softmax(trainer.model(input_ids=ids).logits[0, -1], -1)[ZC] - c_ref)
        w = (n_c + n_i) / (2 * n_c) if targets[row] == 1 else (n_c + n_i) / (2 * n_i)
        total = total + w * (r_s - targets[row]) ** 2
    (alpha * total / (n_c + n_i)).backward()
    reference = [p.grad.clone() for p in params]

    for num_chunks in (1, 2, 4):
        grads = accumulated(num_chunks)
        for g, r in zip(grads, reference):
            assert torch.allclose(g, r, atol=1e-6, rtol=1e-4)
    assert any(r.abs().sum() > 0 for r in reference)


def test_mixed_advantage_by_hand(tiny_model_dir, tmp_path):
    tau, beta, c_ref, threshold = 0.3, 0.1, -10.0, 0.0
    trainer = make_trainer(
        tiny_model_dir,
        tmp_path,
        self_reward_advantage_coef=tau,
        self_reward_std_threshold=threshold,
        self_reward_ref_constant=c_ref,
    )
    force_completions(trainer)
    trainer.model.train()
    batch = trainer._generate_and_score_completions(generation_batch())

    rewards = torch.tensor(parity_reward(FIXED)).view(2, 4)
    a_v = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).view(-1)
    logps = direct_zc_logps(trainer.model, trainer, batch)
    s = [min(max(beta * (lp - c_ref), 0.0), 1.0) if done else 0.0 for lp, done in zip(logps.tolist(), FINISHED)]
    expected = []
    for g in range(2):
        group = s[4 * g : 4 * g + 4]
        mean = sum(group) / 4
        std = math.sqrt(sum((v - mean) ** 2 for v in group) / 3)
        for k in range(4):
            a_s = (group[k] - mean) / std if std > threshold else a_v[4 * g + k].item()
            expected.append((1 - tau) * a_v[4 * g + k].item() + tau * a_s)
    assert torch.allclose(batch["advantages"].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4)
    assert trainer._metrics["train"]["self_reward/phase"] == [2.0]


def test_mix_is_off_during_warmups_and_mse_only_after_reasoning_warmup(tiny_model_dir, tmp_path):
    trainer = make_trainer(
        tiny_model_dir,
        tmp_path,
        reasoning_warmup_steps=1,
        self_reward_warmup_steps=1,
        self_reward_ref_constant=-12.0,  # scores ~0.1 on finished rows, 0 on truncated ones: groups are not flat
        self_reward_std_threshold=0.0,
    )
    force_completions(trainer)
    trainer.model.train()
    plain = trainer._generate_and_score_completions(generation_batch())
    assert plain["self_reward_loss_coef"].eq(0).all()  # step 0: plain GRPO
    rewards = torch.tensor(parity_reward(FIXED)).view(2, 4)
    a_v = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).view(-1)
    assert torch.allclose(plain["advantages"], a_v, atol=1e-6)
    trainer.state.global_step = 1
    mse_on = trainer._generate_and_score_completions(generation_batch())
    assert mse_on["self_reward_loss_coef"].eq(0.1).all() and torch.allclose(mse_on["advantages"], a_v, atol=1e-6)
    trainer.state.global_step = 2
    mixed = trainer._generate_and_score_completions(generation_batch())
    assert not torch.allclose(mixed["advantages"], a_v, atol=1e-3)
    assert trainer._metrics["train"]["self_reward/phase"] == [0.0, 1.0, 2.0]


def test_class_weights_in_batch_match_the_formula(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path)
    force_completions(trainer)
    trainer.model.train()
    batch = trainer._generate_and_score_completions(generation_batch())
    targets = torch.tensor(parity_reward(FIXED))
    coef, stats = class_weights(targets, torch.tensor(FINISHED))
    assert torch.allclose(batch["self_reward_coef"], coef)
    assert trainer._metrics["train"]["self_reward/w_correct"] == [stats["w_correct"]]
    assert trainer._metrics["train"]["self_reward/frac_truncated"] == [0.25]


# ------------------------------------------------------------------------------------------ end to end
def zc_logp_probe(model, tokenizer) -> float:
    """Mean log pi(z_c | x, y, EOS) over a few fixed finished sequences."""
    texts = ["What is 1 + 1?", "What is 3 + 4?", "Name a colour."]
    values = []
    for text in texts:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
        ids = torch.tensor([list(prompt) + [300, 301, EOS]])
        with torch.no_grad():
            values.append(torch.log_softmax(model(input_ids=ids).logits[0, -1], -1)[ZC].item())
    return sum(values) / len(values)


def run_training(trainer, tokenizer):
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    probe_before = zc_logp_probe(model, tokenizer)
    trainer.train()
    changed = any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    return changed, probe_before, zc_logp_probe(model, tokenizer)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"num_iterations": 2},
        {"beta": 0.04},
        {"mask_truncated_completions": True},
        {"steps_per_generation": 2, "per_device_train_batch_size": 4},
        {"gradient_checkpointing": True, "bf16": True},
        {"self_reward_ref_constant": "auto", "self_reward_warmup_steps": 1, "log_completions": True},
        {"self_reward_ref_constant": "model", "beta": 0.04},
    ],
    ids=[
        "default",
        "num_iterations",
        "beta",
        "mask_truncated",
        "steps_per_generation",
        "grad_ckpt_bf16",
        "auto",
        "model",
    ],
)
def test_training_moves_parameters_and_score(tiny_model_dir, tokenizer, tmp_path, overrides):
    trainer = make_trainer(tiny_model_dir, tmp_path, **overrides)
    if overrides.get("beta"):  # TRL builds the reference model from the policy's path
        assert trainer.ref_model is not None
    changed, before, after = run_training(trainer, tokenizer)
    assert changed
    assert abs(after - before) > 1e-3
    logged = [h for h in trainer.state.log_history if "self_reward/mse" in h]
    assert logged and all(math.isfinite(h["self_reward/mse"]) for h in logged)
    assert all("self_reward/c_ref" in h and "self_reward/w_correct" in h for h in logged)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"])
def test_every_loss_type(tiny_model_dir, tokenizer, tmp_path, loss_type):
    trainer = make_trainer(tiny_model_dir, tmp_path, loss_type=loss_type, max_steps=1)
    changed, before, after = run_training(trainer, tokenizer)
    assert changed and abs(after - before) > 1e-4


def test_lora(tiny_model_dir, tokenizer, tmp_path):
    from peft import LoraConfig

    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = make_trainer(
        tiny_model_dir, tmp_path, peft_config=peft_config, self_reward_ref_constant="model", learning_rate=5e-2
    )
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    probe_before = zc_logp_probe(trainer.model, tokenizer)
    trainer.train()
    assert any(not torch.equal(lora[n], p) for n, p in trainer.model.named_parameters() if "lora_" in n)
    assert abs(zc_logp_probe(trainer.model, tokenizer) - probe_before) > 1e-5


@pytest.mark.parametrize("reward, direction", [(1.0, 1), (0.0, -1)])
def test_mse_alone_pulls_the_score_toward_the_verifier(tiny_model_dir, tokenizer, tmp_path, reward, direction):
    """With a constant reward GRPO's advantages are 0, so every update comes from the MSE term."""

    def constant(completions, **kwargs):
        return [reward] * len(completions)

    # c_ref = -16: the initial log-prob is about -10.9, so r_s starts near 0.5, between the two targets.
    trainer = make_trainer(
        tiny_model_dir,
        tmp_path,
        reward_funcs=[constant],
        max_steps=4,
        learning_rate=2e-2,
        self_reward_loss_coef=1.0,
        self_reward_ref_constant=-16.0,
    )
    _, before, after = run_training(trainer, tokenizer)
    assert direction * (after - before) > 0.5  # nats, toward r_s = reward
    key = "self_reward/score_correct" if reward else "self_reward/score_incorrect"
    scores = [h[key] for h in trainer.state.log_history if key in h]
    assert len(scores) >= 2 and direction * (scores[-1] - scores[0]) > 0
    mse = [h["self_reward/mse"] for h in trainer.state.log_history if "self_reward/mse" in h]
    assert mse[-1] < mse[0]


def test_save_writes_self_reward_settings_and_model_card(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, self_reward_ref_constant="auto", max_steps=1)
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    settings = json.loads((out / SELF_REWARD_CONFIG_NAME).read_text())
    assert settings["self_reward_token"] == SELF_REWARD_TOKEN and settings["self_reward_token_id"] == ZC
    assert settings["self_reward_ref_mode"] == "auto" and settings["self_reward_beta"] == 0.1
    assert settings["self_reward_ref_constant"] == pytest.approx(trainer.ref_constant.value)
    assert settings["temperature"] == 1.0 and settings["eos_token_ids"] == [EOS, EOS2]
    trainer.create_model_card(model_name="tiny-laser")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "LaSeR" in card and "2510.14943" in card


def test_resume_keeps_auto_ref_constant_and_phase(tiny_model_dir, tmp_path):
    common = dict(self_reward_ref_constant="auto", save_strategy="steps", save_steps=1, self_reward_warmup_steps=2)
    first = make_trainer(tiny_model_dir, tmp_path, max_steps=1, **common)
    first.train()
    c_ref = first.ref_constant.value
    checkpoint = tmp_path / "out" / "checkpoint-1"
    assert json.loads((checkpoint / SELF_REWARD_CONFIG_NAME).read_text())["self_reward_ref_constant"] == c_ref

    resumed = make_trainer(tiny_model_dir, tmp_path, max_steps=3, **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.ref_constant.value == c_ref  # reused, not re-estimated from the trained policy
    logged = [h for h in resumed.state.log_history if "self_reward/phase" in h and h["step"] > 1]
    assert [h["step"] for h in logged] == [2, 3]
    assert [h["self_reward/phase"] for h in logged] == [1.0, 2.0]  # step 1: MSE only; step 2: mixing
    assert all(h["self_reward/c_ref"] == pytest.approx(c_ref) for h in logged)


def test_resume_without_saved_ref_constant_fails_clearly(tiny_model_dir, tmp_path):
    first = make_trainer(tiny_model_dir, tmp_path, self_reward_ref_constant="auto", max_steps=1, save_strategy="steps")
    first.train()
    checkpoint = tmp_path / "out" / "checkpoint-1"
    os.remove(checkpoint / SELF_REWARD_CONFIG_NAME)
    resumed = make_trainer(tiny_model_dir, tmp_path, self_reward_ref_constant="auto", max_steps=2)
    with pytest.raises(FileNotFoundError, match="self_reward_ref_constant"):
        resumed.train(resume_from_checkpoint=str(checkpoint))


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "token, message",
    [
        ("<not_a_token>", "not a single token"),
        (10**6, "not a token id"),
        ("<|im_end|>", "EOS or the pad token"),
        ("<|im_start|>", "used by the chat template"),
    ],
)
def test_bad_self_reward_token(tiny_model_dir, tmp_path, token, message):
    with pytest.raises(ValueError, match=message) as err:
        make_trainer(tiny_model_dir, tmp_path, self_reward_token=token)
    assert "self_reward_token" in str(err.value)


def test_missing_self_reward_token(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="`self_reward_token` is required"):
        make_trainer(tiny_model_dir, tmp_path, self_reward_token=None)


def test_args_must_be_laser_config(tiny_model_dir, tmp_path):
    from trl import GRPOConfig

    with pytest.raises(TypeError, match="LaSeRConfig"):
        LaSeRGRPOTrainer(
            model=tiny_model_dir,
            reward_funcs=parity_reward,
            args=GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False),
        )


def test_unknown_verifier_name(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="`self_reward_verifier='accuracy'` is not among"):
        make_trainer(tiny_model_dir, tmp_path, self_reward_verifier="accuracy")


def test_verifier_selected_by_name(tiny_model_dir, tmp_path):
    def fmt(completions, **kwargs):
        return [0.5] * len(completions)

    trainer = make_trainer(
        tiny_model_dir, tmp_path, reward_funcs=[fmt, parity_reward], self_reward_verifier="parity_reward"
    )
    force_completions(trainer)
    trainer.model.train()
    batch = trainer._generate_and_score_completions(generation_batch())
    assert batch["self_reward_target"].tolist() == parity_reward(FIXED)


def test_verifier_must_return_zero_or_one(tiny_model_dir, tmp_path):
    def fmt(completions, **kwargs):
        return [0.5] * len(completions)

    trainer = make_trainer(tiny_model_dir, tmp_path, reward_funcs=[fmt, parity_reward])
    force_completions(trainer)
    trainer.model.train()
    with pytest.raises(ValueError, match="verifier reward function 'fmt' returned 0.5"):
        trainer._generate_and_score_completions(generation_batch())


def test_verifier_none_leaves_a_completion_out(tiny_model_dir, tmp_path):
    def partial(completion_ids, **kwargs):
        return [None if i == 0 else float(len(ids) % 2 == 0) for i, ids in enumerate(completion_ids)]

    trainer = make_trainer(tiny_model_dir, tmp_path, reward_funcs=[partial])
    force_completions(trainer)
    trainer.model.train()
    batch = trainer._generate_and_score_completions(generation_batch())
    assert batch["self_reward_coef"][0] == 0 and batch["self_reward_coef"][1] > 0


def test_model_ref_needs_a_reference(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="self_reward_ref_constant='model'"):
        make_trainer(tiny_model_dir, tmp_path, self_reward_ref_constant="model")


def test_auto_ref_with_no_finished_completion(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, self_reward_ref_constant="auto")
    force_completions(trainer, [[120, 121, 122, 123, 124, 125]] * 8)
    trainer.model.train()
    with pytest.raises(RuntimeError, match="max_completion_length"):
        trainer._generate_and_score_completions(generation_batch())


@pytest.mark.parametrize(
    "overrides, trl_calls, laser_calls",
    [
        ({"self_reward_warmup_steps": 1}, 0, 0),  # before mixing: the score comes from the training forward only
        ({}, 0, 1),  # mixing, steps aligned: TRL computes no old log-probs, LaSeR adds one no-grad forward
        ({"num_iterations": 2}, 1, 0),  # mixing, TRL computes old log-probs: LaSeR reuses them
        ({"self_reward_advantage_coef": 0.0}, 0, 0),  # tau = 0: nothing to mix
    ],
)
def test_extra_forward_only_when_mixing_needs_it(tiny_model_dir, tmp_path, overrides, trl_calls, laser_calls):
    trainer = make_trainer(tiny_model_dir, tmp_path, **overrides)
    force_completions(trainer)
    trainer.model.train()
    calls = []
    original = trainer._laser_logps

    def counting(batch, reference=False):
        calls.append(reference)
        return original(batch, reference)

    trainer._laser_logps = counting
    forward = type(trainer)._get_per_token_logps_and_entropies
    total = []
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: total.append(1) or forward(trainer, *a, **k)
    batch = trainer._generate_and_score_completions(generation_batch())
    assert len(calls) == laser_calls and len(total) == trl_calls + laser_calls
    assert ("old_per_token_logps" in batch) == bool(trl_calls)


def test_completions_table_has_self_reward_column(tiny_model_dir, tmp_path):
    import pandas as pd

    trainer = make_trainer(tiny_model_dir, tmp_path, log_completions=True, max_steps=1)
    force_completions(trainer)
    trainer.train()
    table = pd.read_parquet(tmp_path / "out" / "completions" / "completions_00001.parquet")
    assert "self_reward" in table.columns and len(table) == 8
    scores = table["self_reward"]  # every row is logged; truncated rows have no score
    assert scores.notna().sum() == sum(FINISHED)
    assert scores.dropna().between(-5, 5).all()


def test_evaluation_logs_self_reward_metrics(tiny_model_dir, tmp_path):
    trainer = make_trainer(
        tiny_model_dir, tmp_path, max_steps=1, eval_strategy="steps", eval_steps=1, eval_dataset=prompts_dataset(4)
    )
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert evals and "eval_self_reward/mse" in evals[0] and "eval_self_reward/frac_truncated" in evals[0]


def test_within_problem_auroc_is_logged_for_the_score_and_the_mean_token_logprob():
    from trl_laser.self_reward_log import SelfRewardLog

    log = SelfRewardLog({"train": 2, "eval": 2})
    log.generation_batch("train", 6)
    # Rows 0-5 in groups of 2: (score, target, finished, coef, row, mean token log-prob).
    rows = [
        (0.9, 1, 1, 0.5, 0, -0.2),  # group 0: the score ranks right above wrong, the log-prob too
        (0.1, 0, 1, 0.5, 1, -0.9),
        (0.2, 1, 1, 0.5, 2, -0.1),  # group 1: the score ranks wrong above right, the log-prob right above wrong
        (0.8, 0, 1, 0.5, 3, -0.8),
        (0.7, 1, 1, 0.5, 4, -0.5),  # group 2: one class only, no pair
        (0.6, 1, 1, 0.5, 5, -0.5),
    ]
    log.record("train", 0.0, torch.tensor(rows, dtype=torch.float64), keep_table=False)
    metrics = log.metrics("train")
    assert metrics["self_reward/auroc_within_problem"] == pytest.approx(0.5)  # 1 of the 2 same-prompt pairs
    assert metrics["self_reward/auroc_within_problem_mean_token_logprob"] == pytest.approx(1.0)
    # Pooled over all rows, pairs across prompts count too: right 0.9, 0.2, 0.7, 0.6 against wrong 0.1 (4 pairs won)
    # and 0.8 (1 won): 5 of 8.
    assert metrics["self_reward/auroc"] == pytest.approx(5 / 8)


@pytest.mark.parametrize("suppress", [False, True])
def test_suppressed_self_reward_token_is_never_sampled_in_training(tiny_model_dir, tmp_path, suppress):
    # z_c's row made EOS's, ten times over: z_c is the likeliest token everywhere, sampled at once unless suppressed.
    sampled = []

    def recording_reward(completion_ids, **kwargs):
        sampled.extend(completion_ids)
        return parity_reward(completion_ids)

    trainer = make_trainer(
        tiny_model_dir, tmp_path, reward_funcs=[recording_reward], self_reward_suppress_sampling=suppress
    )
    head = trainer.model.get_output_embeddings().weight
    with torch.no_grad():
        head[ZC] = head[EOS] * 10
    trainer.model.train()
    batch = trainer._generate_and_score_completions(generation_batch())
    inside = sum(ZC in ids for ids in sampled)  # the rewards see each completion without the z_c appended after EOS
    if suppress:
        assert inside == 0 and ZC in trainer.generation_config.suppress_tokens
        assert ZC in trainer.generation_kwargs["suppress_tokens"]
        # The score still reads z_c's raw log-prob after the EOS, where it is now the likeliest token.
        scores = training_zc_logps(trainer, batch)
        finished = batch["self_reward_index"] >= 0
        assert finished.any() and (scores[finished] > math.log(0.5)).all()
    else:
        assert inside == len(sampled) == 8


def test_suppressing_z_c_in_vllm_needs_the_policy_without_it_for_importance_sampling():
    common = dict(output_dir="unused", self_reward_suppress_sampling=True, use_vllm=True, use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="self_reward_exclude_from_policy: true.*vllm_importance_sampling_correction"):
        LaSeRConfig(**common)
    LaSeRConfig(**common, self_reward_exclude_from_policy=True)
    LaSeRConfig(**common, vllm_importance_sampling_correction=False)
