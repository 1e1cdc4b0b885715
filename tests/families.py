"""Tokenizers of the real LLM families, built offline with the families' own transformers classes.

Each is trained with `train_new_from_iterator` on a small corpus (easy-VQA-like questions and answers, the
templates' fixed text, general English), keeping the family's pre-tokenisation, normalisation, decoding and
special tokens:
- `llama` / `llama-legacy`: `LlamaTokenizer` (SentencePiece-style `▁` BPE; Vicuna, LLaMA-2, Mistral), with
  `legacy=False` and `legacy=True`. Trained with whitespace splitting, as SentencePiece trains, so no piece
  spans two words.
- `qwen2`: `Qwen2Tokenizer` (byte-level BPE with Qwen's pattern; `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`).
- `gpt2`: `GPT2Tokenizer` (byte-level BPE; `<|endoftext|>` is BOS, EOS and UNK).
- `t5`: `T5Tokenizer` (SentencePiece-style Unigram; no BOS, `</s>` ends every text, `<pad>` starts the decoder;
  newlines normalise to spaces). Flan-T5's, for BLIP-2's encoder-decoder variant.
"""
from __future__ import annotations

import itertools
import string

FAMILIES = ("llama", "llama-legacy", "qwen2", "gpt2", "t5")

_WORDS = ("what color is the shape does this image contain a circle rectangle triangle is there no yes "
          "red blue green black brown gray teal yellow describe briefly answer question using single word or "
          "phrase not it the picture shows hello world how are you today please tell me about location of").split()


def corpus() -> list[str]:
    from vlmkit.data.templates import TEMPLATES

    lines = [" ".join(_WORDS[(i * 7 + j * 3) % len(_WORDS)] for j in range(8)) + "?" for i in range(300)]
    lines += [f"{a} {b}." for a, b in itertools.product(_WORDS[:20], _WORDS[10:30])]
    for template in TEMPLATES.values():
        lines += template.corpus_text() * 20
    lines += [string.printable] * 5
    return lines


def build_tokenizer(family: str, vocab_size: int = 600, texts: list[str] | None = None):
    """A tokenizer of `family` trained on `texts` (default: `corpus()`). Every printable character is added to
    the texts, as a real Llama vocabulary has byte tokens for all: a SentencePiece-style BPE with byte fallback
    but no byte token for a character drops it silently, and tokenizers' offsets after it are then shifted."""
    texts = list(texts or corpus()) + [string.printable] * 5
    from tokenizers import pre_tokenizers
    from transformers import GPT2Tokenizer, LlamaTokenizer, Qwen2Tokenizer, T5Tokenizer

    if family.startswith("llama"):
        base = LlamaTokenizer(legacy=family == "llama-legacy")
        runtime = base.backend_tokenizer.pre_tokenizer
        scheme = "always" if family == "llama-legacy" else "first"
        base.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme,
                                                                        split=True)
        tokenizer = base.train_new_from_iterator(texts, vocab_size=vocab_size)
        tokenizer.backend_tokenizer.pre_tokenizer = runtime
    elif family == "qwen2":
        base = Qwen2Tokenizer()
        tokenizer = base.train_new_from_iterator(texts, vocab_size=vocab_size,
                                                 new_special_tokens=["<|im_start|>", "<|im_end|>"])
    elif family == "gpt2":
        tokenizer = GPT2Tokenizer().train_new_from_iterator(texts, vocab_size=vocab_size)
    elif family == "t5":
        tokenizer = T5Tokenizer().train_new_from_iterator(texts, vocab_size=vocab_size)
    else:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    return tokenizer


def save_family_llm(family: str, directory, hidden: int = 32, layers: int = 2, seed: int = 0):
    """A random tiny LlamaForCausalLM with the family's tokenizer, saved as a Hugging Face directory (for `t5`, a
    Flan-T5-shaped T5ForConditionalGeneration: gated GELU, untied LM head)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    tokenizer = build_tokenizer(family)
    torch.manual_seed(seed)
    if family == "t5":
        model = T5ForConditionalGeneration(T5Config(
            vocab_size=len(tokenizer), d_model=hidden, d_ff=2 * hidden, num_layers=layers, num_decoder_layers=layers,
            num_heads=4, d_kv=hidden // 4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
            tie_word_embeddings=False, decoder_start_token_id=tokenizer.pad_token_id,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        return str(directory)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def supervised_spans(rendered) -> list[list[int]]:
    """The runs of consecutive supervised tokens of a Rendered conversation (each label equal to its token)."""
    from vlmkit.data.render import IGNORE_INDEX

    spans, current = [], []
    for token, label in zip(rendered.input_ids, rendered.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])
