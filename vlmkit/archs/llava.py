"""LLaVA (Liu et al., 2023): CLIP ViT-L/14 penultimate-layer patch tokens -> one Linear -> Vicuna.

Stage 1 aligns: only the projector trains, on image-caption pairs. Stage 2 tunes: projector and LLM train
on instruction conversations; the vision encoder stays frozen throughout. The loss sees assistant turns
and their stop token only (decided in vlmkit.data.render).
"""
PRESET = {
    "name": "llava",
    "vision": {"feature_layer": -2, "select": "patch", "pad_to_square": False},
    "connector": {"type": "linear"},
    "template": "vicuna_v1",
    "answer_prompt": "",
    "stages": [
        {"name": "align", "train": ["connector"], "data": "captions", "template": "plain",
         "lr": {"connector": 2e-3}, "epochs": 1, "batch_size": 128, "warmup_ratio": 0.03},
        {"name": "instruct", "train": ["connector", "llm"], "data": "instructions",
         "lr": {"connector": 2e-5, "llm": 2e-5}, "epochs": 3, "batch_size": 32, "warmup_ratio": 0.03},
    ],
    "scales": {
        "paper": {
            "vision": {"name_or_path": "openai/clip-vit-large-patch14"},
            "llm": {"name_or_path": "lmsys/vicuna-7b-v1.3"},
            "max_length": 2048,
        },
        "tiny": {
            "vision": {"name_or_path": "tiny:vision", "feature_layer": -1},
            "llm": {"name_or_path": "tiny:llama"},
            "max_length": 1024,
            "stages": [
                {"lr": {"connector": 3e-3}, "epochs": 2, "batch_size": 16},
                # min_steps: easy-VQA's 4,000 records are 500 steps; a smaller data set gets more passes
                # rather than ~190 steps that learn one answer for everything (issue 15)
                {"lr": {"connector": 1e-3, "llm": 1e-3}, "epochs": 1, "batch_size": 8, "min_steps": 500},
            ],
        },
    },
}
