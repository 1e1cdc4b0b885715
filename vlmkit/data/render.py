"""The one function that turns a conversation into `(input_ids, labels)`.

It alone decides what the loss sees: the content of assistant turns and the template's stop token after
each. Everything else (system prompt, user turns, image tokens, the assistant cue) gets label -100.
Each `<image>` in a user turn becomes `num_image_tokens` copies of the image token id; the model splices
image features into exactly those positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmkit.data.templates import Template
from vlmkit.errors import BadRecord

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"


@dataclass
class Rendered:
    input_ids: list[int]
    labels: list[int]
    num_images: int

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(self.input_ids, dtype=torch.long), torch.tensor(self.labels, dtype=torch.long)


def normalise_messages(conversation: list[dict], record_id="?") -> list[dict]:
    """Accept LLaVA turns ({'from': 'human'|'gpt', 'value'}) or chat turns ({'role', 'content'})."""
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    messages = []
    for i, turn in enumerate(conversation):
        if not isinstance(turn, dict):
            raise BadRecord(record_id, f"turn {i} is a {type(turn).__name__}, not an object", kind="turns")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in roles:
            raise BadRecord(record_id, f"turn {i} has unknown role {role!r}", kind="turns")
        if not isinstance(content, str):
            raise BadRecord(record_id, f"turn {i} has no text content", kind="turns")
        messages.append({"role": roles[role], "content": content})
    return messages


def check_turns(messages: list[dict], record_id="?", allow_open_end: bool = False) -> None:
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise BadRecord(record_id, "conversation has no turns", kind="turns")
    for i, message in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise BadRecord(record_id, f"turns do not alternate: turn {i} is {message['role']!r}, "
                                       f"expected {expected!r}", kind="turns")
        if expected == "assistant" and not message["content"].strip():
            raise BadRecord(record_id, f"turn {i} is an empty assistant turn", kind="turns")
    if body[-1]["role"] != "assistant" and not allow_open_end:
        raise BadRecord(record_id, "conversation ends without an assistant turn", kind="turns")


def render_conversation(
    messages: list[dict],
    template: Template,
    tokenizer,
    *,
    num_image_tokens: int,
    max_length: int | None = None,
    record_id="?",
    add_generation_prompt: bool = False,
    check_tokenization: bool = True,
) -> Rendered:
    """Render `messages` (role/content dicts) with `template`.

    With `add_generation_prompt`, the conversation must end with a user turn and the result ends with the
    assistant cue, ready for generation (labels are then all -100).
    """
    messages = normalise_messages(messages, record_id)
    check_turns(messages, record_id, allow_open_end=add_generation_prompt)
    if add_generation_prompt and messages[-1]["role"] != "user":
        raise BadRecord(record_id, "a generation prompt needs the conversation to end with a user turn",
                        kind="turns")
    system = template.system
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]

    # (text, supervised) pieces; each is tokenised alone so the mask boundaries are exact.
    pieces: list[tuple[str, bool]] = []
    if system:
        pieces.append((template.system_format.format(system=system), False))
    num_images = 0
    for message in messages:
        content = message["content"]
        if message["role"] == "user":
            num_images += content.count(IMAGE_TOKEN)
            if not template.keep_user_text:
                content = IMAGE_TOKEN * content.count(IMAGE_TOKEN)
            pieces.append((template.user_format.format(content=content) + template.assistant_prefix, False))
        else:
            if IMAGE_TOKEN in content:
                raise BadRecord(record_id, "an assistant turn contains <image>", kind="image_count")
            pieces.append((template.assistant_format.format(content=content) + template.stop, True))
    # merge neighbouring pieces with the same supervision so tokenisation sees the natural text
    merged: list[tuple[str, bool]] = []
    for text, supervised in pieces:
        if merged and merged[-1][1] == supervised:
            merged[-1] = (merged[-1][0] + text, supervised)
        else:
            merged.append((text, supervised))

    input_ids: list[int] = []
    labels: list[int] = []
    if template.add_bos and tokenizer.bos_token_id is not None:
        input_ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for text, supervised in merged:
        ids = tokenizer.encode(text, add_special_tokens=False)
        input_ids.extend(ids)
        labels.extend(ids if supervised else [IGNORE_INDEX] * len(ids))

    if check_tokenization:
        whole = tokenizer.encode("".join(t for t, _ in merged), add_special_tokens=False)
        offset = 1 if template.add_bos and tokenizer.bos_token_id is not None else 0
        if whole != input_ids[offset:]:
            raise BadRecord(record_id, "tokenising the turns one by one disagrees with tokenising the whole "
                                       "conversation (a token spans a turn boundary); the loss mask would be "
                                       "wrong. Check the template's separators.", kind="tokenization")

    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if num_images and num_image_tokens > 1:
        expanded_ids, expanded_labels = [], []
        for token, label in zip(input_ids, labels):
            if token == image_token_id:
                expanded_ids.extend([token] * num_image_tokens)
                expanded_labels.extend([IGNORE_INDEX] * num_image_tokens)
            else:
                expanded_ids.append(token)
                expanded_labels.append(label)
        input_ids, labels = expanded_ids, expanded_labels

    if max_length is not None and len(input_ids) > max_length:
        raise BadRecord(record_id, f"renders to {len(input_ids)} tokens, more than max_length={max_length}"
                        + (" (truncation would cut into image tokens)"
                           if image_token_id in input_ids[max_length:] else ""), kind="too_long")
    if not add_generation_prompt and all(label == IGNORE_INDEX for label in labels):
        raise BadRecord(record_id, "no assistant tokens to learn from", kind="turns")
    return Rendered(input_ids, labels, num_images)
