"""LLaVA-1.5 with LoRA instruction tuning (the repository's finetune_lora.sh): stage 2 trains the projector
(lr 2e-5) and LoRA adapters on every Linear of the LLM (r=128, alpha=256, dropout 0.05, lr 2e-4) instead of
the full LLM. Written as the differences from `llava-1.5`.
"""
from vlmkit.archs.llava_1_5 import PRESET as LLAVA_1_5
from vlmkit.config import deep_merge

PRESET = deep_merge(LLAVA_1_5, {
    "name": "llava-1.5-lora",
    "design": "LLaVA-1.5",
    "stages": [
        {},
        {"lr": {"connector": 2e-5, "llm": 2e-4},
         "lora": {"r": 128, "alpha": 256, "dropout": 0.05, "target_modules": ["all-linear"], "save": "merge"}},
    ],
    "scales": {
        "tiny": {  # a 128-wide LLM: rank 16 keeps the adapters low-rank
            "stages": [{}, {"lr": {"connector": 1e-3, "llm": 2e-3}, "lora": {"r": 16, "alpha": 32}}],
        },
    },
})
