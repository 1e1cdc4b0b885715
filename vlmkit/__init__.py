"""vlmkit: vision-language models from shared parts (vision encoder -> connector -> language model)."""
from vlmkit import tiny  # noqa: F401 (registers the 'tiny:' backbone names with vlmkit.io)
from vlmkit.archs import from_name
from vlmkit.config import ArchConfig, StageConfig

__version__ = "0.1.0"
__all__ = ["ArchConfig", "StageConfig", "VisionLanguageModel", "from_name"]


def __getattr__(name):
    if name == "VisionLanguageModel":  # lazy: importing torch/transformers is slow
        from vlmkit.model.vlm import VisionLanguageModel  # start-up: torch (1.4 s) only when asked for

        return VisionLanguageModel
    raise AttributeError(name)
