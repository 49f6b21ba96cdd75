"""Test-time scores equal the trainer's, and scores captured during generation equal scoring after the fact."""

from __future__ import annotations

import math
import shutil

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
    build_tiny_model,
    force_completions,
    training_zc_logps,
)
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_laser import SELF_REWARD_CONFIG_NAME, LaSeRConfig, LaSeRGRPOTrainer, SelfRewardSettings, scoring
from trl_laser.scoring import generate_with_self_rewards, last_position, score_completions, shared_prompt_cache
from trl_laser.settings import resolve_settings


BETA, C_REF = 0.1, -10.0
PROMPTS = [[{"role": "user", "content": f"What is {i} + {i}?"}] for i in range(2)]


def sensitive_model(tokenizer) -> torch.nn.Module:
    """The tiny model with a z_c logit that depends on the context, so that a misplaced read changes the score.

    (In the plain tiny model z_c's row is untrained and log pi(z_c) is the same everywhere to 1e-4.)
    """
    model = build_tiny_model(tokenizer)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        hidden = model.lm_head.weight.shape[1]
        model.lm_head.weight[ZC, 1:] = torch.randn(hidden - 1, generator=generator) * 3.0
    model.generation_config.eos_token_id = [EOS, EOS2]
    return model


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tokenizer, tmp_path_factory) -> str:
    """The sensitive tiny model saved with its tokenizer and self-reward settings (as the trainer saves them)."""
    path = str(tmp_path_factory.mktemp("scoring") / "model")
    sensitive_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    SelfRewardSettings(SELF_REWARD_TOKEN, ZC, BETA, C_REF, eos_token_ids=[EOS, EOS2]).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_and_tokenizer(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


def direct_score(model, tokenizer, prompt, completion_ids) -> float:
    """beta * (log pi(z_c | x, y) - c_ref) from a plain, unpadded full-logits forward (independent of the module)."""
    if isinstance(prompt, str):  # TRL's standard (non-conversational) prompt: the text as it is
        prompt_ids = tokenizer(prompt)
    else:
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = torch.tensor([list(prompt_ids["input_ids"]) + list(completion_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].double()
    return BETA * (torch.log_softmax(logits, -1)[ZC].item() - C_REF)


# ------------------------------------------------------------------------------------------ against the trainer
def fixed_batch(model, tmp_path, completions=None, **kwargs):
    """A trainer on PROMPTS (bf16=False: autocast off, so that 1e-5 is meaningful) and its generation batch of the
    fixed `completions`, made by its own `_generate_and_score_completions`."""
    cast = kwargs.pop("cast_lm_head_to_fp32", False)
    trainer = LaSeRGRPOTrainer(
        model=model,
        reward_funcs=[lambda completion_ids, **kw: [float(len(c) % 2 == 0) for c in completion_ids]],
        args=LaSeRConfig(
            output_dir=str(tmp_path / "out"),
            per_device_train_batch_size=8,
            num_generations=4,
            max_completion_length=MAX_LEN,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            bf16=False,
            self_reward_token=SELF_REWARD_TOKEN,
            self_reward_ref_constant=C_REF,
            self_reward_beta=BETA,
            cast_lm_head_to_fp32=cast,
        ),
        train_dataset=Dataset.from_list([{"prompt": p, "answer": "0"} for p in PROMPTS]),
        **kwargs,
    )
    if cast:  # as after fp32 updates: head values that bf16 cannot hold, saved in fp32
        with torch.no_grad():
            trainer.model.lm_head.weight.add_(torch.randn_like(trainer.model.lm_head.weight) * 1e-3)
    force_completions(trainer, FIXED if completions is None else completions)
    trainer.model.train()
    return trainer, trainer._generate_and_score_completions(
        [{"prompt": p, "answer": "0"} for p in PROMPTS for _ in range(4)]
    )


def test_score_completions_equals_the_trainers_score(model_dir, tmp_path):
    trainer, batch = fixed_batch(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path)

    # The trainer's own computation: its training forward (TRL's fused LM head) on its ids with z_c appended.
    index = batch["self_reward_index"]
    assert index.tolist() == [len(c) if done else -1 for c, done in zip(FIXED, FINISHED)]
    assert all(batch["completion_ids"][r, i].item() == ZC for r, i in enumerate(index.tolist()) if i >= 0)
    trainer_scores = BETA * (training_zc_logps(trainer, batch).double() - batch["self_reward_ref"])

    # Score with the model as the trainer saved it: the settings come from its self_reward_config.json.
    saved = str(tmp_path / "saved")
    trainer.save_model(saved)
    assert SelfRewardSettings.from_pretrained(saved).eos_token_ids == [EOS, EOS2]
    prompts = [p for p in PROMPTS for _ in range(4)]
    scores = score_completions(
        AutoModelForCausalLM.from_pretrained(saved), AutoTokenizer.from_pretrained(saved), prompts, FIXED
    )
    assert [s is not None for s in scores] == FINISHED
    finished = [i for i, done in enumerate(FINISHED) if done]
    got = torch.tensor([scores[i] for i in finished], dtype=torch.float64)
    assert torch.allclose(got, trainer_scores[finished], atol=1e-5, rtol=0)
    assert got.max() - got.min() > 0.05  # the scores differ across rows: a misplaced read would show


def test_score_completions_equals_a_direct_forward_in_any_batch(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = [PROMPTS[i // 4] for i in range(8)]
    expected = [direct_score(model, tokenizer, p, c) if done else None for p, c, done in zip(prompts, FIXED, FINISHED)]
    for batch_size in (1, 3, 8):  # padding and sorting by length must not change a score
        scores = score_completions(model, tokenizer, prompts, FIXED, batch_size=batch_size)
        for s, e in zip(scores, expected):
            assert (s is None and e is None) or s == pytest.approx(e, abs=1e-5)
    assert max(e for e in expected if e is not None) - min(e for e in expected if e is not None) > 0.05


def test_text_completions_and_prompt_forms(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = tokenizer("The answer is 4.", add_special_tokens=False)["input_ids"]
    by_ids = score_completions(model, tokenizer, [PROMPTS[0]], [ids + [EOS]])[0]
    prompt_ids = tokenizer.apply_chat_template(PROMPTS[0], add_generation_prompt=True, tokenize=True, return_dict=True)
    # A text ending with the EOS string is finished; without it, it is truncated. Prompt ids are used as given.
    scores = score_completions(
        model,
        tokenizer,
        [PROMPTS[0], PROMPTS[0], list(prompt_ids["input_ids"])],
        ["The answer is 4.<|im_end|>", "The answer is 4.", ids + [EOS]],
    )
    assert scores[0] == pytest.approx(by_ids, abs=1e-6) and scores[2] == pytest.approx(by_ids, abs=1e-6)
    assert scores[1] is None
    assert score_completions(model, tokenizer, [PROMPTS[0]], [[]]) == [None]


def test_overrides_apply_the_formula(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    saved = score_completions(model, tokenizer, [PROMPTS[0]], [FIXED[0]])[0]
    logp = saved / BETA + C_REF
    other = score_completions(
        model,
        tokenizer,
        [PROMPTS[0]],
        [FIXED[0]],
        overrides={"self_reward_beta": 0.5, "self_reward_ref_constant": -20.0},
    )[0]
    assert other == pytest.approx(0.5 * (logp + 20.0), abs=1e-6)
    # Another z_c: <repo_name> (id 3) reads another logit.
    settings = resolve_settings(model, tokenizer, overrides={"self_reward_token": "<repo_name>"})
    assert (settings.self_reward_token_id, settings.self_reward_ref_constant, settings.eos_token_ids) == (
        3,
        C_REF,
        [2, 0],
    )


def test_last_position_reads_the_final_state_that_predicts_z_c(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.apply_chat_template(PROMPTS[0], add_generation_prompt=True, tokenize=True, return_dict=True)
    sequences = [list(prompt["input_ids"]) + c for c in FIXED]
    for batch_size in (1, 3, 8):  # padding and sorting by length must not change a state
        logps, states = last_position(model, sequences, ZC, EOS, batch_size, hidden_states=True)
        assert states.shape == (len(FIXED), model.config.hidden_size) and states.dtype == torch.float32
        for seq, logp, state in zip(sequences, logps, states):
            with torch.no_grad():
                out = model(input_ids=torch.tensor([seq]), output_hidden_states=True)
            assert torch.allclose(state, out.hidden_states[-1][0, -1], atol=1e-5)  # after the final norm
            assert logp == pytest.approx(out.logits[0, -1].log_softmax(-1)[ZC].item(), abs=1e-5)
            assert (model.lm_head.weight @ state).log_softmax(-1)[ZC].item() == pytest.approx(logp, abs=1e-5)
    assert not model.lm_head._forward_pre_hooks
    assert last_position(model, sequences, ZC, EOS, 4)[1] is None


def test_last_position_after_shared_prompts_equals_whole_forwards(model_and_tokenizer):
    """With the completions' lengths, the answers to one prompt are read after its prefill: the same log pi(z_c) and
    final states as forwards of each whole sequence, for any batch (prompts of two lengths, answers of several,
    answers to a prompt split across batches), and the probe's states too."""
    model, tokenizer = model_and_tokenizer
    prompts = [
        list(
            tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        )
        for p in PROMPTS + [[{"role": "user", "content": "What is 12 + 30, and why?"}]]
    ]
    completions = [c for c in FIXED for _ in range(2)]
    sequences = [prompts[k % 3] + c for k, c in enumerate(completions)]
    lengths = [len(c) for c in completions]
    whole_logps, whole_states = last_position(model, sequences, ZC, EOS, 8, hidden_states=True)
    assert len({p[-1] for p in prompts}) == 1 and len({len(p) for p in prompts}) == 2
    spread = max(whole_logps) - min(whole_logps)
    for batch_size in (1, 3, 5, 16):
        logps, states = last_position(
            model, sequences, ZC, EOS, batch_size, hidden_states=True, completion_lengths=lengths
        )
        assert logps == pytest.approx(whole_logps, abs=1e-5)
        assert torch.allclose(states, whole_states, atol=1e-5)
    assert spread > 1e-2  # the sensitive model's z_c differs by context: a misplaced read would show
    assert not model.lm_head._forward_pre_hooks


def test_last_position_shares_each_prompts_prefill(model_and_tokenizer):
    """N answers to one prompt: the model reads the prompt once (a prefill of the distinct prompts, then the answers
    after it), not once per answer."""
    model, tokenizer = model_and_tokenizer
    prompt = list(
        tokenizer.apply_chat_template(PROMPTS[0], add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )
    sequences = [prompt + c for c in FIXED]
    tokens = []
    handle = model.model.embed_tokens.register_forward_hook(lambda m, args, out: tokens.append(args[0].numel()))
    try:
        last_position(model, sequences, ZC, EOS, 8, completion_lengths=[len(c) for c in FIXED])
        shared = sum(tokens)
        tokens.clear()
        last_position(model, sequences, ZC, EOS, 8)
        whole = sum(tokens)
    finally:
        handle.remove()
    width = max(len(c) for c in FIXED) + 1  # the prompt's last token, then each answer, right-padded
    assert shared == (len(prompt) - 1) + len(FIXED) * width
    assert whole == len(FIXED) * max(len(s) for s in sequences)


# ------------------------------------------------------------------------------------------ during generation
@pytest.mark.parametrize(("max_new_tokens", "temperature"), [(5, 1.0), (64, 1.0), (2, 0.7)])
def test_generation_scores_equal_score_completions(model_and_tokenizer, max_new_tokens, temperature):
    model, tokenizer = model_and_tokenizer
    prompts = [PROMPTS[0], PROMPTS[1], "A plain text prompt"]
    torch.manual_seed(2)  # a seed under which every path below is taken (asserted at the end)
    results = generate_with_self_rewards(
        model, tokenizer, prompts, num_samples=4, batch_size=6, max_new_tokens=max_new_tokens, temperature=temperature
    )
    assert not model._forward_hooks
    flat = [c for samples in results for c in samples]
    assert [(c.prompt_index, c.sample_index) for c in flat] == [(p, s) for p in range(3) for s in range(4)]
    eos = {EOS, EOS2}
    for c in flat:
        assert c.finished == (c.token_ids[-1] in eos)
        assert not eos & set(c.token_ids[:-1])  # cut right after the first EOS, pad (== EOS) after it dropped
        assert (c.self_reward is None) == (not c.finished)

    expected = score_completions(
        model, tokenizer, [prompts[c.prompt_index] for c in flat], [c.token_ids for c in flat]
    )
    for c, e in zip(flat, expected):
        assert (c.self_reward is None and e is None) or c.self_reward == pytest.approx(e, abs=1e-5)
    # Discriminative: rows have scores that differ by more than the tolerance (a read from another row would show),
    # and reading one position too early (before the EOS) gives another value.
    assert len({round(c.self_reward, 4) for c in flat if c.finished}) >= 3
    early = [c for c in flat if c.finished and len(c.token_ids) > 1][0]
    before_eos = direct_score(model, tokenizer, prompts[early.prompt_index], early.token_ids[:-1])
    assert abs(before_eos - early.self_reward) > 0.05

    # The paths this must cover: a row ending at the last step (the one extra cached forward), rows ending earlier
    # while others go on (pads after their EOS), and, with a short limit, truncated rows.
    assert_generation_paths_covered(flat, max_new_tokens)
    if max_new_tokens >= 10:
        assert all(c.finished for c in flat)


def test_shared_prompt_cache_holds_each_rows_own_prefill(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = [scoring.tokenize_prompt(tokenizer, p) for p in (PROMPTS[0], "A plain text prompt")]
    width = max(map(len, ids))
    rows = [1, 0, 1, 1]  # the second prompt is shorter: left padding in its rows
    input_ids = torch.full((4, width), EOS)
    mask = torch.zeros_like(input_ids)
    for r, p in enumerate(rows):
        input_ids[r, width - len(ids[p]) :], mask[r, width - len(ids[p]) :] = torch.tensor(ids[p]), 1
    with torch.no_grad():
        cache = shared_prompt_cache(model, input_ids, mask, rows, {})
        for r, p in enumerate(rows):  # each row alone, unpadded: its keys and values at its own positions
            alone = model(input_ids=torch.tensor([ids[p][:-1]]), use_cache=True).past_key_values
            for layer, own in zip(cache.layers, alone.layers):
                assert torch.allclose(layer.keys[r, :, width - len(ids[p]) :], own.keys[0], atol=1e-5)
                assert torch.allclose(layer.values[r, :, width - len(ids[p]) :], own.values[0], atol=1e-5)
        assert cache.get_seq_length() == width - 1
        assert shared_prompt_cache(model, input_ids[:2], mask[:2], [1, 0], {}) is None  # nothing to share
        assert shared_prompt_cache(model, input_ids, mask, rows, {"cache_implementation": "static"}) is None


def test_shared_prompt_prefill_samples_what_every_rows_own_prefill_samples(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    prompts = [PROMPTS[0], PROMPTS[1], "A plain text prompt"]

    def sample(**kwargs):
        torch.manual_seed(3)
        results = generate_with_self_rewards(
            model, tokenizer, prompts, num_samples=4, batch_size=6, max_new_tokens=16, **kwargs
        )
        return [c for samples in results for c in samples]

    real, shared_batches = scoring.shared_prompt_cache, []

    def spy(*args):
        cache = real(*args)
        shared_batches.append(cache is not None)
        return cache

    monkeypatch.setattr(scoring, "shared_prompt_cache", spy)
    shared = sample()
    assert shared_batches == [True, True]  # both generate calls (rows 0-5, 6-11) started from a shared prefill
    own = sample(cache_implementation="dynamic")  # the same cache, built by `generate` from every row's own prefill
    assert shared_batches == [True, True, False, False]
    assert [c.token_ids for c in shared] == [c.token_ids for c in own]
    assert len({tuple(c.token_ids) for c in own}) >= 6  # sampled, not one answer repeated
    for a, b in zip(shared, own):
        assert a.self_reward == pytest.approx(b.self_reward, abs=1e-5) if b.finished else a.self_reward is None
        assert a.mean_token_logprob == pytest.approx(b.mean_token_logprob, abs=1e-5)


def direct_token_logprobs(model, tokenizer, prompt, completion_ids, temperature=1.0, excluded=()) -> list[float]:
    """log pi(y_t | x, y_<t) from one unpadded full-logits forward over prompt + completion (logits / temperature),
    with the `excluded` tokens' logits set to -inf."""
    if isinstance(prompt, str):
        prompt_ids = list(tokenizer(prompt)["input_ids"])
    else:
        out = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        prompt_ids = list(out["input_ids"])
    ids = torch.tensor([prompt_ids + list(completion_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double() / temperature
    logits[:, list(excluded)] = float("-inf")
    logps = logits.log_softmax(-1)
    positions = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1)
    return logps[positions, ids[0, len(prompt_ids) :]].tolist()


def assert_generation_paths_covered(flat, max_new_tokens):
    """The two generate calls (rows 0-5, 6-) hold a row ending at their last step and one ending earlier; with a
    short limit, also a truncated row."""
    batches = [flat[:6], flat[6:]]
    last_step = [max(len(c.token_ids) for c in b) for b in batches]
    assert any(c.finished and len(c.token_ids) == n for b, n in zip(batches, last_step) for c in b)
    assert any(c.finished and len(c.token_ids) < n for b, n in zip(batches, last_step) for c in b)
    if max_new_tokens < 10:
        assert any(not c.finished for c in flat)


@pytest.mark.parametrize(("max_new_tokens", "temperature"), [(5, 1.0), (64, 1.0), (2, 0.7)])
def test_generation_token_logprobs_equal_a_full_logits_forward(model_and_tokenizer, max_new_tokens, temperature):
    model, tokenizer = model_and_tokenizer
    prompts = [PROMPTS[0], PROMPTS[1], "A plain text prompt"]
    torch.manual_seed(2)
    results = generate_with_self_rewards(
        model, tokenizer, prompts, num_samples=4, batch_size=6, max_new_tokens=max_new_tokens, temperature=temperature
    )
    assert not model._forward_hooks
    flat = [c for samples in results for c in samples]
    for c in flat:
        # Finished: up to and including the EOS (pads after it are not counted); truncated: every generated token.
        expected = direct_token_logprobs(model, tokenizer, prompts[c.prompt_index], c.token_ids)
        assert len(expected) == len(c.token_ids) >= 1
        assert c.mean_token_logprob == pytest.approx(sum(expected) / len(expected), abs=1e-4)
        assert c.min_token_logprob == pytest.approx(min(expected), abs=1e-4)
    # Discriminative: the values differ across rows by more than the tolerance, and they are not the log-probs of the
    # tempered sampling distribution.
    assert len({round(c.mean_token_logprob, 3) for c in flat}) >= 3
    if temperature != 1.0:
        tempered = direct_token_logprobs(
            model, tokenizer, prompts[flat[0].prompt_index], flat[0].token_ids, temperature
        )
        assert abs(sum(tempered) / len(tempered) - flat[0].mean_token_logprob) > 1e-2
    # The paths: a row whose last token comes from the last forward call of `generate` (ended at the last step,
    # or truncated there), a row that ended earlier, and, with a short limit, truncated rows.
    assert_generation_paths_covered(flat, max_new_tokens)


def test_generation_token_logprobs_leave_the_suppressed_tokens_out(model_dir, tokenizer):
    """A model whose generation config suppresses z_c (as `fit-row` saves it) never samples it: the free signals are
    the log-probs of that distribution, renormalised without z_c; the score still reads the raw logits."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():  # z_c's share of the raw distribution inside answers, as a fitted row can give it
        model.lm_head.weight[ZC] *= 3.0
    model.generation_config.suppress_tokens = [ZC]
    prompts = [PROMPTS[0], PROMPTS[1]]
    torch.manual_seed(3)
    flat = [c for s in generate_with_self_rewards(model, tokenizer, prompts, 4, max_new_tokens=12) for c in s]
    shares = []
    for c in flat:
        assert ZC not in c.token_ids
        kept = direct_token_logprobs(model, tokenizer, prompts[c.prompt_index], c.token_ids, excluded=[ZC])
        raw = direct_token_logprobs(model, tokenizer, prompts[c.prompt_index], c.token_ids)
        assert c.mean_token_logprob == pytest.approx(sum(kept) / len(kept), abs=1e-4)
        assert c.min_token_logprob == pytest.approx(min(kept), abs=1e-4)
        shares.append(sum(kept) / len(kept) - sum(raw) / len(raw))
        if c.finished:
            assert c.self_reward == pytest.approx(direct_score(model, tokenizer, prompts[c.prompt_index], c.token_ids))
    # Discriminative: z_c holds enough of the raw distribution that leaving it out moves a mean by more than 1e-2.
    assert max(shares) > 1e-2 and min(shares) >= 0


def test_sampler_logprob_renormalises_without_the_suppressed_tokens():
    """vLLM's path (raw log-probs of the sampled and the suppressed tokens) against the softmax written out."""
    from trl_laser.vllm_scoring import sampler_logprob

    e = math.exp
    total = e(2) + e(1) + e(0) + e(-1)
    raw = {t: math.log(e(v) / total) for t, v in zip("abcd", (2, 1, 0, -1))}
    # "a" and "c" suppressed: "b" is sampled from {b, d} alone.
    assert sampler_logprob(raw["b"], [raw["a"], raw["c"]]) == pytest.approx(math.log(e(1) / (e(1) + e(-1))), 1e-12)
    assert sampler_logprob(raw["b"], []) == raw["b"]


# ------------------------------------------------------------------------------------------ errors
def test_model_without_settings_needs_overrides(tiny_model_dir, tmp_path, tokenizer):
    path = shutil.copytree(tiny_model_dir, tmp_path / "bare")
    model = AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(FileNotFoundError, match=f"{SELF_REWARD_CONFIG_NAME}.*self_reward_ref_constant"):
        score_completions(model, tokenizer, [PROMPTS[0]], [FIXED[0]])
    with pytest.raises(FileNotFoundError, match="self_reward_ref_constant"):
        generate_with_self_rewards(model, tokenizer, [PROMPTS[0]], overrides={"self_reward_token": SELF_REWARD_TOKEN})
    # Both overrides: beta_v defaults to the paper's 0.1, EOS ids come from the model as in TRL.
    settings = resolve_settings(
        model, tokenizer, overrides={"self_reward_token": SELF_REWARD_TOKEN, "self_reward_ref_constant": -12}
    )
    assert (settings.self_reward_beta, settings.self_reward_ref_constant, settings.eos_token_ids) == (
        0.1,
        -12.0,
        [EOS],
    )


def test_bad_arguments_are_named(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="num_samples"):
        generate_with_self_rewards(model, tokenizer, [PROMPTS[0]], num_samples=0)
    with pytest.raises(ValueError, match="num_beams"):
        generate_with_self_rewards(model, tokenizer, [PROMPTS[0]], num_beams=2)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        score_completions(model, tokenizer, PROMPTS, [FIXED[0]])
    with pytest.raises(ValueError, match="not a single token"):
        score_completions(model, tokenizer, [PROMPTS[0]], [FIXED[0]], overrides={"self_reward_token": "<not a token>"})
    with pytest.raises(ValueError, match="must be a number"):
        score_completions(model, tokenizer, [PROMPTS[0]], [FIXED[0]], overrides={"self_reward_ref_constant": "auto"})
    with pytest.raises(ValueError, match="EOS"):
        score_completions(model, tokenizer, [PROMPTS[0]], [FIXED[0]], overrides={"self_reward_token": EOS})


def test_score_completions_names_the_bad_argument(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    vocab = model.get_input_embeddings().num_embeddings
    assert vocab == len(tokenizer) == 49152
    cases = [
        ("What is 1 + 1?", ["2<|im_end|>"], TypeError, "`prompts` must be a list of prompts, got a string"),
        (["What is 1 + 1?"], "2<|im_end|>", TypeError, "`completions` must be a list of completions, got a string"),
        ([[1, 2]], [105, EOS], TypeError, "`completions` is a single list of token ids"),
        (PROMPTS[0], [FIXED[0], FIXED[1]], TypeError, "`prompts` is a single conversation"),
        (PROMPTS, [FIXED[0], [105, vocab, EOS]], ValueError, r"`completions\[1\]` holds the token id 49152, outside"),
        (PROMPTS, [FIXED[0], [-1, EOS]], ValueError, r"`completions\[1\]` holds the token id -1"),
        ([PROMPTS[0], [5, 10**6]], FIXED[:2], ValueError, r"`prompts\[1\]` holds the token id 1000000"),
    ]
    for prompts, completions, error, message in cases:
        with pytest.raises(error, match=message):
            score_completions(model, tokenizer, prompts, completions)
    with pytest.raises(ValueError, match=r"ids 0 to 49151\)"):
        score_completions(model, tokenizer, PROMPTS, [FIXED[0], [vocab, EOS]])
    with pytest.raises(TypeError, match="`prompts` must be a list of prompts, got a string"):
        generate_with_self_rewards(model, tokenizer, "What is 1 + 1?")
    with pytest.raises(ValueError, match=r"`prompts\[0\]` holds the token id 49152"):
        generate_with_self_rewards(model, tokenizer, [[5, vocab]])


# ------------------------------------------------------------------------------------------ fp32 LM head
SAME_LENGTH = [
    [105 + 3 * i, 106 + 3 * i, EOS] for i in range(8)
]  # no right padding: the body's bf16 rounding is equal


def _trainer_scores_and_saved(tokenizer, tmp_path, cast: bool):
    """A bf16 model trained with or without `cast_lm_head_to_fp32`: the trainer's own scores, and its saved copy."""
    model = sensitive_model(tokenizer).to(torch.bfloat16)
    trainer, batch = fixed_batch(model, tmp_path, SAME_LENGTH, cast_lm_head_to_fp32=cast, processing_class=tokenizer)
    scores = BETA * (training_zc_logps(trainer, batch).double() - batch["self_reward_ref"])
    saved = str(tmp_path / f"saved-{cast}")
    trainer.save_model(saved)
    return scores, saved


@pytest.mark.parametrize("cast", [True, False])
def test_fp32_head_setting_is_saved_and_scoring_matches_the_trainer(tokenizer, tmp_path, cast):
    from trl_laser.models import load_lm_head_fp32

    trainer_scores, saved = _trainer_scores_and_saved(tokenizer, tmp_path, cast)
    assert SelfRewardSettings.from_pretrained(saved).cast_lm_head_to_fp32 is cast
    prompts = [p for p in PROMPTS for _ in range(4)]

    def scores(honour: bool) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(saved, dtype="auto")
        assert model.lm_head.weight.dtype == torch.bfloat16  # loading rounds the head to the model's dtype
        settings = SelfRewardSettings.from_pretrained(saved)
        if honour and cast:
            assert load_lm_head_fp32(model, saved)  # the exact fp32 values the trainer saved
            assert model.lm_head.weight.dtype == torch.float32
        settings.cast_lm_head_to_fp32 = cast if honour else not cast
        return torch.tensor(score_completions(model, tokenizer, prompts, SAME_LENGTH, settings=settings)).double()

    # The bf16 body's kernels round a row now and then differently in the two forwards (up to ~1e-3 here): the head's
    # precision shows in the typical row, equal to 1e-6 when honoured and off by more than 1e-5 when not.
    honoured = (scores(honour=True) - trainer_scores).abs()
    ignored = (scores(honour=False) - trainer_scores).abs()
    assert honoured.median() < 1e-6 and (honoured < 1e-6).sum() >= 6
    assert ignored.median() > 1e-5
