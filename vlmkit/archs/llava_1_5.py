"""LLaVA-1.5 (Liu et al., 2023b): CLIP ViT-L/14 at 336 px -> 2-layer MLP with GELU -> Vicuna-1.5.

Same two stages as LLaVA. Academic short-answer VQA data carries the prompt "Answer the question using
a single word or phrase." after each question, and images are padded to a square before resizing.
"""
PRESET = {
    "name": "llava-1.5",
    "vision": {"feature_layer": -2, "select": "patch", "pad_to_square": True},
    "connector": {"type": "mlp2x_gelu"},
    "template": "vicuna_v1",
    "answer_prompt": "Answer the question using a single word or phrase.",
    "stages": [
        {"name": "align", "train": ["connector"], "data": "captions", "template": "plain",
         "lr": {"connector": 1e-3}, "epochs": 1, "batch_size": 256, "warmup_ratio": 0.03},
        {"name": "instruct", "train": ["connector", "llm"], "data": "instructions",
         "lr": {"connector": 2e-5, "llm": 2e-5}, "epochs": 1, "batch_size": 128, "warmup_ratio": 0.03},
    ],
    "scales": {
        "paper": {
            "vision": {"name_or_path": "openai/clip-vit-large-patch14-336"},
            "llm": {"name_or_path": "lmsys/vicuna-7b-v1.5"},
            "max_length": 2048,
        },
        "tiny": {
            "vision": {"name_or_path": "tiny:vision", "feature_layer": -1},
            "llm": {"name_or_path": "tiny:llama"},
            "max_length": 1024,
            "stages": [
                {"lr": {"connector": 3e-3}, "epochs": 2, "batch_size": 16},
                {"lr": {"connector": 1e-3, "llm": 1e-3}, "epochs": 1, "batch_size": 8},
            ],
        },
    },
}
