"""A new user's mistakes that the library must refuse with one clear message, losing and changing nothing (issue 11):
resuming with other self-reward settings, a verifier that never answers, a malformed JSONL line, an unusable z_c."""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import re

import pytest
from conftest import EOS, SELF_REWARD_TOKEN, ZC, force_completions
from test_trainer import make_trainer, parity_reward

from trl_laser import SELF_REWARD_CONFIG_NAME
from trl_laser.data import load_problems
from trl_laser.row_update import ROW_STATE_NAME
from trl_laser.tokens import resolve_self_reward_token


TRAINED = dict(
    self_reward_ref_constant="auto",
    self_reward_row_update="least_squares",
    save_strategy="steps",
    save_steps=1,
)


def snapshot(folder) -> dict[str, tuple[str, int]]:
    """Every file under `folder`: its content hash and modification time."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    """A run of one step with "auto" c_ref and the least-squares row, saved as `out/checkpoint-1`."""
    root = tmp_path_factory.mktemp("resume")
    trainer = make_trainer(tiny_model_dir, root, max_steps=1, **TRAINED)
    force_completions(trainer)
    trainer.train()
    checkpoint = root / "out" / "checkpoint-1"
    assert (checkpoint / SELF_REWARD_CONFIG_NAME).is_file() and (checkpoint / ROW_STATE_NAME).is_file()
    return root


# ------------------------------------------------------------------------------------------ resuming
@pytest.mark.parametrize(
    "change, here, there",
    [
        ({"self_reward_token": "<file_sep>"}, "'<file_sep>' (id 5)", "'<gh_stars>' (id 7)"),
        ({"self_reward_beta": 0.2}, "0.2", "0.1"),
        ({"self_reward_ref_constant": -10.0}, "-10.0", "'auto' (c_ref = "),
        ({"self_reward_row_update": "optimizer"}, "'optimizer'", "'least_squares'"),
    ],
)
def test_resume_with_other_settings_is_refused_and_changes_nothing(tiny_model_dir, run_dir, change, here, there):
    (name,) = change
    settings = {**TRAINED, **change}
    before = snapshot(run_dir / "out")
    saved = json.loads((run_dir / "out" / "checkpoint-1" / SELF_REWARD_CONFIG_NAME).read_text())
    resumed = make_trainer(tiny_model_dir, run_dir, max_steps=2, **settings)
    with pytest.raises(ValueError) as err:
        resumed.train(resume_from_checkpoint=str(run_dir / "out" / "checkpoint-1"))
    message = str(err.value)
    assert f"`{name}` is {here} here but {there}" in message and "checkpoint-1" in message
    assert "Resume with the checkpoint's values, or start a new run" in message
    if name == "self_reward_ref_constant":
        assert f"c_ref = {saved['self_reward_ref_constant']})" in message
    assert snapshot(run_dir / "out") == before


def test_resume_accepts_the_same_token_given_by_id(tiny_model_dir, run_dir):
    resumed = make_trainer(tiny_model_dir, run_dir, max_steps=2, **{**TRAINED, "self_reward_token": ZC})
    resumed._check_resume_settings(str(run_dir / "out" / "checkpoint-1"))  # the same z_c: no error


# ------------------------------------------------------------------------------------------ verifier without values
def never_verifies(completion_ids, **kwargs):
    return [None] * len(completion_ids)


def test_verifier_without_any_value_at_the_first_batch_is_an_error(tiny_model_dir, tmp_path):
    trainer = make_trainer(
        tiny_model_dir, tmp_path, reward_funcs=[never_verifies], max_steps=1, save_strategy="steps", save_steps=1
    )
    force_completions(trainer)
    with pytest.raises(ValueError, match="'never_verifies' returned None for every completion of the first") as err:
        trainer.train()
    assert "self_reward_verifier" in str(err.value)
    out = tmp_path / "out"
    assert not list(out.rglob(SELF_REWARD_CONFIG_NAME)) and not list(out.glob("checkpoint-*"))


def test_verifier_without_any_value_later_warns_and_is_counted(tiny_model_dir, tmp_path, caplog):
    def verifier_silent_at_step_1(completion_ids, trainer_state, **kwargs):
        return never_verifies(completion_ids) if trainer_state.global_step == 1 else parity_reward(completion_ids)

    trainer = make_trainer(tiny_model_dir, tmp_path, reward_funcs=[verifier_silent_at_step_1], max_steps=3)
    force_completions(trainer)
    with caplog.at_level(logging.WARNING, logger="trl_laser.trainer"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "returned None for every completion" in r.getMessage()]
    assert len(warnings) == 1 and "'verifier_silent_at_step_1'" in warnings[0] and "(step 1)" in warnings[0]
    logged = {h["step"]: h for h in trainer.state.log_history if "self_reward/verifier_missing" in h}
    assert {step: h["self_reward/verifier_missing"] for step, h in logged.items()} == {1: 0.0, 2: 1.0, 3: 0.0}
    # The silent batch has no class member; the others have FIXED's 6 finished completions, of lengths 3, 2, 6, 2, 3
    # and 1: 3 of even length ("correct"), 3 odd.
    assert [logged[s]["self_reward/n_correct"] for s in (1, 2, 3)] == [3.0, 0.0, 3.0]
    assert [logged[s]["self_reward/n_incorrect"] for s in (1, 2, 3)] == [3.0, 0.0, 3.0]


# ------------------------------------------------------------------------------------------ z_c candidates
def test_candidate_tokens_are_only_tokens_that_are_accepted(tiny_model_dir, tmp_path):
    # Only <|im_end|> is EOS here, so <|endoftext|> (id 0) is not an EOS, but it is the unknown token: refused.
    with pytest.raises(ValueError, match="unknown token") as err:
        make_trainer(tiny_model_dir, tmp_path, eos_ids=None, self_reward_token="<|endoftext|>")
    candidates = ast.literal_eval(re.search(r"Candidates in this vocabulary: (\[.*?\])", str(err.value)).group(1))
    # The added tokens by id: 0 unknown, 1 <|im_start|> (chat template), 2 <|im_end|> (EOS, pad), then 3..7.
    assert candidates == ["<repo_name>", "<reponame>", "<file_sep>", "<filename>", SELF_REWARD_TOKEN]
    trainer = make_trainer(tiny_model_dir, tmp_path, eos_ids=None)
    assert trainer.eos_token_ids == [EOS]
    vocab = trainer.model.get_input_embeddings().num_embeddings

    def resolve(token):
        return resolve_self_reward_token(trainer.processing_class, token, vocab, trainer.eos_token_ids)

    assert [resolve(c) for c in candidates] == [(i, c) for i, c in enumerate(candidates, 3)]
    with pytest.raises(ValueError, match=r"`self_reward_token=0` \(id 0\) is the tokenizer's unknown token"):
        resolve(0)


# ------------------------------------------------------------------------------------------ data files
def test_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "problems.jsonl"
    rows = [
        '{"problem": "1+1", "answer": "2"}',
        "",
        '{"problem": "2+2", "answer": "4"',
        '{"problem": "3+3", "answer": "6"}',
    ]
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"problems\.jsonl, line 3: not valid JSON") as err:
        load_problems(str(path))
    assert str(path) in str(err.value)
    path.write_text("\n".join(rows[:2] + ["[1, 2]"]) + "\n")
    with pytest.raises(ValueError, match=r"line 3: a JSON list, not an object"):
        load_problems(str(path))
    path.write_text("\n".join(rows[:2] + [rows[3]]) + "\n")  # a blank line is fine
    assert load_problems(str(path))["answer"] == ["2", "6"]


def test_malformed_json_document_is_named(tmp_path):
    path = tmp_path / "problems.json"
    path.write_text('[\n  {"problem": "1+1", "answer": "2"},\n  {"problem": "2+2" "answer": "4"}\n]\n')
    with pytest.raises(ValueError, match=r"problems\.json is not valid JSON: line 3, column 21"):
        load_problems(str(path))
