"""The model zoo: every architecture of the study as one configurable hybrid LM."""

from pretrain.model.config import IntraConfig, ModelConfig, MoEConfig, RopeConfig
from pretrain.model.lm import HybridLM, InferenceCache
from pretrain.model.presets import ARCHS, SIZES, build_model, model_config

__all__ = ["ARCHS", "SIZES", "HybridLM", "InferenceCache", "IntraConfig", "ModelConfig", "MoEConfig",
           "RopeConfig", "build_model", "model_config"]
