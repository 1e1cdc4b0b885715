"""Conversation templates, as data, and their stop resolved against a tokenizer.

A template says how the turns of a conversation become text. The renderer (`vlmkit.data.render`) is the
only code that reads the format fields; what the loss sees is decided there: assistant content and `stop`.
Every format may name the tokenizer's own special tokens as `{bos}` / `{eos}`, so one template serves every
tokenizer family (Vicuna's `</s>` is Qwen's `<|endoftext|>`). `resolve_stop` turns a template's stop into
what generation watches for: token ids (the EOS, a named special token such as `<|im_end|>`) or a string
(`###`, `\\n`), and the answer never shows it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from vlmkit.errors import ConfigError

IMAGE_TOKEN = "<image>"


def numbered_images(count: int) -> str:
    """Several images before a question, as vlmkit writes them everywhere (comparison data, `vlmkit chat`, a request
    whose message starts with several images): `Image 1: <image>\nImage 2: <image>\n`."""
    return "".join(f"Image {j + 1}: {IMAGE_TOKEN}\n" for j in range(count))


@dataclass(frozen=True)
class Template:
    name: str
    system: str = ""
    system_format: str = "{system} "     # text before the first user turn (omitted when system is "")
    system_in_user: bool = False          # True: the formatted system text opens the first user turn's content
    begin: str = ""                       # after the system text, before the first turn
    user_format: str = "USER: {content} "
    assistant_prefix: str = "ASSISTANT:"  # cue for the model to answer; never in the loss
    assistant_format: str = " {content}"  # assistant content; in the loss
    stop: str = "{eos}"                   # appended after each assistant turn; in the loss
    turn_end: str = ""                    # after the stop, before the next turn; not in the loss
    image_format: str = IMAGE_TOKEN       # how each image placeholder is written (must contain <image>; {n}: its number)
    add_bos: bool = True                  # the tokenizer's BOS id (if it has one) before everything
    keep_user_text: bool = True           # False: only the images of a user turn are kept (LLaVA 'plain')
    images_first: bool = False            # a user turn's images go before its user_format (BLIP-2: queries first)
    special_tokens: tuple[str, ...] = field(default=())  # tokens the tokenizer must have (added if missing)

    def corpus_text(self, bos: str = "<s>", eos: str = "</s>") -> list[str]:
        """Fixed text of the template, for training a tokenizer that encodes it compactly."""
        def plain(text: str) -> str:
            return text.replace("{bos}", bos).replace("{eos}", eos)
        turn = (self.user_format.replace("{content}", "hi") + self.assistant_prefix
                + self.assistant_format.replace("{content}", "ok") + self.turn_end)
        system = self.system_format.replace("{system}", self.system) if self.system else ""
        return [plain(system + self.begin + turn + self.stop.strip() + turn)]


@dataclass(frozen=True)
class StopSpec:
    """What ends an assistant turn for one tokenizer: `text` as rendered; generation stops on any of `ids`
    (the stop's own token, and the tokenizer's EOS) or when the decoded answer contains one of `strings`."""
    text: str
    ids: frozenset[int]
    strings: tuple[str, ...]

    def cut(self, answer: str) -> str:
        """The answer without a stop string and what follows it."""
        for stop in self.strings:
            at = answer.find(stop)
            if at >= 0:
                answer = answer[:at]
        return answer


def fill(text: str, tokenizer, **values: str) -> str:
    """Substitute `{bos}`, `{eos}` (the tokenizer's own tokens) and the given fields into a format string."""
    if "{bos}" in text:  # a tokenizer without a BOS (Qwen) gets none, as `add_bos` does
        text = text.replace("{bos}", getattr(tokenizer, "bos_token", None) or "")
    if "{eos}" in text:
        if not getattr(tokenizer, "eos_token", None):
            raise ConfigError("the template uses {eos} but the tokenizer has no eos token")
        text = text.replace("{eos}", tokenizer.eos_token)
    for name, value in values.items():
        text = text.replace("{" + name + "}", value)
    return text


def token_id(tokenizer, token: str) -> int | None:
    """The id of `token` in the tokenizer's vocabulary, or None (not the unknown token's id)."""
    found = tokenizer.convert_tokens_to_ids(token)
    if found is None or (found == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return found


def single_token_id(tokenizer, text: str) -> int | None:
    """The id of `text` when it is one of the tokenizer's special or added tokens (always encoded whole; a
    regular vocabulary entry such as `###` may also be generated in pieces, so it stays a string)."""
    if not text or text not in tokenizer.get_added_vocab():
        return None
    found = token_id(tokenizer, text)
    return found if found is not None and tokenizer.encode(text, add_special_tokens=False) == [found] else None


def resolve_stop(template: Template, tokenizer) -> StopSpec:
    text = fill(template.stop, tokenizer)
    ids = set()
    token_id = single_token_id(tokenizer, text)
    if token_id is not None:
        ids.add(token_id)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)  # a model that ends with its EOS under another template has finished
    return StopSpec(text, frozenset(ids), (text,) if token_id is None and text else ())


TEMPLATES: dict[str, Template] = {}


def register(template: Template) -> Template:
    if IMAGE_TOKEN not in template.image_format:
        raise ConfigError(f"template {template.name!r}: image_format must contain {IMAGE_TOKEN}")
    TEMPLATES[template.name] = template
    return template


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ConfigError(f"unknown template {name!r}; available: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


# LLaVA's conv_vicuna_v1: `USER: … ASSISTANT: …</s>`, where Vicuna's `</s>` is its EOS.
register(Template(
    name="vicuna_v1",
    system="A chat between a curious user and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the user's questions.",
))

# The same turns without the system prompt: the tiny scale's template. A 4-layer LM learns to compare a colour
# in the image with the question's poorly behind 31 constant tokens (issue 32: 90.05% -> 96.26% on the demo).
register(dataclasses.replace(TEMPLATES["vicuna_v1"], name="vicuna_v1_nosys", system=""))

# LLaVA-1.5's stage-1 template: the image, then the caption, nothing else.
register(Template(
    name="plain",
    system="",
    user_format="{content}",
    assistant_prefix="",
    assistant_format="{content}",
    stop="\n",
    add_bos=False,
    keep_user_text=False,
))

# LLaMA-2-chat (MiniGPT-v2): `<s>[INST] <<SYS>>\n…\n<</SYS>>\n\nq [/INST] a </s><s>[INST] …`; the BOS opens
# every turn. MiniGPT-v2 writes an image as `<Img><ImageHere></Img>`.
register(Template(
    name="llama2",
    system="",
    system_format="<<SYS>>\n{system}\n<</SYS>>\n\n",
    system_in_user=True,
    user_format="{bos}[INST] {content} [/INST]",
    assistant_prefix="",
    assistant_format=" {content} ",
    stop="{eos}",
    image_format="<Img><image></Img>",
    add_bos=False,
))

# ChatML (Qwen, Qwen-VL): generation stops on <|im_end|>. Qwen has no BOS.
register(Template(
    name="chatml",
    system="You are a helpful assistant.",
    system_format="<|im_start|>system\n{system}<|im_end|>\n",
    user_format="<|im_start|>user\n{content}<|im_end|>\n",
    assistant_prefix="<|im_start|>assistant\n",
    assistant_format="{content}",
    stop="<|im_end|>",
    turn_end="\n",
    add_bos=False,
    special_tokens=("<|im_start|>", "<|im_end|>"),
))

# Qwen-VL: ChatML with each image written `Picture N: <img>…</img>` and a newline; <img>, </img>, <ref>, </ref>,
# <box>, </box> are special tokens of its tokenizer, added here when the tokenizer lacks them.
register(dataclasses.replace(
    TEMPLATES["chatml"], name="qwen_vl", image_format="Picture {n}: <img><image></img>",
    special_tokens=("<|im_start|>", "<|im_end|>", "<img>", "</img>", "<ref>", "</ref>", "<box>", "</box>"),
))

# MiniGPT-4: `###Human: <Img><ImageHere></Img> q ###Assistant: a###Human: …`: the `###` that ends an answer
# also opens the next turn, as in its own conversation code. The cue's trailing space is written as the
# answer's leading space, so a tokenizer sees the same text at training and at generation.
register(Template(
    name="minigpt4",
    system="",
    system_format="{system}",
    begin="###",
    user_format="Human: {content} ",
    assistant_prefix="###Assistant:",
    assistant_format=" {content}",
    stop="###",
    image_format="<Img><image></Img>",
))

# CogVLM (THUDM's released chat format): the image right after the BOS, then `Question: q Answer: a`, turns joined by
# "\n"; the answer ends with the EOS. Its VQA format asks for a "Short answer:".
register(Template(
    name="cogvlm",
    system="",
    user_format="Question: {content}",
    assistant_prefix=" Answer:",
    assistant_format=" {content}",
    stop="{eos}",
    turn_end="\n",
    images_first=True,
))
register(dataclasses.replace(TEMPLATES["cogvlm"], name="cogvlm_vqa", assistant_prefix=" Short answer:"))

# BLIP-2 with a decoder-only LLM (OPT): `[queries][BOS] Question: q Answer: a\n`, the image tokens before the BOS as
# transformers' Blip2Processor writes them; LAVIS ends every text with "\n" and stops generation there.
register(Template(
    name="blip2",
    system="",
    user_format="Question: {content}",
    assistant_prefix=" Answer:",
    assistant_format=" {content}",
    stop="\n",
    image_format="<image>{bos}",
    add_bos=False,
    images_first=True,
))

# BLIP-2's caption pretraining (stage 2): the queries, the BOS, then the caption (the human turn's text is not kept).
register(dataclasses.replace(TEMPLATES["blip2"], name="blip2_caption", user_format="{content}", assistant_prefix="",
                             assistant_format="{content}", keep_user_text=False))

# BLIP-2 with an encoder-decoder LLM (Flan-T5): the encoder reads `[queries] Question: q Answer:</s>` (Blip2Processor
# tokenises the prompt with T5's tokenizer, which ends it with </s>), the decoder writes `a</s>` (LAVIS's
# blip2_t5 targets end with </s>; SentencePiece T5 has no newline to stop at). The split between the two is the
# first answer token (vlmkit.model.vlm.split_for_encoder_decoder).
register(Template(
    name="blip2_t5",
    system="",
    user_format="Question: {content}",
    assistant_prefix=" Answer:{eos}",
    assistant_format="{content}",
    stop="{eos}",
    image_format="<image>",
    add_bos=False,
    images_first=True,
))
# its caption pretraining: the encoder reads the queries (and </s>), the decoder writes the caption
register(dataclasses.replace(TEMPLATES["blip2_t5"], name="blip2_t5_caption", user_format="{content}",
                             assistant_prefix="{eos}", keep_user_text=False))

# VisualGLM-6B (its model/chat.py): `<img>[queries]</img>问：q\n答：a\n问：…`, the image once before the first question;
# an answer ends with the LLM's EOS (chat() stops on it). `visualglm_en` is the same code's English prompt (Q:/A:).
register(Template(
    name="visualglm",
    system="",
    user_format="问：{content}\n",
    assistant_prefix="答：",
    assistant_format="{content}",
    stop="{eos}",
    turn_end="\n",
    image_format="<img><image></img>",
    images_first=True,
))
register(dataclasses.replace(TEMPLATES["visualglm"], name="visualglm_en", user_format="Q:{content}\n",
                             assistant_prefix="A:"))

# PaLM-E's prompts (the paper's examples: `Given <img>. Q: How to grasp the blue block? A: First, grasp ...`): a
# question, then `A:`, the answer ending with the EOS; turns joined by "\n". Observations sit in the question's text.
register(Template(
    name="palm_e",
    system="",
    user_format="Q: {content}",
    assistant_prefix=" A:",
    assistant_format=" {content}",
    stop="{eos}",
    turn_end="\n",
))
