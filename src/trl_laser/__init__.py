"""trl-laser: LaSeR (Reinforcement Learning with Last-Token Self-Rewarding, arXiv 2510.14943) for Hugging Face TRL."""

__version__ = "0.1.0.dev0"

from .config import LaSeRConfig
from .scoring import ScoredCompletion, generate_with_self_rewards, score_completions
from .settings import SELF_REWARD_CONFIG_NAME, SelfRewardSettings
from .trainer import LaSeRGRPOTrainer
from .voting import best_of_n, majority_vote, weighted_vote


__all__ = [
    "LaSeRConfig",
    "LaSeRGRPOTrainer",
    "SelfRewardSettings",
    "SELF_REWARD_CONFIG_NAME",
    "ScoredCompletion",
    "best_of_n",
    "generate_with_self_rewards",
    "majority_vote",
    "score_completions",
    "weighted_vote",
    "__version__",
]
