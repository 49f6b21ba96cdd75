"""`self_reward_row_update='least_squares'`: z_c's row takes the Gauss-Newton step of LaSeR's MSE, checked by hand."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from conftest import FIXED, ZC, force_completions
from test_trainer import make_trainer
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainerCallback

from trl_laser import LaSeRConfig
from trl_laser.core import least_squares_row_step
from trl_laser.metrics import auroc
from trl_laser.row_update import ROW_STATE_NAME


LS = dict(self_reward_row_update="least_squares", self_reward_row_ridge=0.5, self_reward_row_forgetting=0.8)
# the levers that act within a group (tests/test_group_levers.py): they keep the row's state too
LEVERS = dict(
    LS,
    self_reward_row_between_weight=0.0,
    self_reward_class_weights="group",
    self_reward_pair_loss_coef=0.5,
    self_reward_mse_between_weight=0.25,
)
# the end-of-training refit keeps the last steps' micro-batches: in the checkpoint, one file per process
REFIT = dict(LS, self_reward_row_refit_steps=2)
SETTINGS = pytest.mark.parametrize("settings", [LS, LEVERS, REFIT], ids=["pooled", "group-levers", "refit"])


def test_least_squares_row_step_by_hand():
    gram = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    gradient = torch.tensor([1.0, 1.0])
    # lambda = 0.5 * trace / d = 0.75; step = -(gram + 0.75 I)^-1 gradient / beta, beta = 0.5
    step = least_squares_row_step(gram, gradient, beta=0.5, ridge=0.5)
    torch.testing.assert_close(step, torch.tensor([-2 / 2.75, -2 / 1.75]))


def test_least_squares_row_step_solves_the_regression():
    """With a tiny ridge, one step from w = 0 lands on the weighted least-squares fit of (r_v / beta) on the states."""
    torch.manual_seed(0)
    states, weights, beta = torch.randn(50, 3, dtype=torch.float64), torch.rand(50, dtype=torch.float64), 0.1
    targets = states @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) * beta
    residual = 0.0 - targets  # r_s = beta * (w . h) = 0 at w = 0
    gram, gradient = (states * weights[:, None]).T @ states, (weights * residual) @ states
    w = least_squares_row_step(gram, gradient, beta, ridge=1e-9)
    torch.testing.assert_close(w, torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), rtol=1e-5, atol=1e-6)


class Snapshots(TrainerCallback):
    """The model's state at the start of every optimizer step, and the generation batches."""

    def __init__(self):
        self.states = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.states.append(copy.deepcopy(model.state_dict()))


def capture_batches(trainer) -> list[dict]:
    batches, original = [], trainer._generate_and_score_completions

    def keep(inputs):
        batch = original(inputs)
        batches.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        return batch

    trainer._generate_and_score_completions = keep
    return batches


