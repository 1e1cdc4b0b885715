"""MiniGPT-4 (Zhu et al., 2023): BLIP-2's frozen ViT and frozen Q-Former (32 queries) -> one trainable Linear
(`llama_proj`) -> a frozen Vicuna. Nothing but that Linear ever trains: the stages name it inside the connector
(`connector.language_projection`; its learning rate is the connector's, `--pretrain.lr.connector`), so the
Q-Former, loaded from a trained one, stays exactly as it was.

Template `###Human: <Img><ImageHere></Img> instruction ###Assistant: answer###`. Two stages: (1) pretraining on
a large image-caption mixture (paper: 20k steps of batch 256, ~5M pairs, lr 1e-4); (2) fine-tuning on a small
curated set of detailed descriptions (paper: ~3.5k pairs the stage-1 model wrote and an LLM cleaned, 400 steps of
batch 12, lr 3e-5). At the tiny scale the Q-Former is `tiny:qformer` (the `blip2` preset's stage 1, trained on
generated scenes), stage 1 reads scene and easy-VQA captions and stage 2 easy-VQA's questions, one per record.
"""
from vlmkit.archs.blip2 import TINY_CAPTIONS, TINY_ON_QFORMER, VISION

PRESET = {
    "name": "minigpt4",
    "design": "MiniGPT-4",
    "skills": {"easy-vqa": {"target": 0.90}},  # vlmkit reproduce; targets from issues 13, 14, 32
    "vision": VISION,
    # sizes come from the trained Q-Former it loads (a vlmkit blip2 run or a BLIP-2 checkpoint)
    "connector": {"type": "qformer", "num_queries": 32},
    "template": "minigpt4",
    "answer_prompt": "",
    "stages": [
        {"name": "pretrain", "train": ["connector.language_projection"], "data": "captions",
         "lr": {"connector": 1e-4}, "epochs": 1, "batch_size": 256, "warmup_ratio": 0.25,
         "weight_decay": 0.05},
        {"name": "finetune", "train": ["connector.language_projection"], "data": "instructions",
         "lr": {"connector": 3e-5}, "max_steps": 400, "batch_size": 12, "warmup_ratio": 0.05,
         "weight_decay": 0.05},
    ],
    "scales": {
        "paper": {  # the ViT and Q-Former of BLIP-2 (FlanT5-XXL's stage 2, which MiniGPT-4 loads), Vicuna-13B v0
            "vision": {"name_or_path": "Salesforce/blip2-flan-t5-xxl"},
            "connector": {"name_or_path": "Salesforce/blip2-flan-t5-xxl"},
            "llm": {"name_or_path": "lmsys/vicuna-13b-delta-v0"},
            "max_length": 512,
        },
        "tiny": {
            **TINY_ON_QFORMER,
            "stages": [
                {"mixture": TINY_CAPTIONS, "lr": {"connector": 3e-3},
                 "batch_size": 32, "epochs": 1, "warmup_ratio": 0.03},
                # one question per record (blip2's stage 3 reads them so): on easy-VQA's multi-turn records a later
                # answer can lean on the earlier ones, and the loss falls on them too (issue 32's note: easy-VQA
                # 37.55% -> 71.31% on seed 0, 63.95-71.31% over seeds 0-2)
                {"mixture": "easy-vqa:questions", "lr": {"connector": 2e-3}, "batch_size": 16, "max_steps": 1000,
                 "warmup_ratio": 0.03},
            ],
        },
    },
}
