"""LLaVA-1.5 (Liu et al., 2023b): CLIP ViT-L/14 at 336 px -> 2-layer MLP with GELU -> Vicuna-1.5.

LLaVA's two stages with its own learning rates and batch sizes. Academic short-answer VQA data carries the
prompt "Answer the question using a single word or phrase." after each question, and images are padded
to a square before resizing. Written as the differences from `llava`.
"""
from vlmkit.archs.llava import PRESET as LLAVA
from vlmkit.config import deep_merge

PRESET = deep_merge(LLAVA, {
    "name": "llava-1.5",
    "vision": {"pad_to_square": True},
    "connector": {"type": "mlp2x_gelu"},
    "answer_prompt": "Answer the question using a single word or phrase.",
    "stages": [
        {"lr": {"connector": 1e-3}, "batch_size": 256},
        {"lr": {"connector": 2e-5, "llm": 2e-5}, "epochs": 1, "batch_size": 128},
    ],
    "scales": {
        "paper": {
            "vision": {"name_or_path": "openai/clip-vit-large-patch14-336"},
            "llm": {"name_or_path": "lmsys/vicuna-7b-v1.5"},
        },
    },
})
