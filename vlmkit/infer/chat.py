"""Chat with a model: one answer, or an interactive loop that keeps the conversation."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmkit.config import option
from vlmkit.data.dataset import record_states
from vlmkit.data.images import load_image
from vlmkit.data.render import IMAGE_TOKEN, normalise_messages, render_conversation
from vlmkit.data.templates import get_template, numbered_images
from vlmkit.errors import VlmkitError
from vlmkit.infer.generate import GenerationConfig, decode_answer, generate


@dataclass
class ChatOptions:
    """`vlmkit chat`'s settings (its flags are made from these fields)."""
    short: bool = option(True, "append the preset's short-answer prompt to a one-off question")
    max_new_tokens: int = option(64, "answer token budget")
    temperature: float = option(0.0, "0 = greedy")
    top_p: float = option(1.0, "nucleus sampling: the smallest set of tokens whose probability reaches this")
    seed: int | None = option(None, "seed of the sampling (temperature > 0)", kind=int)
    draw: str | None = option(None, "draw the boxes the answer holds (read in the run's box format) on the image, "
                                    "into this PNG", kind=str, metavar="OUT.png")
    states: str | None = option(None, "PaLM-E: the question's state vectors, one per placeholder (<obj>) in it, as a "
                                      "JSON file or inline JSON: {\"obj\": [[x, y, w, h, r, g, b], ...]}, or a list "
                                      "for a model with one kind", kind=str, metavar="JSON")


def render_prompt(model, messages: list[dict], record_id="chat", max_length: int | None = None):
    """`messages` (ending with a user turn) in the model's template, ending with the assistant cue."""
    return render_conversation(messages, get_template(model.config.template), model.tokenizer,
                               num_image_tokens=model.num_image_tokens, max_length=max_length,
                               record_id=record_id, add_generation_prompt=True)


def read_states(text: str):
    """--states: a JSON file's content, or the JSON itself; a clear error when it is neither."""
    path = Path(text)
    if not text.lstrip().startswith(("{", "[")):
        if not path.is_file():
            raise VlmkitError(f"--states {text}: no such file (give a JSON file or inline JSON)")
        text = path.read_text(encoding="utf-8", errors="replace")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise VlmkitError(f"--states: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None


def state_tensors(model, messages: list[dict], states, record_id="chat") -> dict | None:
    """`states` (as a record's 'states' field) checked against the placeholders of `messages`, as tensors."""
    checked = record_states({"states": states} if states is not None else {}, normalise_messages(messages, record_id),
                            record_id, model.config.states.kinds)
    return {kind: torch.from_numpy(values) for kind, values in checked.items()} if checked else None


def answer(model, messages: list[dict], images: list, config: GenerationConfig | None = None, states=None) -> str:
    """Reply to `messages` (role/content, `<image>` where each image goes); images are PIL images or paths;
    `states` (PaLM-E) as a record's 'states' field, one vector per state placeholder of the messages."""
    transform = model.image_transform
    if len(images) > model.config.max_images:
        raise VlmkitError(f"{len(images)} images; this model takes at most {model.config.max_images} (max_images"
                          + (": CogVLM as released takes one image)" if model.visual_expert else ")"))
    for image in images:
        if not isinstance(image, str):  # a PIL image the caller decoded: its geometry is still bounded
            transform.limits.check(*image.size, "the image", "chat", transform)
    pixels = [transform(load_image(i, "chat", transform=transform) if isinstance(i, str) else i.convert("RGB"))
              for i in images]
    rendered = render_prompt(model, messages, max_length=model.config.max_length)

    pixel_values = torch.stack(pixels) if pixels else None
    tokens = generate(model, [rendered.input_ids], [len(pixels)], pixel_values=pixel_values, config=config,
                      states=state_tensors(model, messages, states))[0]
    return decode_answer(model, tokens)


def first_user_turn(question: str, images: int | bool) -> str:
    """The first user turn for `images` images: a question that places them itself (`<image>` once per image) is
    kept as written; else one image goes before it (`<image>\nquestion`), several as `Image 1: <image>\nImage 2:
    <image>\n…question` (as vlmkit.data.compare writes them)."""
    count = int(images)
    if count and question.count(IMAGE_TOKEN) == count:
        return question
    if question.count(IMAGE_TOKEN):
        raise VlmkitError(f"the question has {question.count(IMAGE_TOKEN)} {IMAGE_TOKEN} placeholder(s) for {count} "
                          "image(s): write one per image, or none (the images then go before the question)")
    if count == 1:
        return f"{IMAGE_TOKEN}\n{question}"
    return numbered_images(count) + question


def interactive(model, image: str | list[str] | None, config: GenerationConfig, input_fn=input,
                print_fn=print) -> None:
    messages: list[dict] = []
    images = [image] if isinstance(image, str) else list(image or [])
    print_fn("vlmkit chat: empty line or Ctrl-D to quit" + (f"; image{'s' if len(images) > 1 else ''} "
                                                             f"{', '.join(images)}" if images else ""))
    while True:
        try:
            question = input_fn("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not question:
            break
        content = first_user_turn(question, len(images)) if not messages else question
        messages.append({"role": "user", "content": content})
        reply = answer(model, messages, images, config)
        messages.append({"role": "assistant", "content": reply or "…"})
        print_fn(f"model> {reply}")
