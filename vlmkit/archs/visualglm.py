"""VisualGLM-6B (THUDM, 2023): a BLIP-2-style Q-Former (EVA ViT, 32 queries) in front of ChatGLM-6B, a bilingual
chat LLM that ships its model as remote code (`--llm.trust-remote-code`). The prompt is written as the VisualGLM
repository's chat code writes it: `<img>[queries]</img>问：question\\n答：answer`, the image once before the first
question (`visualglm_en`: its English `Q:` / `A:`).

Two stages: (1) pretraining on image-text pairs (30M Chinese + 300M English in the paper), the Q-Former and its
projection training and the LLM frozen; (2) fine-tuning on visual question answering with LoRA on the LLM (the
repository's finetune script: rank 10) and the Q-Former still training. The source survey names the model without
more detail; the stages are the repository's. At the tiny scale the Q-Former starts from `tiny:qformer` (the
`blip2` preset's stage 1) and the LLM is any causal LM (`tiny:llama`).
"""
from vlmkit.archs.blip2 import TINY_CAPTIONS, TINY_ON_QFORMER, VISION

PRESET = {
    "name": "visualglm",
    "design": "VisualGLM",
    "skills": {"easy-vqa": {"target": 0.90}},  # vlmkit reproduce; targets from issues 13, 14, 32
    "vision": VISION,
    "connector": {"type": "qformer", "num_queries": 32},
    "template": "visualglm",
    "answer_prompt": "",
    "stages": [
        {"name": "pretrain", "train": ["connector"], "data": "captions", "lr": {"connector": 1e-4}, "epochs": 1,
         "batch_size": 256, "warmup_ratio": 0.02, "weight_decay": 0.05},
        {"name": "finetune", "train": ["connector", "llm"], "data": "instructions",
         "lr": {"connector": 1e-5, "llm": 1e-4}, "epochs": 1, "batch_size": 16, "warmup_ratio": 0.02,
         "lora": {"r": 10, "alpha": 16, "dropout": 0.1, "target_modules": ["query_key_value"], "save": "merge"}},
    ],
    "scales": {
        "paper": {  # the ViT and Q-Former of a BLIP-2 checkpoint; ChatGLM-6B through its own code
            "vision": {"name_or_path": "Salesforce/blip2-opt-2.7b"},
            "connector": {"name_or_path": "Salesforce/blip2-opt-2.7b"},
            "llm": {"name_or_path": "THUDM/chatglm-6b"},  # its own code: add --llm.trust-remote-code
            "max_length": 1024,
        },
        "tiny": {
            **TINY_ON_QFORMER,
            "stages": [
                {"mixture": TINY_CAPTIONS, "lr": {"connector": 1e-3}, "batch_size": 32,
                 "epochs": 1, "warmup_ratio": 0.03},
                # one question per record, as minigpt4's stage 2 (issue 32's note)
                {"mixture": "easy-vqa:questions", "lr": {"connector": 5e-4, "llm": 1e-3}, "batch_size": 16,
                 "max_steps": 1000, "warmup_ratio": 0.03,
                 "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}},
            ],
        },
    },
}
