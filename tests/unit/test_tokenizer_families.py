"""Exact loss masks and stops for every tokenizer family under every template.

Llama (SentencePiece-style, legacy and not), Qwen2, GPT-2 and T5 tokenizers are built offline with their own
transformers classes (tests/families.py). For multi-turn records with a system prompt and images, the decoded
supervised tokens must be exactly each assistant turn plus its stop, and the whole sequence must decode to
the rendered text. T5's SentencePiece normalises whitespace (its vocabulary has no newline, and it decodes
"red </s>" as "red</s>"), so for it the spans are compared with whitespace removed.
"""
import pytest

from families import FAMILIES, build_tokenizer, supervised_spans
from vlmkit.data.render import IGNORE_INDEX, conversation_pieces, normalise_messages, render_conversation
from vlmkit.data.templates import TEMPLATES, get_template, resolve_stop
from vlmkit.errors import BadRecord

CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "<image>\nwhat color is the shape?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "is there a circle? <image>"},
    {"role": "assistant", "content": "no, it is a triangle."},
    {"role": "user", "content": "hello, how are you today?"},
    {"role": "assistant", "content": "yes"},
]
CAPTION = [{"role": "user", "content": "<image>\nDescribe the image briefly."},
           {"role": "assistant", "content": "a blue circle."}]


@pytest.fixture(scope="module", params=FAMILIES)
def family_tokenizer(request):
    tokenizer = build_tokenizer(request.param)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<|im_start|>", "<|im_end|>"]},
                                 replace_extra_special_tokens=False)
    return request.param, tokenizer


def same_text(family):
    """How decoded text is compared: exactly (up to the ends) or, for T5, with all whitespace removed."""
    return (lambda text: "".join(text.split())) if family == "t5" else str.strip


@pytest.mark.parametrize("template_name", ["vicuna_v1", "llama2", "chatml", "minigpt4"])
def test_supervised_tokens_are_each_answer_and_its_stop(family_tokenizer, template_name):
    family, tokenizer = family_tokenizer
    template = get_template(template_name)
    rendered = render_conversation(CONVERSATION, template, tokenizer, num_image_tokens=3, record_id="r1")
    stop = resolve_stop(template, tokenizer)
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    spans = [tokenizer.decode(span) for span in supervised_spans(rendered)]
    expected = [(template.assistant_format.replace("{content}", answer) + stop.text).strip() for answer in answers]
    norm = same_text(family)
    assert [norm(span) for span in spans] == [norm(text) for text in expected], family
    # the sequence is the rendered text, tokenised once (images expanded to 3 placeholders each)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert rendered.input_ids.count(image_id) == 6 and rendered.num_images == 2
    collapsed = []
    for token in rendered.input_ids:
        if not (token == image_id and collapsed and collapsed[-1] == image_id):
            collapsed.append(token)
    pieces, _ = conversation_pieces(normalise_messages(CONVERSATION), template, tokenizer)
    text = "".join(piece for piece, _ in pieces)
    offset = 1 if template.add_bos and tokenizer.bos_token_id is not None else 0
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert collapsed[offset:] == whole
    assert text.count("You are a careful assistant.") == 1


