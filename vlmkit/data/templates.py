"""Conversation templates, as data.

A template says how the turns of a conversation become text. The renderer (`vlmkit.data.render`) is the
only code that reads these fields; what the loss sees is decided there: assistant content and `stop`.
Later presets add their own entries (Llama-2 `[INST]` for MiniGPT-v2, ChatML for Qwen-VL) without code.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Template:
    name: str
    system: str = ""
    system_format: str = "{system} "     # text before the first user turn (omitted when system is "")
    user_format: str = "USER: {content} "
    assistant_prefix: str = "ASSISTANT:"  # cue for the model to answer; never in the loss
    assistant_format: str = " {content}"  # assistant content; in the loss
    stop: str = "</s>"                    # appended after each assistant turn; in the loss
    add_bos: bool = True
    keep_user_text: bool = True           # False: only the images of a user turn are kept (LLaVA 'plain')

    def corpus_text(self) -> list[str]:
        """Fixed text of the template, for training a tokenizer that encodes it compactly."""
        turn = self.user_format.format(content="hi") + self.assistant_prefix + self.assistant_format.format(content="ok")
        system = self.system_format.format(system=self.system) if self.system else ""
        return [system + turn + self.stop.strip() + turn]


TEMPLATES: dict[str, Template] = {}


def register(template: Template) -> Template:
    TEMPLATES[template.name] = template
    return template


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise KeyError(f"unknown template {name!r}; available: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


register(Template(
    name="vicuna_v1",
    system="A chat between a curious user and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the user's questions.",
))

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
