"""trl-laser: LaSeR (Reinforcement Learning with Last-Token Self-Rewarding, arXiv 2510.14943) for Hugging Face TRL."""

__version__ = "0.1.0.dev0"

from .config import LaSeRConfig
from .settings import SELF_REWARD_CONFIG_NAME, SelfRewardSettings
from .trainer import LaSeRGRPOTrainer


__all__ = ["LaSeRConfig", "LaSeRGRPOTrainer", "SelfRewardSettings", "SELF_REWARD_CONFIG_NAME", "__version__"]