def by_hand(model_dir, state, batch, beta, loss_coef):
    """u and B of one generation batch from plain, unpadded forwards of prompt + completion (no trainer code)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.load_state_dict(state)
    u, gram = 0.0, 0.0
    for row in range(batch["prompt_ids"].size(0)):
        index = batch["self_reward_index"][row].item()
        if index < 0:
            continue
        prompt = batch["prompt_ids"][row][batch["prompt_mask"][row].bool()]
        ids = torch.cat([prompt, batch["completion_ids"][row, :index]])[None]  # ... EOS
        with torch.no_grad():
            h = model.model(input_ids=ids).last_hidden_state[0, -1].double()
            logp = torch.log_softmax(model.lm_head(h.float()).double(), -1)[ZC]
        phi = (1 - logp.exp()) * h
        coef = batch["self_reward_coef"][row].double() * loss_coef
        residual = beta * (logp - batch["self_reward_ref"][row].double()) - batch["self_reward_target"][row].double()
        u = u + coef * residual * phi
        gram = gram + coef * torch.outer(phi, phi)
    return u, gram


def test_row_takes_the_least_squares_step_and_the_rest_the_optimizer(tiny_model_dir, tmp_path):
    runs = {}
    for mode in ("optimizer", "least_squares"):
        trainer = make_trainer(tiny_model_dir, tmp_path / mode, max_steps=2, **{**LS, "self_reward_row_update": mode})
        force_completions(trainer)
        snapshots = Snapshots()
        trainer.add_callback(snapshots)
        batches = capture_batches(trainer)
        trainer.train()
        runs[mode] = (trainer, snapshots.states, batches)
    trainer, states, batches = runs["least_squares"]
    beta, ridge, forgetting = 0.1, LS["self_reward_row_ridge"], LS["self_reward_row_forgetting"]
    u1, gram1 = by_hand(tiny_model_dir, states[0], batches[0], beta, 0.1)
    u2, gram2 = by_hand(tiny_model_dir, states[1], batches[1], beta, 0.1)

    # step 1: the row moves by -(B1 + lambda I)^-1 u1 / beta, lambda = ridge * tr(B1) / d
    d = gram1.size(0)
    expected1 = (
        -torch.linalg.solve(gram1 + ridge * torch.trace(gram1) / d * torch.eye(d, dtype=gram1.dtype), u1) / beta
    )
    row0, row1 = (s["lm_head.weight"][ZC].double() for s in states)
    torch.testing.assert_close(row1 - row0, expected1, rtol=1e-4, atol=1e-6)
    assert (row1 - row0).norm() > 1e-3
    # step 2: the running matrix is forgetting * B1 + B2
    running = forgetting * gram1 + gram2
    torch.testing.assert_close(trainer.row_update.gram.double(), running, rtol=1e-4, atol=1e-6)
    expected2 = -torch.linalg.solve(running + ridge * torch.trace(running) / d * torch.eye(d, dtype=gram1.dtype), u2)
    row2 = trainer.model.lm_head.weight[ZC].detach().double()
    torch.testing.assert_close(row2 - row1, expected2 / beta, rtol=1e-4, atol=1e-6)

    # Everything else follows the optimizer exactly as without the lever (same first step, same gradients).
    plain_states = runs["optimizer"][1]
    for name, tensor in states[1].items():
        if name != "lm_head.weight":
            torch.testing.assert_close(tensor, plain_states[1][name], rtol=0, atol=1e-7)
    others = torch.arange(states[1]["lm_head.weight"].size(0)) != ZC
    torch.testing.assert_close(states[1]["lm_head.weight"][others], plain_states[1]["lm_head.weight"][others])
    logged = [h["self_reward/row_step_norm"] for h in trainer.state.log_history if "self_reward/row_step_norm" in h]
    assert logged == pytest.approx([expected1.norm().item(), (expected2 / beta).norm().item()], rel=1e-4)


def test_row_is_untouched_during_the_reasoning_warmup(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, max_steps=1, reasoning_warmup_steps=1, **LS)
    force_completions(trainer)
    row = trainer.model.lm_head.weight[ZC].detach().clone()
    trainer.train()
    assert torch.equal(trainer.model.lm_head.weight[ZC], row)  # no MSE rows: no step, and not the optimizer's either
    assert trainer.row_update.gram is None


def test_constant_reward_pulls_every_score_to_the_target(tiny_model_dir, tmp_path):
    """With GRPO's advantages at 0 the MSE alone trains: a few least-squares steps reach r_s = 1 closely."""
    trainer = make_trainer(
        tiny_model_dir,
        tmp_path,
        reward_funcs=[lambda completions, **kw: [1.0] * len(completions)],
        max_steps=4,
        learning_rate=1e-6,
        **LS,
    )
    force_completions(trainer)
    trainer.train()
    scores = [h["self_reward/score_correct"] for h in trainer.state.log_history if "self_reward/score_correct" in h]
    assert abs(scores[0] - 1.0) > 0.3 and abs(scores[-1] - 1.0) < 0.1


def tied_model_dir(tiny_model_dir, tmp_path) -> str:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = str(tmp_path / "tied")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@SETTINGS
def test_tied_embeddings_share_the_row_and_reload(tiny_model_dir, tmp_path, settings):
    trainer = make_trainer(tied_model_dir(tiny_model_dir, tmp_path), tmp_path, max_steps=1, **settings)
    force_completions(trainer)
    model = trainer.model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    row_before = model.get_output_embeddings().weight[ZC].detach().clone()
    trainer.train()
    row = model.get_output_embeddings().weight[ZC].detach()
    assert (row - row_before).abs().max() > 1e-4
    assert torch.equal(model.get_input_embeddings().weight[ZC], row)  # still one tensor

    trainer.save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"))
    assert reloaded.get_output_embeddings().weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, model.state_dict()[name], rtol=0, atol=0)


@SETTINGS
def test_resume_from_checkpoint_equals_an_uninterrupted_run(tiny_model_dir, tmp_path, settings):
    common = dict(settings, lr_scheduler_type="constant")  # the same schedule whatever max_steps
    straight = make_trainer(tiny_model_dir, tmp_path / "straight", max_steps=3, **common)
    force_completions(straight)
    straight.train()

    first = make_trainer(
        tiny_model_dir, tmp_path / "resumed", max_steps=2, save_strategy="steps", save_steps=2, **common
    )
    force_completions(first)
    first.train()
    checkpoint = tmp_path / "resumed" / "out" / "checkpoint-2"
    assert (checkpoint / ROW_STATE_NAME).is_file()
    resumed = make_trainer(tiny_model_dir, tmp_path / "resumed", max_steps=3, **common)
    force_completions(resumed)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    torch.testing.assert_close(resumed.row_update.gram, straight.row_update.gram, rtol=1e-5, atol=1e-7)
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


