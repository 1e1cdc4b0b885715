import pytest
from families import supervised_spans

from vlmkit.data.render import IGNORE_INDEX, render_conversation
from vlmkit.data.templates import Template, get_template
from vlmkit.errors import BadRecord


@pytest.fixture(scope="module")
def tokenizer(backbones):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(backbones["tokenizer"])


CONVERSATION = [
    {"from": "human", "value": "<image>\nwhat color is the shape?"},
    {"from": "gpt", "value": "blue"},
    {"from": "human", "value": "is there a circle?"},
    {"from": "gpt", "value": "no, it is a rectangle."},
]


def test_labels_are_exactly_the_assistant_turns_and_stop(tokenizer):
    rendered = render_conversation(CONVERSATION, get_template("vicuna_v1"), tokenizer, num_image_tokens=5)
    spans = [tokenizer.decode(span) for span in supervised_spans(rendered)]
    assert spans == [" blue</s>", " no, it is a rectangle.</s>"]


def test_prompt_text_and_images_are_masked(tokenizer):
    rendered = render_conversation(CONVERSATION, get_template("vicuna_v1"), tokenizer, num_image_tokens=7)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    positions = [i for i, t in enumerate(rendered.input_ids) if t == image_id]
    assert len(positions) == 7 and positions == list(range(positions[0], positions[0] + 7))
    assert all(rendered.labels[i] == IGNORE_INDEX for i in positions)
    assert rendered.input_ids[0] == tokenizer.bos_token_id and rendered.labels[0] == IGNORE_INDEX
    masked_text = tokenizer.decode([t for t, l in zip(rendered.input_ids, rendered.labels) if l == IGNORE_INDEX
                                    and t != image_id], skip_special_tokens=True)
    assert "USER: \nwhat color is the shape? ASSISTANT:" in masked_text
    assert "blue" not in masked_text


def test_plain_template_keeps_image_and_caption_only(tokenizer):
    rendered = render_conversation([{"from": "human", "value": "<image>\nDescribe the image briefly."},
                                    {"from": "gpt", "value": "a red circle"}], get_template("plain"), tokenizer,
                                   num_image_tokens=3)
    assert tokenizer.decode(rendered.input_ids) == "<image><image><image>a red circle\n"
    assert [tokenizer.decode(s) for s in supervised_spans(rendered)] == ["a red circle\n"]


def test_generation_prompt_ends_with_assistant_cue(tokenizer):
    rendered = render_conversation(CONVERSATION[:1], get_template("vicuna_v1"), tokenizer, num_image_tokens=1,
                                   add_generation_prompt=True)
    assert tokenizer.decode(rendered.input_ids).endswith("what color is the shape? ASSISTANT:")
    assert set(rendered.labels) == {IGNORE_INDEX}


@pytest.mark.parametrize("conversation, message", [
    ([{"from": "human", "value": "hi"}, {"from": "human", "value": "again"}], "do not alternate"),
    ([{"from": "gpt", "value": "hi"}], "do not alternate"),
    ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}], "empty assistant turn"),
    ([{"from": "human", "value": "hi"}], "ends without an assistant turn"),
    ([{"from": "robot", "value": "hi"}], "unknown role"),
])
def test_bad_turns_name_the_record(tokenizer, conversation, message):
    with pytest.raises(BadRecord, match=message) as info:
        render_conversation(conversation, get_template("vicuna_v1"), tokenizer, num_image_tokens=1, record_id="r42")
    assert "'r42'" in str(info.value)


def test_too_long_is_an_error_naming_the_record(tokenizer):
    with pytest.raises(BadRecord, match="more than max_length=20 .*image tokens") as info:
        render_conversation(CONVERSATION, get_template("vicuna_v1"), tokenizer, num_image_tokens=64, max_length=20,
                            record_id="long-one")
    assert info.value.kind == "too_long"


def test_token_spanning_a_turn_boundary_is_an_error(tokenizer):
    # no separator between the user text and the cue: 'shape?' + '?' pieces can merge differently
    template = Template(name="glued", system="", user_format="{content}", assistant_prefix="",
                        assistant_format="{content}", stop="</s>", add_bos=False)
    conversation = [{"from": "human", "value": "what is the sha"}, {"from": "gpt", "value": "pe?"}]
    with pytest.raises(BadRecord, match="covers both the end of one turn"):
        render_conversation(conversation, template, tokenizer, num_image_tokens=1, record_id="glued")


def test_visualglm_writes_the_image_once_then_its_questions(tokenizer):
    """VisualGLM's chat code: `<img>[image]</img>问：q\n答：a\n问：…`; answers end with the EOS."""
    conversation = [{"from": "human", "value": "<image>\nwhat color is the shape?"}, {"from": "gpt", "value": "blue"},
                    {"from": "human", "value": "is it a circle?"}, {"from": "gpt", "value": "no"}]
    for name, q, a in (("visualglm", "问：", "答："), ("visualglm_en", "Q:", "A:")):
        rendered = render_conversation(conversation, get_template(name), tokenizer, num_image_tokens=2)
        text = tokenizer.decode(rendered.input_ids)
        bos, eos = tokenizer.bos_token or "", tokenizer.eos_token
        assert text == (f"{bos}<img><image><image></img>{q}what color is the shape?\n{a}blue{eos}\n"
                        f"{q}is it a circle?\n{a}no{eos}\n")
        assert [tokenizer.decode(s) for s in supervised_spans(rendered)] == [f"blue{eos}", f"no{eos}"]


def test_a_tokenizer_that_drops_characters_is_named_with_them():
    """A BPE without byte fallback or unknown token drops what its vocabulary lacks; the error says so, with the
    characters, instead of a mask error about turns that its shifted spans used to produce."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from vlmkit.data.render import encode_with_offsets
    from vlmkit.errors import BadRecord

    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz?")}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    ids, offsets = encode_with_offsets(tokenizer, "is it a cafe?", "ok")
    assert len(ids) == len(offsets) == 10
    with pytest.raises(BadRecord, match=r"record 'r7': the tokenizer .* drops the character\(s\) 'é'"):
        encode_with_offsets(tokenizer, "is it a café?", "r7")
