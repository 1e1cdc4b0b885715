"""Qwen-VL (Bai et al., 2023): a ViT -> a one-layer cross-attention resampler (learned queries, 256 at paper
scale; 2-D sin-cos positions on the queries and, resized to the ViT's grid, on the keys) -> Qwen-7B.

`<img>…</img>` around each image's tokens, `Picture N:` before it (template qwen_vl, ChatML), boxes written
`<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>` on [0, 1000). Three stages: (1) the LLM frozen, the ViT and the
adapter train on image-text pairs at low resolution; (2) multi-task pretraining, everything trains,
sequences packed; (3) instruction tuning with the ViT frozen. The paper also raises the ViT's resolution from
stage 2 on (224 -> 448 px, position embeddings interpolated): each stage's `image_size`. At the tiny scale the
data are generated scenes (vlmkit.data.scenes) at 128 px, seen at 64 px in stage 1, and coordinates are whole
tokens (`coordinate_tokens`).
"""
from vlmkit.archs.minigpt_v2 import at_size

_PRETRAIN = "scenes:caption=1,scenes:grounded_caption=1"
_MULTITASK = "scenes:caption=0.25,scenes:grounded_caption=0.5,scenes:rec=1,scenes:reg=1,scenes:detection=0.5," \
             "scenes:vqa=0.25"
_INSTRUCT = "scenes:vqa=0.25,scenes:rec=0.5,scenes:reg=0.25,scenes:grounded_caption=0.25"

# tiny: REC sampled most (the skill measured), with the rest kept in the mix
_MULTITASK_TINY = "scenes:caption=0.1,scenes:grounded_caption=0.25,scenes:rec=2,scenes:reg=0.5," \
                  "scenes:detection=0.25,scenes:vqa=0.5"

PRESET = {
    "name": "qwen-vl",
    "design": "Qwen-VL",
    "skills": {"rec": {"target": 0.90}, "reg": {"target": None}, "scene-vqa": {"target": None},
               "pope": {"target": None}},  # vlmkit reproduce; targets from issues 13, 14, 32
    "vision": {"feature_layer": -1, "select": "patch", "pad_to_square": False},
    "connector": {"type": "resampler", "num_queries": 256, "bias": False},
    "template": "qwen_vl",
    "box_format": "qwen_vl",
    "answer_prompt": "",
    "stages": [
        {"name": "pretrain", "train": ["vision", "connector"], "mixture": _PRETRAIN, "image_size": 224,
         "lr": {"vision": 2e-4, "connector": 2e-4}, "epochs": 1, "batch_size": 256, "warmup_ratio": 0.03,
         "weight_decay": 0.05},
        {"name": "multitask", "train": ["vision", "connector", "llm"], "mixture": _MULTITASK, "pack_to": 2048,
         "image_size": 448,
         "lr": {"vision": 5e-5, "connector": 5e-5, "llm": 5e-5}, "epochs": 1, "batch_size": 64,
         "warmup_ratio": 0.03, "weight_decay": 0.05},
        {"name": "instruct", "train": ["connector", "llm"], "mixture": _INSTRUCT, "image_size": 448,
         "lr": {"connector": 1e-5, "llm": 1e-5}, "epochs": 1, "batch_size": 64, "warmup_ratio": 0.03,
         "weight_decay": 0.1},
    ],
    "scales": {
        "paper": {  # Qwen-VL's ViT is OpenCLIP ViT-bigG/14; a transformers CLIP tower stands in until it loads
            "vision": {"name_or_path": "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", "feature_layer": -2},
            "llm": {"name_or_path": "Qwen/Qwen-7B"},
            "max_length": 2048,
        },
        "tiny": {  # the scenes tower: 64 px (4 x 4 grid) in stage 1, then 128 px (8 x 8), resampled to 16 queries
            "vision": {"name_or_path": "tiny:scenes-vision"},
            "llm": {"name_or_path": "tiny:llama"},
            "connector": {"num_queries": 16},
            "coordinate_tokens": True,  # 0..999 as whole tokens: the tiny LLM cannot learn to spell them
            "max_length": 512,
            "stages": [
                {"mixture": at_size(_PRETRAIN, 128), "image_size": 64, "lr": {"vision": 5e-4, "connector": 2e-3},
                 "batch_size": 16, "max_steps": 300},
                {"mixture": at_size(_MULTITASK_TINY, 128), "image_size": 128,
                 "lr": {"vision": 1e-4, "connector": 1e-3, "llm": 1e-3}, "batch_size": 16, "max_steps": 4000,
                 "pack_to": 512},
                {"mixture": at_size(_INSTRUCT, 128), "image_size": 128, "lr": {"connector": 3e-4, "llm": 3e-4},
                 "batch_size": 16, "max_steps": 800},
            ],
        },
    },
}
