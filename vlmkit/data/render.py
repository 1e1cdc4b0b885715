"""The one function that turns a conversation into `(input_ids, labels)`.

It alone decides what the loss sees: the content of assistant turns and the template's stop after each.
Everything else (system prompt, user turns, image tokens, the assistant cue) gets label -100.

The conversation is rendered to one string and tokenised once; each token's label comes from the characters
it covers (the tokenizer's offsets), so the mask is exact for every tokenizer family — byte-level BPE (GPT-2,
Qwen2), SentencePiece-style `▁` BPE (Llama, legacy or not), tiktoken-style — and a token is never split
differently from how the model sees the whole text. A tokenizer without offsets (a Python one) gets them by
decoding growing prefixes. Each `<image>` becomes `num_image_tokens` copies of the image token id; the model
splices image features into exactly those positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmkit.data.templates import IMAGE_TOKEN, Template, fill, token_id
from vlmkit.errors import BadRecord, ConfigError

IGNORE_INDEX = -100


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
    check_template_tokens(template, tokenizer)
    pieces, num_images = conversation_pieces(messages, template, tokenizer, record_id)
    text = "".join(piece for piece, _ in pieces)
    supervised_chars = bytearray(len(text))
    at = 0
    for piece, supervised in pieces:
        if supervised:
            supervised_chars[at:at + len(piece)] = b"\x01" * len(piece)
        at += len(piece)
    token_ids, offsets = encode_with_offsets(tokenizer, text, record_id)
    input_ids: list[int] = []
    labels: list[int] = []
    if template.add_bos and tokenizer.bos_token_id is not None:
        input_ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for token, (start, end) in zip(token_ids, offsets):
        input_ids.append(token)
        labels.append(token if _token_is_supervised(text, supervised_chars, start, end, tokenizer, token,
                                                     record_id) else IGNORE_INDEX)

    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    found = input_ids.count(image_token_id)
    if found != num_images:
        raise BadRecord(record_id, f"{num_images} <image> placeholder(s) became {found} image tokens (is <image> "
                                   "a special token of this tokenizer?)", kind="image_count")
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


def conversation_pieces(messages: list[dict], template: Template, tokenizer, record_id="?"
                        ) -> tuple[list[tuple[str, bool]], int]:
    """The rendered text of checked, normalised `messages` as (text, supervised) pieces, and the image count."""
    system = template.system
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    system_text = fill(template.system_format, tokenizer, system=system) if system else ""
    stop = fill(template.stop, tokenizer)
    image_text = fill(template.image_format, tokenizer)

    pieces: list[tuple[str, bool]] = []  # (text, supervised)
    if system_text and not template.system_in_user:
        pieces.append((system_text, False))
    if template.begin:
        pieces.append((fill(template.begin, tokenizer), False))
    num_images = 0
    for index, message in enumerate(messages):
        content = message["content"]
        if message["role"] == "user":
            count = content.count(IMAGE_TOKEN)
            num_images += count
            if not template.keep_user_text:
                content = IMAGE_TOKEN * count
            images_before = ""
            if template.images_first and count:  # the images leave the text (with the newline after each)
                content = content.replace(IMAGE_TOKEN + "\n", IMAGE_TOKEN).replace(IMAGE_TOKEN, "")
                images_before = IMAGE_TOKEN * count
            if "{n}" in image_text:  # numbered images (Qwen-VL's `Picture 1: <img>…</img>`), counted over the turns
                first = num_images - count + 1
                parts = content.split(IMAGE_TOKEN)
                content = parts[0] + "".join(image_text.replace("{n}", str(first + i)) + part
                                             for i, part in enumerate(parts[1:]))
            else:
                content = content.replace(IMAGE_TOKEN, image_text)
            if index == 0 and system_text and template.system_in_user:
                content = system_text + content
            pieces.append((images_before.replace(IMAGE_TOKEN, image_text)
                           + fill(template.user_format, tokenizer, content=content)
                           + fill(template.assistant_prefix, tokenizer), False))
        else:
            if IMAGE_TOKEN in content:
                raise BadRecord(record_id, "an assistant turn contains <image>", kind="image_count")
            pieces.append((fill(template.assistant_format, tokenizer, content=content) + stop, True))
            if template.turn_end:
                pieces.append((fill(template.turn_end, tokenizer), False))

    return pieces, num_images


def check_template_tokens(template: Template, tokenizer) -> None:
    missing = [t for t in (IMAGE_TOKEN, *template.special_tokens) if token_id(tokenizer, t) is None]
    if missing:
        raise ConfigError(f"template {template.name!r} needs the token(s) {missing}, which the tokenizer lacks "
                          "(vlmkit.model.vlm.prepare_tokenizer adds them and grows the embeddings)")


def encode_with_offsets(tokenizer, text: str, record_id="?") -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` (no special tokens added) and the character span each one covers."""
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [tuple(span) for span in encoded["offset_mapping"]]
        _check_coverage(tokenizer, text, offsets, record_id)
        return list(encoded["input_ids"]), offsets
    # no offsets (a Python tokenizer, e.g. tiktoken-based): the end of token k is the length of the decoded
    # first k tokens, which is exact when decoding gives the text back
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    decode = lambda part: tokenizer.decode(part, skip_special_tokens=False,  # noqa: E731
                                           clean_up_tokenization_spaces=False)
    if decode(ids) != text:
        raise BadRecord(record_id, f"this tokenizer ({type(tokenizer).__name__}) gives no character offsets and "
                                   "decoding does not give the text back, so the loss mask cannot be placed "
                                   "exactly; use its fast (tokenizers) version", kind="tokenization")
    offsets, previous = [], 0
    for k in range(1, len(ids) + 1):
        end = len(decode(ids[:k]))
        offsets.append((min(previous, end), end))
        previous = max(previous, end)
    return ids, offsets


