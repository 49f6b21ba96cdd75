"""The mixing phase without an extra forward: z_c's log-prob read while TRL generates equals the training forward's,
so the mixed advantages and the update equal the extra-forward path's; the forward stays where nothing else has it."""

from __future__ import annotations

import pytest
import torch
from conftest import MAX_LEN, force_completions, training_zc_logps
from test_trainer import generation_batch, make_trainer


MIXING = dict(learning_rate=1e-2, max_steps=1, self_reward_ref_constant=-10.0)


def counting_forwards(trainer) -> list[bool]:
    calls: list[bool] = []
    original = trainer._laser_logps

    def counting(batch, reference=False):
        calls.append(batch["completion_ids"].size(0))
        return original(batch, reference)

    trainer._laser_logps = counting
    return calls


def sampled_batch(trainer, capture: bool) -> dict:
    """One generation batch sampled from seed 0, with z_c read during generation or by the extra forward."""
    if not capture:
        trainer.zc_capture = None
    torch.manual_seed(0)
    return trainer._generate_and_score_completions(generation_batch())


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_generation_time_score_gives_the_extra_forward_advantages(tiny_model_dir, tmp_path, scale_rewards):
    trainer = make_trainer(tiny_model_dir, tmp_path, scale_rewards=scale_rewards, **MIXING)
    trainer.model.train()
    calls = counting_forwards(trainer)
    captured = sampled_batch(trainer, capture=True)
    finished = captured["self_reward_index"] >= 0
    at_limit = captured["self_reward_index"] == MAX_LEN  # EOS was the last allowed token: no generate step after it
    assert finished.any() and (~finished).any()  # both kinds of rows, from real sampling
    # A no-grad forward only over the rows that ended at the very last step, none when there are none.
    assert calls == ([int(at_limit.sum())] if at_limit.any() else [])
    read = torch.tensor(trainer._laser_generation_zc)
    forward = training_zc_logps(trainer, captured)  # the policy's own forward, parameters unchanged since generating
    ok = finished & ~at_limit
    torch.testing.assert_close(read[ok], forward[ok], atol=2e-5, rtol=0)

    calls.clear()
    extra = sampled_batch(trainer, capture=False)
    assert calls == [int(finished.sum())]  # the extra-forward path: every finished row
    assert torch.equal(extra["completion_ids"], captured["completion_ids"])
    assert not torch.equal(captured["advantages"], torch.zeros_like(captured["advantages"]))
    torch.testing.assert_close(captured["advantages"], extra["advantages"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("peft", [False, True])
def test_generation_time_score_gives_the_same_update(tiny_model_dir, tmp_path, peft):
    peft_config = None
    if peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    params, forwards = {}, {}
    for capture in (True, False):
        trainer = make_trainer(tiny_model_dir, tmp_path / str(capture), peft_config=peft_config, **MIXING)
        if not capture:
            trainer.zc_capture = None
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        forwards[capture] = counting_forwards(trainer)
        torch.manual_seed(0)
        trainer.train()
        params[capture] = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        assert any(not torch.equal(before[n], params[capture][n]) for n in before)  # the step moved the weights
    assert sum(forwards[True]) < sum(forwards[False])  # the extra forward covered every finished row
    for name in params[True]:
        torch.testing.assert_close(params[True][name], params[False][name], atol=1e-6, rtol=1e-5)


def test_fixed_completions_fall_back_to_one_forward_over_finished_rows(tiny_model_dir, tmp_path):
    """Completions that `generate` did not make (here: forced; in general vLLM) carry no generation-time value."""
    trainer = make_trainer(tiny_model_dir, tmp_path, **MIXING)
    force_completions(trainer)
    trainer.model.train()
    calls = counting_forwards(trainer)
    batch = trainer._generate_and_score_completions(generation_batch())
    assert calls == [int((batch["self_reward_index"] >= 0).sum())]


def test_missing_rows_are_padded_to_the_largest_count_of_any_process():
    """Under ZeRO-3 / FSDP every process must run as many forward calls as the others: each forwards the largest
    missing count of any process, its own rows first, padded with its row 0."""
    from trl_laser.generation_capture import complete_generation_zc

    nan = float("nan")
    finished = torch.tensor([True, True, False, True])
    seen = []

    def forward(rows):
        seen.append(rows.tolist())
        return -10.0 - rows.float()

    values, computed = complete_generation_zc([-1.0, nan, nan, nan], finished, forward, max_over_processes=lambda n: 3)
    assert seen == [[1, 3, 0]] and computed == 2
    torch.testing.assert_close(values[[0, 1, 3]], torch.tensor([-1.0, -11.0, -13.0]))
    assert torch.isnan(values[2])  # truncated: no score
    seen.clear()  # nothing missing here, but another process lacks 2 rows: this one joins with its row 0, twice
    values, computed = complete_generation_zc(
        [-1.0, -2.0, nan, -4.0], finished, forward, max_over_processes=lambda n: 2
    )
    assert seen == [[0, 0]] and computed == 0 and values[3].item() == -4.0
    seen.clear()  # nowhere anything missing: no forward at all
    complete_generation_zc([-1.0, -2.0, nan, -4.0], finished, forward, max_over_processes=lambda n: 0)
    assert seen == []
