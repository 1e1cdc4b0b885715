"""BLIP-2 with an encoder-decoder LLM (Flan-T5; LAVIS's `blip2_t5`): the same frozen ViT, Q-Former and stages as
`blip2`, but the projected queries and the prompt are the T5 encoder's input and the text comes from its decoder.

Stage 2 (generative) reads captions with an empty prompt: the encoder sees the queries (and T5's `</s>`), the
decoder writes the caption (LAVIS splits the caption into an encoder prefix and a decoder suffix; with short tiny
captions vlmkit gives the decoder all of it). Stage 3 reads `Question: q Answer:</s>` in the encoder and decodes
`a</s>`, as Blip2Processor and LAVIS's T5 models write them (template `blip2_t5`). The LLM stays frozen throughout.
At the tiny scale the LLM is `tiny:t5`, a T5 of Flan-T5's shape pretrained on easy-VQA's training questions and
captions as prompt -> answer.
"""
import copy

from vlmkit.archs.blip2 import PRESET as BLIP2

PRESET = copy.deepcopy(BLIP2)
PRESET["name"] = "blip2-t5"
PRESET["template"] = "blip2_t5"
PRESET["stages"][1]["template"] = "blip2_t5_caption"
PRESET["scales"]["paper"].update({"vision": {"name_or_path": "Salesforce/blip2-flan-t5-xl"},
                                  "llm": {"name_or_path": "google/flan-t5-xl"}})
PRESET["scales"]["tiny"]["llm"] = {"name_or_path": "tiny:t5"}
