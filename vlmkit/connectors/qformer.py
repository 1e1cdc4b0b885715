"""BLIP-2's querying transformer (Q-Former): learned queries read the image through cross-attention.

Built on transformers' `Blip2QFormerModel` (BERT layers; cross-attention to the image every
`cross_attention_frequency` layers from layer 0; the queries' own feed-forward weights, the text's beside them)
and named as `Blip2ForConditionalGeneration` / `Blip2ForImageTextRetrieval` name it, so their checkpoints map
key for key:

    query_tokens          (1, num_queries, H) learned queries
    qformer               Blip2QFormerModel; its `layernorm` also normalises the text embeddings (HF's layout)
    language_projection   Linear(H -> LLM width): the query outputs become soft visual prompts (stage 2)

and, when the text side exists (`text_input`, stage 1), what LAVIS's `Blip2Qformer` adds for its three losses:

    embeddings            word + position embeddings of the Q-Former's BERT vocabulary
    vision_projection / text_projection   Linear(H -> proj_dim) for ITC, `temp` its learned temperature
    itm_head              Linear(H -> 2) on each query output, averaged, for ITM
    itg_head              BERT's LM prediction head (dense, activation, LayerNorm, decoder tied to the word
                          embeddings) for ITG

The self-attention mask decides which objective a forward serves (`attention_mask` builds them): queries and
text apart (ITC), text causal after all queries (ITG), everything bidirectional (ITM).
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from vlmkit.config import ConnectorConfig
from vlmkit.connectors import Connector, register
from vlmkit.data.render import IGNORE_INDEX
from vlmkit.errors import ConfigError
from vlmkit.io import check_local_path, loading, resolve_name

CONNECTOR_TOKENIZER_DIR = "connector_tokenizer"  # the Q-Former's BERT tokenizer, saved beside the LLM's


def attention_mask(kind: str, num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """Who may see whom, (B, Q+T, Q+T) booleans, row = the position that looks, column = the one seen.

    `text_mask` (B, T) is 1 for real text tokens, 0 for padding; padding is never seen (a padded row still sees
    the queries, so no row is empty)."""
    batch, length = text_mask.shape
    total = num_queries + length
    keys = torch.cat([torch.ones(batch, num_queries, dtype=torch.bool, device=text_mask.device),
                      text_mask.to(torch.bool)], dim=1)  # (B, Q+T): which positions exist
    mask = keys[:, None, :].expand(batch, total, total).clone()
    is_query = torch.arange(total, device=text_mask.device) < num_queries
    if kind == "itm":
        return mask
    if kind == "itc":
        same_side = is_query[:, None] == is_query[None, :]
        return mask & same_side
    if kind == "itg":
        position = torch.arange(total, device=text_mask.device)
        text_rows = ~is_query[:, None]
        sees = (is_query[:, None] & is_query[None, :]) | (text_rows & (is_query[None, :] |
                                                                      (position[None, :] <= position[:, None])))
        return mask & sees
    raise ValueError(f"unknown mask kind {kind!r}: itc, itg or itm")

DEFAULT_WIDTH = 768  # bert-base


DEC_TOKEN = "[DEC]"  # LAVIS adds it to BERT's tokenizer as the BOS that opens every ITG text
_BERT_FIXED = {"hidden_act": "gelu", "layer_norm_eps": 1e-12, "position_embedding_type": "absolute"}


@dataclass
class QFormerText:
    """The Q-Former's text inputs in its own (BERT) tokens, read off a batch of the LLM's tokens: made once per
    batch where the batch is collated (a loader's `prepare`), not in every forward. `instructions` gives each
    image's instruction (InstructBLIP: the text of its sample before the first answer token, all of a generation
    prompt, image placeholders and special tokens left out; one row per image, in order); `captions` each
    sample's supervised text (BLIP-2 stage 1's caption). Both return {"input_ids", "attention_mask"} (CPU)."""
    llm_tokenizer: object
    tokenizer: object
    image_token_id: int
    max_tokens: int

    def _encode(self, texts: list[str]) -> dict:
        encoded = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_tokens,
                                 return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def instructions(self, input_ids: torch.Tensor, image_counts: list[int], labels=None) -> dict:
        texts = []
        for i, count in enumerate(image_counts):
            if not count:
                continue
            ids = input_ids[i].tolist()
            end = len(ids)
            if labels is not None:
                supervised = (labels[i] != IGNORE_INDEX).nonzero()
                end = int(supervised[0]) if len(supervised) else end
            text = self.llm_tokenizer.decode([t for t in ids[:end] if t != self.image_token_id],
                                             skip_special_tokens=True)
            texts.extend([text.strip()] * count)
        return self._encode(texts)

    def captions(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict:
        texts = []
        for ids, target in zip(input_ids.tolist(), labels.tolist()):
            tokens = [i for i, t in zip(ids, target) if t != IGNORE_INDEX]
            texts.append(self.llm_tokenizer.decode(tokens, skip_special_tokens=True).strip())
        return self._encode(texts)


def qformer_config(config: ConnectorConfig, vision_hidden: int):
    """The `Blip2QFormerConfig` of a connector config (whose sizes `resolve_pretrained` filled from a BERT)."""
    from transformers import Blip2QFormerConfig  # start-up: transformers, 0.76 s

    width = config.embed_dim or DEFAULT_WIDTH
    heads = config.num_heads or max(1, width // 64)
    if width % heads:
        raise ConfigError(f"connector.num_heads={heads} does not divide the Q-Former's width {width}")
    if config.cross_attention_frequency < 1:
        raise ConfigError(f"connector.cross_attention_frequency={config.cross_attention_frequency}: must be >= 1")
    return Blip2QFormerConfig(
        vocab_size=config.vocab_size or 30522, hidden_size=width, num_hidden_layers=config.num_layers,
        num_attention_heads=heads, intermediate_size=config.intermediate_size or 4 * width,
        cross_attention_frequency=config.cross_attention_frequency, encoder_hidden_size=vision_hidden,
        use_qformer_text_input=config.text_input, max_position_embeddings=config.text_positions or max(512, config.max_text_tokens),
        hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.dropout)


def load_text_tokenizer(path):
    """The Q-Former's BERT tokenizer with [DEC] as its BOS (LAVIS's `init_tokenizer`)."""
    from transformers import AutoTokenizer  # start-up: transformers, 0.76 s

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.bos_token != DEC_TOKEN:
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    missing = [name for name in ("cls_token", "pad_token") if getattr(tokenizer, name) is None]
    if missing:
        raise ConfigError(f"{path}: the Q-Former's tokenizer has no {' / '.join(missing)} (a BERT tokenizer opens "
                          "every text with [CLS] and pads with [PAD])")
    return tokenizer


class ITGHead(nn.Module):
    """BERT's LM prediction head (LAVIS's `cls.predictions`); the decoder shares the word embeddings' weight."""

    def __init__(self, hf_config, word_embeddings: nn.Embedding):
        super().__init__()
        from transformers.activations import ACT2FN  # start-up: transformers, 0.76 s

        self.dense = nn.Linear(hf_config.hidden_size, hf_config.hidden_size)
        self.act = ACT2FN[hf_config.hidden_act]
        self.LayerNorm = nn.LayerNorm(hf_config.hidden_size, eps=hf_config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(hf_config.vocab_size))
        self.word_embeddings = [word_embeddings]  # a list: not a submodule, so its weight is saved once

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.LayerNorm(self.act(self.dense(hidden)))
        return nn.functional.linear(hidden, self.word_embeddings[0].weight, self.bias)