def test_stop_is_resolved_against_the_tokenizer(family_tokenizer):
    family, tokenizer = family_tokenizer
    vicuna = resolve_stop(get_template("vicuna_v1"), tokenizer)
    assert vicuna.text == tokenizer.eos_token and vicuna.ids == {tokenizer.eos_token_id} and not vicuna.strings
    chatml = resolve_stop(get_template("chatml"), tokenizer)
    assert chatml.ids == {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
    minigpt4 = resolve_stop(get_template("minigpt4"), tokenizer)
    assert minigpt4.strings == ("###",) and minigpt4.cut(" yes###Human: hi") == " yes"


def test_captions_with_plain(family_tokenizer):
    family, tokenizer = family_tokenizer
    rendered = render_conversation(CAPTION, get_template("plain"), tokenizer, num_image_tokens=4)
    spans = [tokenizer.decode(s) for s in supervised_spans(rendered)]
    assert spans == (["a blue circle."] if family == "t5" else ["a blue circle.\n"])  # T5 has no newline
    assert rendered.input_ids[:4] == [tokenizer.convert_tokens_to_ids("<image>")] * 4


def test_generation_prompt_is_the_training_prefix(family_tokenizer):
    """What the model is given at generation is token for token the start of what it was trained on."""
    _, tokenizer = family_tokenizer
    for name in ("vicuna_v1", "llama2", "chatml", "minigpt4"):
        template = get_template(name)
        full = render_conversation(CONVERSATION[:3], template, tokenizer, num_image_tokens=2)
        prompt = render_conversation(CONVERSATION[:2], template, tokenizer, num_image_tokens=2,
                                     add_generation_prompt=True)
        assert full.input_ids[:len(prompt.input_ids)] == prompt.input_ids, name
        assert full.labels[len(prompt.input_ids)] != IGNORE_INDEX, name  # the answer starts right after


def test_tokenizer_without_offsets_gets_the_same_mask(family_tokenizer):
    """A Python tokenizer (no offsets, e.g. tiktoken-based) is aligned by decoding prefixes: same labels."""
    family, tokenizer = family_tokenizer
    if family == "llama-legacy":
        pytest.skip("legacy SentencePiece decoding adds spaces after special tokens: no exact text round trip")

    class Slow:
        is_fast = False

        def __getattr__(self, name):
            return getattr(tokenizer, name)

    if family == "t5":  # its decoding normalises whitespace, so the offsets cannot be recovered: a clear error
        with pytest.raises(BadRecord, match="decoding does not give the text back"):
            render_conversation(CONVERSATION, get_template("chatml"), Slow(), num_image_tokens=2)
        return
    fast = render_conversation(CONVERSATION, get_template("chatml"), tokenizer, num_image_tokens=2)
    slow = render_conversation(CONVERSATION, get_template("chatml"), Slow(), num_image_tokens=2)
    assert (slow.input_ids, slow.labels) == (fast.input_ids, fast.labels)


def test_missing_template_token_is_a_clear_error():
    tokenizer = build_tokenizer("gpt2")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    with pytest.raises(Exception, match=r"needs the token\(s\) \['<\|im_start\|>', '<\|im_end\|>'\]"):
        render_conversation(CONVERSATION, get_template("chatml"), tokenizer, num_image_tokens=1)


def test_every_template_is_covered():
    assert set(TEMPLATES) >= {"vicuna_v1", "plain", "llama2", "chatml", "minigpt4"}


def test_glued_turns_are_refused_not_mislabelled():
    tokenizer = build_tokenizer("gpt2")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    from vlmkit.data.templates import Template

    glued = Template(name="glued", system="", user_format="{content}", assistant_prefix="", assistant_format="{content}",
                     add_bos=False)
    with pytest.raises(BadRecord, match="covers both"):
        render_conversation([{"role": "user", "content": "what is the sha"}, {"role": "assistant", "content": "pe?"}],
                            glued, tokenizer, num_image_tokens=1)


@pytest.mark.parametrize("template_name", ["vicuna_v1", "llama2", "chatml", "minigpt4"])
def test_exported_chat_template_renders_like_the_renderer(family_tokenizer, template_name):
    """`convert to-hf` writes a Jinja chat template; transformers' apply_chat_template must give the same text."""
    from vlmkit.convert.hf_llava import chat_template_jinja

    _, tokenizer = family_tokenizer
    template = get_template(template_name)
    ours = CONVERSATION[:5] + [{"role": "user", "content": "<image>\nand now?"}]
    parts = []
    for message in ours:
        content = message["content"]
        if message["role"] == "user" and "<image>" in content:
            text = content.replace("<image>\n", "").replace(" <image>", "")
            content = [{"type": "image"}, {"type": "text", "text": text}]
        parts.append({"role": message["role"], "content": content})
    hf_text = tokenizer.apply_chat_template(parts, chat_template=chat_template_jinja(template, tokenizer),
                                            tokenize=False)
    # the renderer's text for the same turns (images first in each user turn, as the parts put them)
    flat = [{**m, "content": "<image>\n" + p["content"][1]["text"]} if isinstance(p["content"], list) else m
            for m, p in zip(ours, parts)]
    pieces, _ = conversation_pieces(normalise_messages(flat), template, tokenizer)
    bos = tokenizer.bos_token if template.add_bos and tokenizer.bos_token_id is not None else ""
    assert hf_text == bos + "".join(piece for piece, _ in pieces)


@pytest.mark.parametrize("template_name", ["palm_e", "chatml"])
def test_state_placeholders_are_one_token_each_and_plans_are_masked_exactly(family_tokenizer, template_name):
    """PaLM-E's multimodal sentences under every family: each `<obj>` (added as prepare_tokenizer adds it) is one
    token, whatever text touches it (`is <obj>.`), the record's vectors line up with them, and the supervised
    tokens are exactly the plan and its stop."""
    import random

    from vlmkit.data import tabletop
    from vlmkit.data.dataset import record_states
    from vlmkit.model.vlm import prepare_tokenizer

    family, tokenizer = family_tokenizer
    prepare_tokenizer(tokenizer, None, ["<obj>"])
    scene = tabletop.generate_scene(2)
    question = next(q for q in tabletop.scene_questions(scene, random.Random(2)) if q["family"] == "p1")
    states = [tabletop.state_vector(scene, j) for j in range(len(scene.blocks))]
    record = tabletop.records([dict(question, id="r", image="x.png", states=states, scene=scene.as_dict())],
                              "state")[0]
    messages = normalise_messages(record["conversations"])
    rendered = render_conversation(messages, get_template(template_name), tokenizer, num_image_tokens=3)
    obj = tokenizer.convert_tokens_to_ids("<obj>")
    checked = record_states(record, messages, "r", {"obj": 7})["obj"]
    assert rendered.input_ids.count(obj) == len(states) == checked.shape[0]
    spans = supervised_spans(rendered)
    stop = resolve_stop(get_template(template_name), tokenizer).text
    norm = same_text(family)
    assert [norm(tokenizer.decode(span)) for span in spans] == [norm(question["answer"] + stop)]