class FinalState(TrainerCallback):
    """The model's state after the last optimizer step, before `on_train_end` (where the refit acts)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.state = copy.deepcopy(model.state_dict())


@pytest.mark.parametrize("refit_steps", [1, 2])
def test_refit_solves_the_final_models_least_squares_by_hand(tiny_model_dir, tmp_path, refit_steps):
    """`self_reward_row_refit_steps`: after the last step, z_c's row moves by `-(B + lambda I)^-1 u / beta`, with u and
    B from plain forwards of the *final* model over the last steps' completions alone (no running matrix)."""
    trainer = make_trainer(tiny_model_dir, tmp_path, max_steps=2, **LS, self_reward_row_refit_steps=refit_steps)
    force_completions(trainer)
    final = FinalState()
    trainer.add_callback(final)
    batches = capture_batches(trainer)
    trainer.train()
    beta, ridge = 0.1, LS["self_reward_row_ridge"]
    sums = [by_hand(tiny_model_dir, final.state, batch, beta, 0.1) for batch in batches[-refit_steps:]]
    u, gram = sum(u for u, _ in sums), sum(g for _, g in sums)
    d = gram.size(0)
    expected = -torch.linalg.solve(gram + ridge * torch.trace(gram) / d * torch.eye(d, dtype=gram.dtype), u) / beta
    moved = trainer.model.lm_head.weight[ZC].detach().double() - final.state["lm_head.weight"][ZC].double()
    torch.testing.assert_close(moved, expected, rtol=1e-4, atol=1e-6)
    assert expected.norm() > 1e-3
    others = torch.arange(trainer.model.lm_head.weight.size(0)) != ZC
    assert torch.equal(trainer.model.lm_head.weight[others], final.state["lm_head.weight"][others])


def test_resume_without_the_row_state_fails_clearly(tiny_model_dir, tmp_path):
    first = make_trainer(tiny_model_dir, tmp_path, max_steps=1, save_strategy="steps", save_steps=1, **LS)
    force_completions(first)
    first.train()
    checkpoint = tmp_path / "out" / "checkpoint-1"
    os.remove(checkpoint / ROW_STATE_NAME)
    resumed = make_trainer(tiny_model_dir, tmp_path, max_steps=2, **LS)
    with pytest.raises(FileNotFoundError, match="self_reward_row_update"):
        resumed.train(resume_from_checkpoint=str(checkpoint))


def test_refused_with_peft(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match=r"self_reward_row_update.*PEFT"):
        make_trainer(tiny_model_dir, tmp_path, peft_config=peft_config, **LS)
    # With the row-only MSE, the fix the error names turns both settings off (either alone is refused too).
    with pytest.raises(ValueError, match=r"Set `self_reward_row_update: optimizer` and `self_reward_row_only: false`"):
        make_trainer(tiny_model_dir, tmp_path, peft_config=peft_config, self_reward_row_only=True, **LS)


@pytest.mark.parametrize(
    "field, value",
    [
        ("self_reward_row_update", "adam"),
        ("self_reward_row_ridge", 0.0),
        ("self_reward_row_ridge", -1.0),
        ("self_reward_row_ridge", math.inf),
        ("self_reward_row_ridge", True),
        ("self_reward_row_forgetting", 0.0),
        ("self_reward_row_forgetting", 1.5),
        ("self_reward_row_forgetting", math.nan),
        ("self_reward_row_refit_steps", -1),
        ("self_reward_row_refit_steps", 1.5),
    ],
)
def test_bad_setting_names_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        LaSeRConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **{field: value})


def test_refit_needs_the_least_squares_row(tmp_path):
    with pytest.raises(ValueError, match="self_reward_row_refit_steps"):
        LaSeRConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, self_reward_row_refit_steps=4)


def test_no_hooks_by_default(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path)
    trainer.create_optimizer()
    assert trainer.row_update is None and trainer.args.self_reward_row_update == "optimizer"


def test_training_logs_the_mean_token_logprob_baseline(tiny_model_dir, tmp_path):
    """The logged baseline AUROC equals one computed directly from the batch's mean token log-probs and labels."""
    trainer = make_trainer(tiny_model_dir, tmp_path, max_steps=1)
    force_completions(trainer)
    batches = capture_batches(trainer)
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer.train()
    batch = batches[0]
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        logits = before(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
    n = batch["completion_ids"].size(1)
    token_logps = logits.log_softmax(-1).gather(2, ids[:, 1:, None]).squeeze(2)[:, -n:]
    loss_mask = batch["completion_mask"] * batch["tool_mask"]
    mean_logp = (token_logps * loss_mask).sum(1) / loss_mask.sum(1)
    rows = (batch["self_reward_index"] >= 0) & (batch["self_reward_coef"] != 0)
    expected = auroc(mean_logp[rows].tolist(), batch["self_reward_target"][rows].tolist())
    logged = [h["self_reward/auroc_mean_token_logprob"] for h in trainer.state.log_history if "self_reward/auroc" in h]
    assert expected is not None and logged == [pytest.approx(expected, abs=1e-6)]
    assert len(FIXED) == batch["prompt_ids"].size(0)
