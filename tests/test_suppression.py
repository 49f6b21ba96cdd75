"""z_c left out of the policy (`self_reward_exclude_from_policy`): the renormalised log-probs against the softmax
written out, a zero gradient in z_c's row, and a policy that z_c's row no longer moves."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import EOS, ZC, force_completions
from test_trainer import generation_batch, make_trainer
from transformers import GenerationConfig, LlamaConfig

from trl_laser import LaSeRConfig
from trl_laser.core import log1mexp, logps_without_token
from trl_laser.suppression import PolicyWithoutToken, suppress_in_generation


@pytest.mark.parametrize("x", [-1e-6, -1e-3, -0.5, -math.log(2), -0.8, -5.0, -40.0])
def test_log1mexp_is_accurate_in_float32_at_both_ends(x):
    # float64 reference; in float32, log1p(-exp(-1e-6)) alone is off by about 6% (exp rounds near 1)
    expected = math.log(-math.expm1(x))
    assert log1mexp(torch.tensor(x, dtype=torch.float32)).item() == pytest.approx(expected, rel=1e-6)


def test_logps_without_token_by_hand():
    # Vocabulary a, b, z_c, d with logits 1, 2, 3, 0; the sampled token is b.
    logits = torch.tensor([1.0, 2.0, 3.0, 0.0], dtype=torch.float64, requires_grad=True)
    logp_b = torch.log_softmax(logits, -1)[1]
    value = logps_without_token(logp_b, logits[1], logits[2])
    e = math.e
    assert value.item() == pytest.approx(2 - math.log(e + e**2 + 1), abs=1e-12)
    value.backward()
    # d/dl_k of log q(b) over {a, b, d}: 1[k = b] - q_k, and 0 for z_c
    q = [e / (e + e**2 + 1), e**2 / (e + e**2 + 1), 0.0, 1 / (e + e**2 + 1)]
    expected = [-q[0], 1 - q[1], 0.0, -q[3]]
    assert logits.grad.tolist() == pytest.approx(expected, abs=1e-12)


def test_renormalisation_where_z_c_takes_nearly_all_the_softmax():
    """Where z_c's share rounds to 1 in float32 the identity gives -inf - -inf; those positions' softmax is written out
    without z_c instead: values and gradients equal a float64 hand computation at every position."""
    torch.manual_seed(0)
    vocab, dim, zc = 9, 5, ZC
    hidden = torch.randn(1, 4, dim)
    weight = torch.randn(vocab, dim)
    hidden[0, 2] -= hidden[0, 2] @ hidden[0, 1] / hidden[0, 1].norm() ** 2 * hidden[0, 1]  # z_c's logit 0 there
    hidden[0, 3] = -hidden[0, 1]
    weight[zc] = hidden[0, 1] * 40 / hidden[0, 1].norm() ** 2  # z_c's logit 40 at position 1, -40 at 3
    labels = torch.tensor([[-100, 3, 5, 1]])  # position t's log-prob is of labels[t] (-100: not scored)
    head = torch.nn.Linear(dim, vocab, bias=False)
    head.weight.data.copy_(weight)
    model = SimpleNamespace(get_output_embeddings=lambda: head)
    policy = PolicyWithoutToken(zc, temperature=0.7)

    h = hidden.clone().requires_grad_(True)
    logits = (h @ head.weight.T) / 0.7  # the fused head's float32 log-probs of the labels
    fused = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    fused = fused.masked_fill(labels == -100, 0.0)
    out = policy._renormalise(model, fused, h, labels)
    shares = torch.softmax(logits, -1)[0, :, zc].detach()
    assert shares[1] == 1.0 and shares[2:].max() < 0.5  # one position rounds to 1, the others take the identity

    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    logits64 = ((h64 @ w64.T) / 0.7).index_fill(-1, torch.tensor([zc]), -math.inf)
    expected = torch.log_softmax(logits64, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    expected = expected.masked_fill(labels == -100, 0.0)
    assert out[0].tolist() == pytest.approx(expected[0].tolist(), abs=1e-5)
    assert out[0, 0].item() == 0.0

    out.sum().backward()
    expected.sum().backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(head.weight.grad).all()
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-4, rtol=0)
    torch.testing.assert_close(head.weight.grad.double(), w64.grad, atol=1e-4, rtol=0)
    assert head.weight.grad[zc].abs().max() < 1e-5  # still no gradient in z_c's row


def loss_logps(trainer, batch):
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, batch["completion_ids"].size(1))
    return logps


@pytest.mark.parametrize("exclude", [False, True])
def test_loss_logps_are_the_suppressed_samplers(tiny_model_dir, tmp_path, exclude):
    trainer = make_trainer(
        tiny_model_dir, tmp_path, self_reward_suppress_sampling=True, self_reward_exclude_from_policy=exclude
    )
    head = trainer.model.get_output_embeddings().weight
    with torch.no_grad():
        head[ZC] = head[EOS] * 1.2  # z_c takes a large share everywhere, as after the least-squares row's steps
    force_completions(trainer)
    trainer.model.train()
    batch = trainer._generate_and_score_completions(generation_batch())
    logps = loss_logps(trainer, batch)

    largest_share = 0.0
    for row in range(logps.size(0)):
        prompt = batch["prompt_ids"][row][batch["prompt_mask"][row].bool()]
        completion = batch["completion_ids"][row][batch["completion_mask"][row].bool()]
        with torch.no_grad():
            logits = trainer.model(input_ids=torch.cat([prompt, completion])[None]).logits[0].double()
        logits = logits[prompt.numel() - 1 : -1]  # position t predicts completion id t
        raw = torch.log_softmax(logits, -1).gather(1, completion[:, None]).squeeze(1)
        without = torch.log_softmax(logits.index_fill(1, torch.tensor([ZC]), -math.inf), -1)
        without = without.gather(1, completion[:, None]).squeeze(1)
        is_zc = completion == ZC  # the score after the EOS keeps z_c's raw log-prob
        expected = torch.where(is_zc, raw, without) if exclude else raw
        assert logps[row, : completion.numel()].double().tolist() == pytest.approx(expected.tolist(), abs=2e-5)
        largest_share = max(largest_share, (raw - without)[~is_zc].abs().max().item())
    assert largest_share > 0.1  # the two differ: the test sees the renormalisation

    # The policy's loss no longer reaches z_c's row.
    policy = batch["completion_mask"] * batch["tool_mask"]
    (loss_logps(trainer, batch) * policy).sum().backward()
    # float32 rounding of the two cancelling terms leaves about 1e-5, where the raw loss gives 66
    assert (head.grad[ZC].abs().max().item() < 1e-4) == exclude
    assert head.grad[EOS].abs().max().item() > 1.0


def share_of_eos(trainer) -> torch.Tensor:
    """z_c's row made EOS's: z_c takes EOS's share of every position (about 0.12), and the row is returned."""
    head = trainer.model.get_output_embeddings().weight
    with torch.no_grad():
        head[ZC] = head[EOS]
    return head[ZC].detach().clone()