# bert-base-uncased's keys -> the Q-Former's (transformers' BLIP-2 names); LAVIS's Q-Former keeps BERT's embedding
# LayerNorm, which transformers' layout applies as `qformer.layernorm` to queries and text alike
_BERT_KEYS = (("bert.embeddings.word_embeddings.", "embeddings.word_embeddings."),
              ("bert.embeddings.position_embeddings.", "embeddings.position_embeddings."),
              ("bert.embeddings.LayerNorm.", "qformer.layernorm."),
              ("bert.encoder.layer.", "qformer.encoder.layer."),
              ("cls.predictions.transform.dense.", "itg_head.dense."),
              ("cls.predictions.transform.LayerNorm.", "itg_head.LayerNorm."),
              ("cls.predictions.bias", "itg_head.bias"))


@register("qformer")
class QFormer(Connector):
    """BLIP-2: `num_queries` learned queries through a BERT with cross-attention, then a Linear to the LLM."""

    def __init__(self, config: ConnectorConfig, vision_hidden: int, llm_hidden: int, num_vision_tokens: int):
        super().__init__(config, vision_hidden, llm_hidden, num_vision_tokens)
        from transformers import Blip2QFormerModel  # start-up: transformers, 0.76 s
        from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings  # start-up: transformers, 0.76 s

        if config.num_queries < 1:
            raise ConfigError(f"connector.num_queries={config.num_queries}: the Q-Former needs at least one query")
        self.tokenizer = None  # the text side's (BERT) tokenizer: set by the assembly (vlmkit.model.vlm)
        self.hf_config = hf = qformer_config(config, vision_hidden)
        hf._attn_implementation = "sdpa"
        self.hidden_size = hf.hidden_size
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_queries, hf.hidden_size))
        nn.init.normal_(self.query_tokens, std=hf.initializer_range)  # LAVIS: normal_(0, initializer_range)
        self.qformer = Blip2QFormerModel(hf)
        self.language_projection = nn.Linear(hf.hidden_size, llm_hidden)
        if config.text_input:
            self.embeddings = Blip2TextEmbeddings(hf)
            self.vision_projection = nn.Linear(hf.hidden_size, config.proj_dim)
            self.text_projection = nn.Linear(hf.hidden_size, config.proj_dim)
            self.itm_head = nn.Linear(hf.hidden_size, 2)
            self.temp = nn.Parameter(torch.tensor(0.07))
            self.itg_head = ITGHead(hf, self.embeddings.word_embeddings)
            for module in (self.embeddings, self.vision_projection, self.text_projection, self.itm_head,
                           self.itg_head):
                module.apply(self._init_weights)
        self.num_output_tokens = config.num_queries

    def _init_weights(self, module: nn.Module) -> None:  # BERT's: normal(0, 0.02), zero biases, unit LayerNorms
        std = self.hf_config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @classmethod
    def resolve_pretrained(cls, config: ConnectorConfig):
        """With `name_or_path`: the BERT's sizes into the config (width, layers, heads, feed-forward, vocabulary
        with [DEC]) and (its directory, its tokenizer) for `init_pretrained`."""
        if not config.name_or_path:
            return config, None
        from transformers import AutoConfig  # start-up: transformers, 0.76 s

        path = resolve_name(config.name_or_path)
        check_local_path(path, "--connector.name-or-path")
        trained = _trained_qformer(path)
        if trained is not None:  # a Q-Former that has trained: a blip2 run or a BLIP-2 checkpoint (MiniGPT-4)
            return _from_trained(config, *trained)
        with loading("--connector.name-or-path", path):
            bert = AutoConfig.from_pretrained(path)
            tokenizer = load_text_tokenizer(path)
        for field, expected in _BERT_FIXED.items():
            if getattr(bert, field, expected) != expected:
                raise ConfigError(f"{path}: {field}={getattr(bert, field)!r}; the Q-Former computes with {expected!r}")
        for field, ours, theirs in (("embed_dim", config.embed_dim, bert.hidden_size),
                                    ("num_heads", config.num_heads, bert.num_attention_heads),
                                    ("intermediate_size", config.intermediate_size, bert.intermediate_size)):
            if ours and ours != theirs:
                raise ConfigError(f"connector.{field}={ours} but the BERT at {config.name_or_path} has {theirs}")
        if config.num_layers > bert.num_hidden_layers:
            raise ConfigError(f"connector.num_layers={config.num_layers} but the BERT at {config.name_or_path} has "
                              f"{bert.num_hidden_layers} layers")
        config = dataclasses.replace(config, embed_dim=bert.hidden_size, num_heads=bert.num_attention_heads,
                                     intermediate_size=bert.intermediate_size, vocab_size=len(tokenizer),
                                     text_positions=bert.max_position_embeddings,
                                     max_text_tokens=min(config.max_text_tokens, bert.max_position_embeddings))
        return config, (path, tokenizer)

    def init_pretrained(self, pretrained) -> None:
        """The Q-Former's layers from the BERT (its self-attention and feed-forward, the queries' feed-forward
        copied from the text's, as LAVIS does; cross-attention stays new), and its text embeddings and LM head.
        From a trained Q-Former (a vlmkit run, a BLIP-2 checkpoint): all of it but the projection to the LLM, which
        is new (MiniGPT-4's `llama_proj`)."""
        if pretrained is None:
            return
        if isinstance(pretrained, TrainedQFormer):
            self._load_trained(pretrained)
            return
        path, tokenizer = pretrained
        from transformers import BertForMaskedLM  # start-up: transformers, 0.76 s

        self.tokenizer = tokenizer
        bert = BertForMaskedLM.from_pretrained(path, dtype=torch.float32)
        source = bert.state_dict()
        mapped = {}
        for key, tensor in source.items():
            for old, new in _BERT_KEYS:
                if key.startswith(old):
                    names = [new + key[len(old):].replace(".attention.self.", ".attention.attention.")]
                    if ".intermediate." in names[0] or (".output." in names[0] and ".attention." not in names[0]):
                        names.append(names[0].replace(".intermediate.", ".intermediate_query.")
                                     .replace(".output.", ".output_query."))
                    for name in names:
                        mapped[name] = tensor
        state = self.state_dict()
        unmatched = [name for name in mapped if name not in state and not self._not_built(name)]
        if unmatched:
            raise ConfigError(f"{path}: BERT weights with no place in the Q-Former: {', '.join(unmatched[:4])}")
        with torch.no_grad():
            for name, tensor in mapped.items():
                if name not in state:  # layers beyond num_layers, or the text side when text_input is off
                    continue
                target = state[name]
                if target.shape == tensor.shape:
                    target.copy_(tensor)
                elif name in ("embeddings.word_embeddings.weight", "itg_head.bias") and \
                        tensor.shape[0] < target.shape[0]:  # [DEC] added: its row keeps its new initialisation
                    target[:tensor.shape[0]].copy_(tensor)
                else:
                    raise ConfigError(f"{path}: {name} has shape {tuple(tensor.shape)}, the Q-Former's "
                                      f"{tuple(target.shape)}")

    def _load_trained(self, source: "TrainedQFormer") -> None:
        self.tokenizer = source.tokenizer
        state = self.state_dict()
        found = {}
        for file in source.files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    if key.startswith(source.prefix):
                        name = key[len(source.prefix):]
                        if name in state and not name.startswith("language_projection."):
                            found[name] = handle.get_tensor(key)
        missing = [name for name in state if name not in found and not name.startswith("language_projection.")]
        if missing:
            raise ConfigError(f"{source.path}: its Q-Former lacks {', '.join(missing[:4])}"
                              + (f" (and {len(missing) - 4} more)" if len(missing) > 4 else ""))
        with torch.no_grad():
            for name, tensor in found.items():
                if state[name].shape != tensor.shape:
                    raise ConfigError(f"{source.path}: {name} has shape {tuple(tensor.shape)}, the Q-Former's "
                                      f"{tuple(state[name].shape)}")
                state[name].copy_(tensor)

    def _not_built(self, name: str) -> bool:
        """A BERT weight this Q-Former has no place for by design: a layer beyond num_layers, or the text side."""
        match = re.match(r"qformer\.encoder\.layer\.(\d+)\.", name)
        if match and int(match.group(1)) >= self.config.num_layers:
            return True
        text_side = name.startswith(("embeddings.", "itg_head.")) or (
            match is not None and re.search(r"\.(intermediate|output)\.", name) and ".attention." not in name)
        return bool(text_side) and not self.has_text

    def output_tokens_for(self, num_vision_tokens: int) -> int:
        return self.config.num_queries  # whatever the image's token count: cross-attention reads them all

    @property
    def has_text(self) -> bool:
        return hasattr(self, "embeddings")

    # -- the three ways the Q-Former runs ------------------------------------------------------------------
    def query_outputs(self, image_features: torch.Tensor) -> torch.Tensor:
        """The queries after reading the image: (B, num_queries, H)."""
        queries = self.query_tokens.expand(image_features.shape[0], -1, -1)
        return self.qformer(query_embeds=queries, encoder_hidden_states=image_features).last_hidden_state

    def text_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The text alone, no queries and no image (ITC's text side): (B, T, H)."""
        self._need_text()
        return self.qformer(query_embeds=self.embeddings(input_ids=input_ids), query_length=0,
                            attention_mask=attention_mask).last_hidden_state

    def joint_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      image_features: torch.Tensor) -> torch.Tensor:
        """Queries then text in one sequence, reading the image; `attention_mask` (B, Q+T, Q+T) says who sees
        whom (ITG's multimodal causal mask, ITM's bidirectional one): (B, Q+T, H)."""
        self._need_text()
        queries = self.query_tokens.expand(input_ids.shape[0], -1, -1)
        embeds = self.embeddings(input_ids=input_ids, query_embeds=queries)
        mask = attention_mask[:, None].to(torch.bool) if attention_mask.dim() == 3 else attention_mask
        return self.qformer(query_embeds=embeds, query_length=queries.shape[1], attention_mask=mask,
                            encoder_hidden_states=image_features).last_hidden_state

    def _need_text(self) -> None:
        if not self.has_text:
            raise ConfigError("this Q-Former has no text side (connector.text_input is False: it was imported from a "
                              "Blip2ForConditionalGeneration checkpoint, which has none); stage-1 objectives need it")

    @property
    def reads_instruction(self) -> bool:
        return bool(self.config.instruction_aware)

    def forward(self, features: torch.Tensor, instruction_ids: torch.Tensor | None = None,
                instruction_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The image's visual tokens for the LLM. With an instruction (its Q-Former tokens, one row per image), the
        queries and the instruction see each other in every self-attention (InstructBLIP's instruction-aware
        queries); only the query outputs go on."""
        if instruction_ids is None:
            query = self.query_outputs(features)
        else:
            queries = self.config.num_queries
            mask = attention_mask("itm", queries, instruction_mask)
            query = self.joint_outputs(instruction_ids, mask, features)[:, :queries]
        return self.language_projection(query.to(self.language_projection.weight.dtype))


@dataclass
class TrainedQFormer:
    """Where a trained Q-Former's weights are: safetensors files, the key prefix, its tokenizer (None without a text
    side) and the vision settings it read features with (the new model must use the same: name_or_path and, from a
    vlmkit run, feature_layer / select / final_norm)."""
    path: str
    files: list
    prefix: str
    tokenizer: object
    vision: dict


def _trained_qformer(path: str):
    """(kind, directory, its config.json) for a vlmkit run/checkpoint or a Hugging Face BLIP-2 directory; None for
    anything else (a BERT)."""
    directory = Path(path)
    if not directory.exists() and path.count("/") == 1:  # a hub id: its config decides (weights come later)

        from huggingface_hub import hf_hub_download, snapshot_download  # start-up: huggingface_hub's downloads

        config = json.loads(Path(hf_hub_download(path, "config.json")).read_text())
        if config.get("model_type") != "blip-2":
            return None
        directory = Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors"]))
    file = directory / "config.json"
    saved = json.loads(file.read_text()) if file.exists() else {}
    if (directory / "model" / "config.json").exists() and saved.get("format") != "vlmkit" \
            and saved.get("model_type") != "blip-2":
        directory = directory / "model"  # a run directory (its config.json is the run's): its newest stage
        saved = json.loads((directory / "config.json").read_text())
    if saved.get("format") == "vlmkit":
        return "vlmkit", directory, saved
    if saved.get("model_type") == "blip-2":
        return "blip-2", directory, saved
    return None


def _from_trained(config: ConnectorConfig, kind: str, directory: Path, saved: dict):
    if kind == "vlmkit":
        theirs = saved["arch"]["connector"]
        if theirs.get("type") != "qformer":
            raise ConfigError(f"--connector.name-or-path {directory}: its connector is {theirs.get('type')!r}, not a "
                              "Q-Former")
        sizes = {f.name: theirs[f.name] for f in dataclasses.fields(ConnectorConfig)
                 if f.name in theirs and f.name not in ("name_or_path", "type", "instruction_aware", "dropout")}
        # the last two are how the new model uses the Q-Former (MiniGPT-4's reads the image alone), not its sizes
        tokenizer_dir = directory / CONNECTOR_TOKENIZER_DIR
        tokenizer = load_text_tokenizer(tokenizer_dir) if tokenizer_dir.is_dir() else None
        vision = {key: saved["arch"]["vision"][key] for key in ("name_or_path", "feature_layer", "select", "final_norm")
                  if key in saved["arch"]["vision"]}
        files, prefix = [directory / "model.safetensors"], "connector."
    else:
        q = saved["qformer_config"]
        sizes = dict(num_queries=saved.get("num_query_tokens", 32), embed_dim=q["hidden_size"],
                     num_layers=q["num_hidden_layers"], num_heads=q["num_attention_heads"],
                     intermediate_size=q["intermediate_size"], cross_attention_frequency=q["cross_attention_frequency"],
                     text_input=bool(q.get("use_qformer_text_input", False)),
                     proj_dim=saved.get("image_text_hidden_size", 256), vocab_size=q.get("vocab_size", 30522),
                     text_positions=q.get("max_position_embeddings", 512))
        tokenizer, vision = None, {"name_or_path": config.name_or_path}  # its own tower, in the same checkpoint
        files, prefix = sorted(directory.glob("*.safetensors")), ""
        if not files:
            raise ConfigError(f"{directory}: no .safetensors weights (vlmkit reads BLIP-2 checkpoints in safetensors)")
    if sizes.get("text_input") and tokenizer is None:
        sizes["text_input"] = False  # no tokenizer came with it: the text side cannot be used
    config = dataclasses.replace(config, **sizes)
    return config, TrainedQFormer(str(directory), files, prefix, tokenizer, vision)
