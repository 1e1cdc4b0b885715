"""CogVLM (Wang et al., 2023): EVA2-CLIP-E without its last layer -> GLU adapter with begin/end-image vectors ->
Vicuna-1.5 with a visual expert in every decoder layer.

The image's tokens go through their own copies of every layer's q/k/v/o projections and MLP (initialised from the
LLM's; `llm.visual_expert`, vlmkit.llm.visual_expert), attention is joint, and an image takes three positions
(begin, all patches, end). Pretraining trains the experts and the adapter (the LLM's own weights and the ViT frozen)
on captions, then on captions mixed with REC (`grounding`: boxes as `[[x0,y0,x1,y1]]` on a 0-999 grid); SFT trains
all but the ViT. Packing is refused for it (its images' positions are its own); it takes one image.
"""
PRESET = {
    "name": "cogvlm",
    "design": "CogVLM",
    # vlmkit reproduce; issue 34's targets: easy-VQA >= 95%, REC Acc@0.5 reported (after the grounding stage)
    "skills": {"easy-vqa": {"target": 0.95}, "rec": {"target": None, "stage": "grounding"}},
    "vision": {"feature_layer": -2, "select": "patch", "pad_to_square": False},
    "connector": {"type": "glu", "bias": False},
    "llm": {"visual_expert": True},
    "template": "cogvlm",
    "box_format": "cogvlm",  # [[x0,y0,x1,y1]] on a 0-999 grid, three digits each
    "max_images": 1,  # as released: one image, right after the BOS
    "answer_prompt": "",
    "stages": [
        {"name": "pretrain", "train": ["connector", "llm.experts"], "data": "captions",
         "lr": {"connector": 1e-4, "llm": 1e-4}, "epochs": 1, "batch_size": 256, "warmup_ratio": 0.03},
        # the paper's second pretraining phase: captions mixed with REC (referring expressions answered with boxes)
        {"name": "grounding", "train": ["connector", "llm.experts"], "mixture": "easy-vqa:captions=1,scenes:rec=1",
         "lr": {"connector": 1e-5, "llm": 1e-5}, "epochs": 1, "batch_size": 256, "warmup_ratio": 0.03},
        {"name": "sft", "train": ["connector", "llm"], "data": "instructions",
         "lr": {"connector": 1e-5, "llm": 1e-5}, "epochs": 1, "batch_size": 128, "warmup_ratio": 0.03},
    ],
    "scales": {
        "paper": {
            # EVA2-CLIP-E/14 (its last layer removed) has no transformers class (its blocks compute x + LN(attn(x)));
            # a CLIP ViT-L/14 stands in until a timm-based tower lands
            "vision": {"name_or_path": "openai/clip-vit-large-patch14"},
            "llm": {"name_or_path": "lmsys/vicuna-7b-v1.5"},
            "max_length": 2048,
        },
        "tiny": {
            # the tiny tower's pooled vector beside its patches, read from its last stage, as llava's tiny recipe
            "vision": {"name_or_path": "tiny:vision", "feature_layer": -1, "select": "patch_mean"},
            "llm": {"name_or_path": "tiny:llama"},
            "max_length": 1024,
            "stages": [
                {"lr": {"connector": 1e-3, "llm": 1e-3}, "epochs": 1, "batch_size": 16},
                # easy-VQA's captions and REC on 6,000 generated scenes (CogVLM's box format)
                {"mixture": "easy-vqa:captions=1,scenes:rec:n6000=1", "lr": {"connector": 1e-3, "llm": 1e-3},
                 "epochs": 1, "batch_size": 16},
                # one question per record, 2 epochs, as llava-1.5's tiny instruction stage (the ViT stays frozen:
                # CogVLM never trains it)
                {"lr": {"connector": 2e-3, "llm": 2e-3}, "epochs": 2, "batch_size": 32, "max_turns": 1,
                 "min_steps": 500},
            ],
        },
    },
}