@pytest.mark.parametrize("exclude", [False, True])
def test_z_c_row_no_longer_moves_the_policy(tiny_model_dir, tmp_path, exclude):
    """LaSeR with its least-squares row, row only, against GRPO (no self-reward loss): same samples, so that every
    other parameter ends equal when z_c is out of the policy, and only then."""
    common = dict(
        max_steps=3,
        learning_rate=1e-3,
        self_reward_advantage_coef=0.0,
        self_reward_suppress_sampling=True,
        self_reward_exclude_from_policy=exclude,
    )
    # each trained as soon as built: a trainer's init seeds the global RNG that the other's sampling draws from
    laser = make_trainer(
        tiny_model_dir,
        tmp_path / "laser",
        self_reward_row_update="least_squares",
        self_reward_row_only=True,
        **common,
    )
    initial_row = share_of_eos(laser)
    laser.train()
    grpo = make_trainer(tiny_model_dir, tmp_path / "grpo", self_reward_loss_coef=0.0, **common)
    share_of_eos(grpo)
    grpo.train()
    laser_params, grpo_params = dict(laser.model.named_parameters()), dict(grpo.model.named_parameters())
    row = laser_params["lm_head.weight"][ZC].detach()
    assert (row - initial_row).norm().item() > 0.1  # the least-squares row did move
    largest = 0.0
    for name, value in laser_params.items():
        other = grpo_params[name].detach()
        value = value.detach()
        if name == "lm_head.weight":
            value, other = value[torch.arange(value.size(0)) != ZC], other[torch.arange(other.size(0)) != ZC]
        largest = max(largest, (value - other).abs().max().item())
    if exclude:
        assert largest < 1e-5
    else:
        assert largest > 1e-4


@pytest.mark.parametrize("suppress", [False, True])
def test_saved_model_samples_as_it_was_trained(tiny_model_dir, tmp_path, suppress):
    trainer = make_trainer(tiny_model_dir, tmp_path, self_reward_suppress_sampling=suppress)
    trainer.save_model(str(tmp_path / "saved"))
    saved = GenerationConfig.from_pretrained(str(tmp_path / "saved")).suppress_tokens
    assert saved == ([ZC] if suppress else None)


def test_vllm_gets_a_logit_bias_and_the_users_kwargs_stay_as_given():
    users = {"logit_bias": {"3": -5}}  # keys as a YAML or JSON config gives them
    model = SimpleNamespace(generation_config=GenerationConfig())
    trainer = SimpleNamespace(
        use_vllm=True,
        vllm_generation=SimpleNamespace(generation_kwargs=users),
        accelerator=SimpleNamespace(unwrap_model=lambda m: m),
        model=model,
    )
    suppress_in_generation(trainer, ZC)
    assert trainer.vllm_generation.generation_kwargs["logit_bias"] == {3: -5.0, ZC: -100.0}
    assert users == {"logit_bias": {"3": -5}}
    assert model.generation_config.suppress_tokens == [ZC]  # the saved model samples as trained


def test_exclude_from_policy_needs_suppressed_sampling():
    with pytest.raises(ValueError, match="self_reward_exclude_from_policy.*self_reward_suppress_sampling: true"):
        LaSeRConfig(output_dir="unused", self_reward_exclude_from_policy=True, use_cpu=True, bf16=False)


def test_exclude_from_policy_refuses_transformed_logits():
    class Model:
        config = LlamaConfig(final_logit_softcapping=30.0)

    with pytest.raises(ValueError, match="self_reward_exclude_from_policy.*final_logit_softcapping"):
        PolicyWithoutToken.check_model(Model())
