"""LaSeRConfig: paper defaults and one test per validation error."""

import pytest

from trl_laser import LaSeRConfig
from trl_laser.config import parse_ref_constant


def make(tmp_path, **kwargs) -> LaSeRConfig:
    return LaSeRConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kwargs)


def test_paper_defaults(tmp_path):
    args = make(tmp_path, self_reward_token="<gh_stars>")
    assert (args.self_reward_beta, args.self_reward_loss_coef, args.self_reward_advantage_coef) == (0.1, 0.1, 0.1)
    assert args.self_reward_std_threshold == 0.1 and args.self_reward_balanced
    assert (args.reasoning_warmup_steps, args.self_reward_warmup_steps) == (0, 0)
    assert args.self_reward_ref_constant == "auto" and args.self_reward_verifier is None


@pytest.mark.parametrize(
    "value, expected", [("-23", -23.0), (-25, -25.0), (" AUTO ", "auto"), ("model", "model"), ("0", 0.0)]
)
def test_ref_constant_parsing(value, expected):
    assert parse_ref_constant(value) == expected


def test_token_id_given_as_digits(tmp_path):
    assert make(tmp_path, self_reward_token="151652").self_reward_token == 151652


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"self_reward_ref_constant": 1.5}, "self_reward_ref_constant"),
        ({"self_reward_ref_constant": "reference"}, "self_reward_ref_constant"),
        ({"self_reward_ref_constant": "nan"}, "self_reward_ref_constant"),
        ({"self_reward_beta": 0.0}, "self_reward_beta"),
        ({"self_reward_loss_coef": -0.1}, "self_reward_loss_coef"),
        ({"self_reward_advantage_coef": 1.5}, "self_reward_advantage_coef"),
        ({"self_reward_std_threshold": -1.0}, "self_reward_std_threshold"),
        ({"reasoning_warmup_steps": -1}, "reasoning_warmup_steps"),
        ({"self_reward_warmup_steps": 2.5}, "self_reward_warmup_steps"),
        ({"self_reward_token": ""}, "self_reward_token"),
        ({"temperature": 0.7}, "temperature"),
    ],
)
def test_validation_errors_name_the_field(tmp_path, kwargs, field):
    kwargs.setdefault("self_reward_token", "<gh_stars>")
    with pytest.raises(ValueError, match=f"`{field}`"):
        make(tmp_path, **kwargs)


def test_sync_ref_model_with_model_ref_constant_is_refused(tmp_path):
    """The reference drifts with `sync_ref_model`, so c_ref read from it would change r_s's meaning mid-run."""
    with pytest.raises(ValueError, match="`sync_ref_model=True`.*`self_reward_ref_constant='model'`"):
        make(tmp_path, self_reward_token="<gh_stars>", sync_ref_model=True, self_reward_ref_constant="model", beta=0.1)
    assert make(tmp_path, self_reward_token="<gh_stars>", sync_ref_model=True, beta=0.1).sync_ref_model  # "auto"