def _check_coverage(tokenizer, text: str, offsets: list[tuple[int, int]], record_id) -> None:
    """Every character that is not whitespace lies in some token's span, or the tokenizer dropped it (a BPE
    without byte fallback and without an unknown token, for characters its vocabulary lacks): the model would
    never see it, and the spans around it no longer line up with the turns."""
    dropped, reached = set(), 0  # the text up to `reached` is covered; only the gaps between spans are read
    for start, end in sorted(offsets):
        if start > reached:
            dropped.update(c for c in text[reached:start] if not c.isspace())
        reached = max(reached, end)
    dropped.update(c for c in text[reached:] if not c.isspace())
    dropped = sorted(dropped)
    if dropped:
        shown = ", ".join(repr(c) for c in dropped[:8]) + (" …" if len(dropped) > 8 else "")
        raise BadRecord(record_id, f"the tokenizer ({type(tokenizer).__name__}) drops the character(s) {shown}: its "
                                   "vocabulary has no token for them and it has no byte fallback or unknown token; "
                                   "remove them from the data or use a tokenizer that covers them",
                        kind="tokenization")


def _token_is_supervised(text: str, supervised_chars: bytearray, start: int, end: int, tokenizer, token: int,
                         record_id) -> bool:
    """A token is supervised when its characters are: whitespace a SentencePiece `▁` or byte-level `Ġ` token
    carries over a boundary goes with the token's other characters; real characters on both sides of a
    boundary mean no exact mask exists for this text."""
    if end <= start:  # a zero-width token (legacy SentencePiece's `▁` after a special token): its neighbour's
        return bool(supervised_chars[min(start, len(text) - 1)]) if text else False
    solid = {supervised_chars[i] for i in range(start, end) if not text[i].isspace()}
    if len(solid) > 1:
        raise BadRecord(record_id, f"token {tokenizer.convert_ids_to_tokens(token)!r} ({text[start:end]!r}) covers "
                                   "both the end of one turn and the start of the next, so the loss mask cannot be "
                                   "exact; check the template's separators", kind="tokenization")
    if solid:
        return bool(solid.pop())
    return bool(supervised_chars[start])
