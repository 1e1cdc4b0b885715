"""The assembly: vision encoder -> connector -> language model, and its save/load.

Image features are spliced into the text embeddings at the image-placeholder positions with one masked
assignment. A batch holds any number of images per sample (0 for text-only chat); `image_counts[i]` says
how many belong to sample i, in order, and each must fill exactly `num_image_tokens` placeholders.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from pathlib import Path as _Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file, save_model
from torch import nn

from vlmkit.config import ArchConfig, LoRAConfig, without_remote_code
from vlmkit.connectors import build_connector, connector_class
from vlmkit.connectors.qformer import CONNECTOR_TOKENIZER_DIR, QFormerText, load_text_tokenizer
from vlmkit.connectors.states import StateEncoders, placeholder
from vlmkit.data.boxes import coordinate_tokens
from vlmkit.data.images import ImageTransform
from vlmkit.data.packing import block_diagonal_mask
from vlmkit.data.render import IGNORE_INDEX, IMAGE_TOKEN
from vlmkit.data.templates import get_template, token_id
from vlmkit.encoders import VisionEncoder, load_vision_tower
from vlmkit.errors import BadRecord, ConfigError
from vlmkit.io import atomic_dir, check_local_path, loading, resolve_name
from vlmkit.llm import LanguageModel, sample_positions
from vlmkit.llm.lora import (ADAPTER_DIR, attach_lora, has_lora, lora_record, quantization_config,
                              restore_token_originals)
from vlmkit.model.weights import load_into, read_state_dict, stream_safetensors

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def check_read_features(config: ArchConfig, read: dict | None, vision_path: str) -> None:
    """A trained connector (MiniGPT-4's Q-Former) only works on the features it was trained on: the same tower, read
    the same way; otherwise a ConfigError saying which setting to change."""
    if not read:
        return
    source = config.connector.name_or_path
    if "name_or_path" in read:
        theirs = resolve_name(read["name_or_path"], verbose=False)
        if _Path(theirs).resolve() != _Path(vision_path).resolve() and theirs != vision_path:
            raise ConfigError(f"--connector.name-or-path {source}: that Q-Former was trained on the features of "
                              f"{read['name_or_path']}, but this model's tower is {config.vision.name_or_path}; use "
                              f"--vision.name-or-path {read['name_or_path']}")
    for key, value in read.items():
        if key != "name_or_path" and getattr(config.vision, key) != value:
            raise ConfigError(f"--connector.name-or-path {source}: that Q-Former read its tower with vision.{key}="
                              f"{value!r}, this model with {getattr(config.vision, key)!r}; use "
                              f"--vision.{key.replace('_', '-')} {value}")


def llm_width(path: str, trust_remote_code: bool = False) -> int:
    """An LLM's hidden size from its config alone (no weights loaded)."""
    from transformers import AutoConfig  # start-up: transformers, 0.76 s

    hf = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    hf = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    width = getattr(hf, "hidden_size", None) or getattr(hf, "d_model", None)
    if not width:
        raise ConfigError(f"{path}: its config names no hidden_size (or d_model): cannot size the connector")
    return int(width)


def splice_image_features(inputs_embeds: torch.Tensor, image_token_mask: torch.Tensor, image_embeds: torch.Tensor,
                          image_counts: list[int], record_ids=None) -> torch.Tensor:
    """Put `image_embeds` (num_images, M, D) into the positions where `image_token_mask` is True.

    Checks first that sample i has exactly image_counts[i] * M placeholders, and names the sample if not.
    """
    tokens_per_image = image_embeds.shape[1] if image_embeds is not None and image_embeds.numel() else 0
    placeholders = image_token_mask.sum(dim=1).tolist()
    if len(image_counts) != len(placeholders):
        raise ValueError(f"image_counts has {len(image_counts)} entries for a batch of {len(placeholders)} samples")
    for i, (found, count) in enumerate(zip(placeholders, image_counts)):
        if found != count * tokens_per_image:
            name = record_ids[i] if record_ids is not None else i
            raise BadRecord(name, f"has {found} image placeholder tokens but {count} image(s) x "
                                  f"{tokens_per_image} tokens = {count * tokens_per_image} image features",
                            kind="image_count")
    if not sum(image_counts):
        return inputs_embeds
    return inputs_embeds.masked_scatter(image_token_mask.unsqueeze(-1),
                                        image_embeds.to(inputs_embeds.dtype).reshape(-1, inputs_embeds.shape[-1]))


def split_for_encoder_decoder(input_ids: torch.Tensor, labels: torch.Tensor, attention_mask, start_id: int,
                              pad_id: int, image_token_id: int, record_ids=None):
    """Rendered samples as an encoder-decoder LM reads them: each sample's tokens before its first supervised one
    (system text, images, the first question and the assistant cue) are the encoder's input; the rest (the first
    answer, and any later turns) is the decoder's sequence, fed after `start_id` and predicted one token ahead, with
    the rendered labels (later questions are read, not learned). Returns right-padded (encoder_ids, encoder_mask,
    decoder_input_ids, decoder_mask, decoder_labels). An image after the first answer has no place in the
    encoder: a BadRecord naming the sample."""
    rows = range(input_ids.shape[0])
    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    encoders, decoders, targets = [], [], []
    for i in rows:
        ids, target = input_ids[i][real[i]].tolist(), labels[i][real[i]].tolist()
        first = next((t for t, label in enumerate(target) if label != IGNORE_INDEX), len(ids))
        if image_token_id in ids[first:]:
            name = record_ids[i] if record_ids is not None else i
            raise BadRecord(name, "has an image after its first answer; an encoder-decoder LLM reads the images in "
                                  "its encoder, before the first answer", kind="image_count")
        encoders.append(ids[:first])
        decoders.append([start_id] + ids[first:-1] if first < len(ids) else [start_id])
        targets.append(target[first:] if first < len(ids) else [IGNORE_INDEX])

    def right_pad(sequences, value):
        length = max(map(len, sequences))
        out = torch.full((len(sequences), length), value, dtype=torch.long)
        mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, seq in enumerate(sequences):
            out[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, :len(seq)] = 1
        return out, mask

    encoder_ids, encoder_mask = right_pad(encoders, pad_id)
    decoder_ids, decoder_mask = right_pad(decoders, pad_id)
    decoder_labels, _ = right_pad(targets, IGNORE_INDEX)
    return encoder_ids, encoder_mask, decoder_ids, decoder_mask, decoder_labels


@contextlib.contextmanager
def batch_norm_statistics_kept(module: nn.Module):
    """Run `module` with its training BatchNorm layers in eval mode, so a forward leaves their running statistics
    as they were (for a pass whose output is discarded: it only carries a zero gradient)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for norm in norms:
        norm.eval()
    try:
        yield
    finally:
        for norm in norms:
            norm.train()


class VisionLanguageModel(nn.Module):
    """A vision-language model assembled from parts; `config` is the preset it was built from."""

    def __init__(self, config: ArchConfig, vision: VisionEncoder, connector: nn.Module, llm: LanguageModel | None,
                 tokenizer, image_transform: ImageTransform, llm_hidden: int | None = None,
                 states: StateEncoders | None = None):
        super().__init__()
        self.config = config
        self.vision = vision
        self.connector = connector
        self.llm = llm
        self.states = states  # PaLM-E's state MLPs (config.states), or None
        self.state_token_ids = {kind: tokenizer.convert_tokens_to_ids(placeholder(kind)) for kind in
                                config.states.kinds}
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        # the LLM's width: the connector's output (also without an LLM: a BLIP-2 stage-1 model has none)
        self.llm_hidden = llm.hidden_size if llm is not None else llm_hidden

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: ArchConfig, verbose: bool = True, device=None, dtype=None, with_llm: bool = True,
                    allow_pickle: bool = False, **load_kwargs) -> "VisionLanguageModel":
        """Build from the backbones a config names (hub ids, local directories or 'tiny:…').

        The backbones load in fp32 (the master weights training needs), or in `dtype`. With `device`/`dtype`
        they load straight there in that dtype (transformers reads their weights
        onto the meta-initialised model tensor by tensor), so a GPU model never passes through CPU memory in
        fp32; the new connector follows the LLM's embeddings. `with_llm=False` (BLIP-2's stage 1): the LLM's
        tokenizer and width are read, its weights are not loaded (`attach_llm` loads them for a later stage).
        A connector that starts from a checkpoint of its own (the Q-Former's BERT) is initialised from it."""
        vision_path = resolve_name(config.vision.name_or_path, verbose=verbose)
        llm_path = resolve_name(config.llm.name_or_path, verbose=verbose)
        check_local_path(vision_path, "--vision.name-or-path")
        check_local_path(llm_path, "--llm.name-or-path")
        connector_config, pretrained = connector_class(config.connector).resolve_pretrained(config.connector)
        config = dataclasses.replace(config, connector=connector_config)
        check_read_features(config, getattr(pretrained, "vision", None), vision_path)
        # seeded after the tiny backbones are resolved: building them on a cold cache consumes the RNG, and the
        # connector's initialisation must not depend on whether the cache was empty
        torch.manual_seed(config.seed)
        transform = ImageTransform.from_pretrained(vision_path, pad_to_square=config.vision.pad_to_square)
        # fp32 unless asked: transformers 5 loads a checkpoint in the dtype its config names (Vicuna's is fp16),
        # and training needs fp32 master weights (bf16 compute comes from autocast or FSDP's policy)
        load_kwargs.setdefault("dtype", dtype if dtype is not None else torch.float32)
        # safetensors only: a backbone with pickled weights alone (pytorch_model.bin) is refused unless asked for
        load_kwargs.setdefault("use_safetensors", None if allow_pickle else True)
        if device is not None and torch.device(device).type != "cpu":
            load_kwargs.setdefault("device_map", torch.device(device))
        llm, llm_hidden = None, None
        with loading("--llm.name-or-path", llm_path):
            if with_llm:
                llm = cls._load_llm(config, llm_path, **load_kwargs)
            else:
                if config.coordinate_tokens:
                    raise ConfigError("coordinate_tokens needs the LLM (its embeddings grow): build with the LLM")
                llm_hidden = llm_width(llm_path, config.llm.trust_remote_code)
            tokenizer = prepare_tokenizer(load_tokenizer(llm_path, config.llm.trust_remote_code), llm,
                                          template_tokens(config))
            if config.coordinate_tokens:
                add_coordinate_tokens(tokenizer, llm, config.box_format)
        with loading("--vision.name-or-path", vision_path):
            tower = load_vision_tower(vision_path, **load_kwargs)
        model = cls._assemble(config, tower, llm, tokenizer, transform, llm_hidden=llm_hidden)
        if pretrained is not None:
            with loading("--connector.name-or-path", config.connector.name_or_path):
                model.connector.init_pretrained(pretrained)
        return model

    @staticmethod
    def _load_llm(config: ArchConfig, llm_path: str, **load_kwargs) -> LanguageModel:
        qlora = next((s.lora for s in config.stages if s.lora.quantize), None)
        llm_kwargs = dict(load_kwargs, quantization_config=quantization_config(qlora)) if qlora else dict(load_kwargs)
        if config.llm.trust_remote_code:
            llm_kwargs["trust_remote_code"] = True
        llm = LanguageModel.from_pretrained(llm_path, **llm_kwargs)
        if config.llm.visual_expert:
            llm.add_visual_experts()
        return llm

    def attach_llm(self, verbose: bool = True, allow_pickle: bool = False) -> None:
        """Load the LLM that `config.llm` names into a model built without one (BLIP-2 after its stage 1), where
        the model is, in its dtype; the tokenizer keeps its ids (the embeddings grow to its length)."""
        if self.llm is not None:
            return
        path = resolve_name(self.config.llm.name_or_path, verbose=verbose)
        check_local_path(path, "--llm.name-or-path")
        weight = next(self.connector.parameters())
        kwargs = {"dtype": weight.dtype, "use_safetensors": None if allow_pickle else True}
        if weight.device.type != "cpu":
            kwargs["device_map"] = weight.device
        with loading("--llm.name-or-path", path):
            llm = self._load_llm(self.config, path, **kwargs)
        if llm.hidden_size != self.llm_hidden:
            raise ConfigError(f"--llm.name-or-path {path}: width {llm.hidden_size}, but the connector was built for "
                              f"{self.llm_hidden} (the LLM named when the model was made)")
        prepare_tokenizer(self.tokenizer, llm, template_tokens(self.config))
        self.llm = llm

    def require_llm(self, what: str) -> LanguageModel:
        if self.llm is None:
            raise ConfigError(f"{what} needs the language model, and this model has none (a BLIP-2 stage-1 run: the "
                              "Q-Former trains without an LLM); train the next stage (it loads the LLM), or use "
                              "`vlmkit eval RUN --task retrieval`")
        return self.llm

    @classmethod
    def _assemble(cls, config: ArchConfig, tower, llm: LanguageModel | None, tokenizer, transform: ImageTransform,
                  llm_hidden: int | None = None):
        """Wrap the tower and build the connector between it and the LLM (new or loaded, the same way)."""
        vision = VisionEncoder(tower, config.vision, transform.crop[0])
        llm_hidden = llm.hidden_size if llm is not None else llm_hidden
        connector = build_connector(config.connector, vision.hidden_size, llm_hidden, vision.num_tokens)
        # a new connector joins the LLM's device/dtype (the tower's without an LLM)
        reference = next(iter(tower.parameters())) if llm is None else llm.causal_lm.get_input_embeddings().weight
        # (not onto the meta device of a model being loaded: the connector's parameters are meta already, and
        # its non-persistent buffers — the Q-Former's position ids — are not in the checkpoint to refill them)
        connector.to(device=None if reference.is_meta else reference.device,
                     dtype=reference.dtype if reference.is_floating_point() else None)
        states = None
        if config.states.kinds:
            states = StateEncoders(config.states.kinds, llm_hidden, config.states.hidden)
            states.to(device=None if reference.is_meta else reference.device,
                      dtype=reference.dtype if reference.is_floating_point() else None)
        return cls(config, vision, connector, llm, tokenizer, transform, llm_hidden=llm_hidden, states=states)

    def set_image_size(self, size: int) -> None:
        """Preprocess images to `size` x `size` from now on (a stage's `image_size`): the tower's grid follows (a
        ViT interpolates its position embeddings), and the connector must give a fixed number of tokens
        whatever the grid (the resampler), or the image token count changes with it."""
        transform = self.image_transform
        if transform.crop == (size, size) and (transform.size == size or transform.resize_exact):
            return
        self.image_transform = dataclasses.replace(transform, size=size, crop=(size, size))
        self.vision.set_image_size(size)
        self.connector.set_input_tokens(self.vision.num_tokens)

    @property
    def num_image_tokens(self) -> int:
        return self.connector.num_output_tokens

    def parts(self) -> dict[str, nn.Module]:
        parts = {"vision": self.vision, "connector": self.connector, "llm": self.llm, "states": self.states}
        return {name: part for name, part in parts.items() if part is not None}

    # -- forward -----------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision features (num_images, N, D_vision): the part that can be cached while the encoder is frozen."""
        return self.vision(pixel_values)

    def embed(self, input_ids: torch.Tensor, image_counts: list[int] | None = None, pixel_values=None,
              vision_features=None, record_ids=None, labels=None,
              text_inputs: dict | None = None, states: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Text embeddings with image embeddings spliced in; returns (inputs_embeds, image_token_mask).
        `states` (PaLM-E): {kind: (n, width) vectors in sample order}, each filling one `<kind>` placeholder.
        For a connector that reads the instruction: `text_inputs`, each image's instruction in the connector's
        tokens as the loader made them (`QFormerText.instructions`), or else made here from the batch (`labels`:
        where the answers start)."""
        input_ids = input_ids.to(self.device)
        inputs_embeds = self.require_llm("the language model's forward").embed(input_ids)
        image_token_mask = input_ids == self.image_token_id
        if image_counts is None:
            image_counts = [0] * input_ids.shape[0]
        image_embeds = None
        if sum(image_counts):
            if vision_features is None:
                if pixel_values is None:
                    raise ValueError("the batch has image placeholders but neither pixel_values nor vision_features")
                vision_features = self.encode_images(pixel_values)
            weight = next(self.connector.parameters())
            extra = {}
            if getattr(self.connector, "reads_instruction", False):
                if text_inputs is None:
                    text_inputs = self.qformer_text().instructions(input_ids, image_counts, labels)
                extra = {"instruction_ids": text_inputs["input_ids"].to(weight.device),
                         "instruction_mask": text_inputs["attention_mask"].to(weight.device)}
            image_embeds = self.connector(vision_features.to(device=weight.device, dtype=weight.dtype), **extra)
        inputs_embeds = splice_image_features(inputs_embeds, image_token_mask, image_embeds, image_counts, record_ids)
        keep = getattr(self, "keep_connector_in_graph", False) or getattr(self, "keep_vision_in_graph", False)
        if image_embeds is None and keep and torch.is_grad_enabled():
            # a text-only batch in training: run the connector on nothing, so its parameters get a (zero) gradient
            # this step, as LLaVA's forward does with `cur_image_features[0:0]` (vlmkit.train.loop sets the flag);
            # a tower that trains runs too, on one blank image, its BatchNorm statistics kept as they were
            weight = next(self.connector.parameters())
            if getattr(self, "keep_vision_in_graph", False):
                side, channels = self.vision.image_size, getattr(self.vision.tower.config, "num_channels", 3)
                with batch_norm_statistics_kept(self.vision):
                    features = self.encode_images(torch.zeros(1, channels, side, side))
            else:
                features = torch.zeros(1, self.vision.num_tokens, self.vision.hidden_size)
            empty = self.connector(features.to(device=weight.device, dtype=weight.dtype))[:0]
            inputs_embeds = inputs_embeds + empty.sum().to(inputs_embeds.dtype)
        if self.states is not None:
            inputs_embeds = self.states.splice(inputs_embeds, input_ids, self.state_token_ids, states, record_ids)
            if not states and torch.is_grad_enabled() and any(p.requires_grad for p in self.states.parameters()):
                inputs_embeds = self.states.keep_in_graph(inputs_embeds)
        elif states:
            raise ConfigError("the batch has state vectors, but this model has no state encoders (config "
                              "states.kinds, e.g. --states.kinds obj=7)")
        return inputs_embeds, image_token_mask

    @property
    def device(self) -> torch.device:
        """Where the LLM's input embeddings live (the connector's without an LLM): inputs are moved there."""
        if self.llm is None:
            return next(self.connector.parameters()).device
        return self.llm.causal_lm.get_input_embeddings().weight.device

    def forward(self, input_ids, attention_mask=None, labels=None, image_counts=None, pixel_values=None,
                vision_features=None, record_ids=None, position_ids=None, objective=None, decoder_input_ids=None,
                text_inputs=None, sequence_ids=None, prefix_lengths=None, states=None):
        """Returns (loss or None, logits), as a Hugging Face model does: with labels, the next-token loss on the
        supervised tokens and the logits there (`supervised_logits`); without, the logits of every position.
        Packed rows (`sequence_ids`, and `prefix_lengths` for shared-prefix rows; vlmkit.data.packing): the model
        makes their block-diagonal mask and their positions (`position_ids`) itself.

        `objective` (vlmkit.objectives): that objective's loss instead, `objective.loss(model, **inputs)`, computed
        here so that it runs inside a wrapped forward (DDP's and FSDP's hooks see every parameter it uses; BLIP-2's
        ITC/ITM/ITG run the Q-Former three times). The model knows no objective itself."""
        if objective is not None:
            return objective.loss(self, input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                  image_counts=image_counts, pixel_values=pixel_values,
                                  vision_features=vision_features, record_ids=record_ids, position_ids=position_ids,
                                  text_inputs=text_inputs, sequence_ids=sequence_ids, prefix_lengths=prefix_lengths,
                                  states=states)
        if labels is None:
            return None, self.logits(input_ids, attention_mask, image_counts, pixel_values, vision_features,
                                     record_ids, position_ids, decoder_input_ids, text_inputs, sequence_ids,
                                     prefix_lengths, states)
        logits, targets = self.supervised_logits(input_ids, attention_mask, labels, image_counts, pixel_values,
                                                 vision_features, record_ids, position_ids, text_inputs, sequence_ids,
                                                 prefix_lengths, states)
        return F.cross_entropy(logits.float(), targets), logits

    def logits(self, input_ids, attention_mask=None, image_counts=None, pixel_values=None, vision_features=None,
               record_ids=None, position_ids=None, decoder_input_ids=None, text_inputs=None, sequence_ids=None,
               prefix_lengths=None, states=None) -> torch.Tensor:
        """Logits of every position (an encoder-decoder LLM: of its decoder over `decoder_input_ids`, by default
        the start token alone)."""
        llm = self.require_llm("the language model's forward")
        if llm.is_encoder_decoder:
            self._refuse_positions(position_ids if sequence_ids is None else sequence_ids)
            if decoder_input_ids is None:
                decoder_input_ids = torch.full((input_ids.shape[0], 1), llm.decoder_start_token_id, dtype=torch.long)
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            logits, _ = self._encode_decode(input_ids, attention_mask, decoder_input_ids, None, image_counts,
                                            pixel_values, vision_features, record_ids, text_inputs, states)
            return logits
        inputs_embeds, image_token_mask = self.embed(input_ids, image_counts, pixel_values, vision_features,
                                                     record_ids, text_inputs=text_inputs, states=states)
        attention_mask, position_ids = self._layout(attention_mask, position_ids, sequence_ids, prefix_lengths,
                                                    image_token_mask)
        logits, _ = llm(inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                        image_token_mask=self.routing_mask(image_token_mask))
        return logits

    def supervised_logits(self, input_ids, attention_mask, labels, image_counts=None, pixel_values=None,
                          vision_features=None, record_ids=None, position_ids=None, text_inputs=None,
                          sequence_ids=None, prefix_lengths=None, states=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, targets) at the supervised positions only, each position predicting its next token: what a
        next-token loss reads, without the logits of the rest (a vocabulary-wide row per token).

        An encoder-decoder LLM (Flan-T5) reads each sample up to its first supervised token in its encoder (the
        images, the prompt) and the rest in its decoder (`split_for_encoder_decoder`)."""
        llm = self.require_llm("the language model's forward")
        if llm.is_encoder_decoder:
            self._refuse_positions(position_ids if sequence_ids is None else sequence_ids)
            encoder_ids, encoder_mask, decoder_ids, decoder_mask, targets = split_for_encoder_decoder(
                input_ids, labels, attention_mask, llm.decoder_start_token_id, self.tokenizer.pad_token_id,
                self.image_token_id, record_ids)
            logits, _ = self._encode_decode(encoder_ids, encoder_mask, decoder_ids, decoder_mask, image_counts,
                                            pixel_values, vision_features, record_ids, text_inputs, states)
            targets = targets.to(logits.device)
            supervised = targets != IGNORE_INDEX
            return logits[supervised], targets[supervised]
        inputs_embeds, image_token_mask = self.embed(input_ids, image_counts, pixel_values, vision_features,
                                                     record_ids, labels=labels, text_inputs=text_inputs, states=states)
        attention_mask, position_ids = self._layout(attention_mask, position_ids, sequence_ids, prefix_lengths,
                                                    image_token_mask)
        hidden = llm.hidden_states(inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                                   image_token_mask=self.routing_mask(image_token_mask))
        targets = labels[:, 1:].to(hidden.device)
        supervised = targets != IGNORE_INDEX
        return llm.logits(hidden[:, :-1][supervised]), targets[supervised]

    def _here(self, tensor):
        return tensor.to(self.device) if tensor is not None else None

    def _layout(self, attention_mask, position_ids, sequence_ids, prefix_lengths, image_token_mask=None):
        """(attention mask, position ids) on the model's device; for packed rows made from their `sequence_ids`;
        a visual-expert model's own positions (`position_ids`) where none are given."""
        if self.visual_expert and position_ids is None:
            position_ids = self.position_ids(attention_mask, sequence_ids, prefix_lengths, image_token_mask)
            if attention_mask is None and image_token_mask is not None:
                # an explicit mask: without one transformers reads repeated position ids (an image's patches) as
                # the starts of packed sequences and keeps them from attending to each other
                attention_mask = torch.ones_like(image_token_mask, dtype=torch.long)
        if sequence_ids is not None:
            sequence_ids = sequence_ids.to(self.device)
            attention_mask = block_diagonal_mask(sequence_ids, prefix_lengths=prefix_lengths)
            if position_ids is None:
                position_ids = self.position_ids(None, sequence_ids, prefix_lengths)
        return self._here(attention_mask), self._here(position_ids)

    # -- positions and decoding: every caller (training, packing, generation, evaluation) goes through these ---------
    @property
    def visual_expert(self) -> bool:
        return self.llm is not None and self.llm.experts is not None

    def position_ids(self, attention_mask, sequence_ids=None, prefix_lengths=None,
                     image_token_mask=None) -> torch.Tensor:
        """The position of every token of a batch, each numbered as in its sample alone (`sample_positions`): a
        right-padded training batch, a left-padded generation batch (from `attention_mask`), packed rows
        (`sequence_ids`) and shared-prefix rows (`prefix_lengths`). Every caller passes through here.

        With visual experts (CogVLM) an image takes three positions: its first token (the begin-image vector) one,
        all its patches the next, its last token (end-image) the one after; text continues from there, padding
        does not advance (`image_token_mask` over the same length says where the images are)."""
        if self.visual_expert and image_token_mask is not None:
            if sequence_ids is not None:
                raise ConfigError("packed rows with a visual-expert LLM (CogVLM): its images' positions are its own; "
                                  "train without pack_to / share_prefix")
            real = torch.ones_like(image_token_mask) if attention_mask is None else attention_mask.bool()
            index = _index_in_image(image_token_mask.bool(), self.num_image_tokens)
            advance = real & (~image_token_mask.bool() | (index <= 1) | (index == self.num_image_tokens - 1))
            return (advance.long().cumsum(-1) - 1).clamp(min=0)
        return sample_positions(attention_mask, sequence_ids, prefix_lengths)

    def routing_mask(self, image_token_mask):
        """Which tokens the LLM's visual experts take (CogVLM): an image's tokens whose next token is of the same
        image, so the begin-image vector and the patches, not the end-image vector, not the last token of a
        sequence, not a single decode step. Without experts: the image tokens, for the LLM to read or not."""
        if image_token_mask is None or not self.visual_expert:
            return image_token_mask
        mask = image_token_mask.bool()
        following = torch.zeros_like(mask)
        following[:, :-1] = mask[:, 1:]
        return mask & following & (_index_in_image(mask, self.num_image_tokens) != self.num_image_tokens - 1)

    def decode(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, cache=None, image_token_mask=None,
               use_cache: bool = True, logits_to_keep: int = 1):
        """The language model on `inputs_embeds` (B, n), the continuation of `cache` (None: from the start), with
        `attention_mask` (B, cached + n) over both, and `image_token_mask` over the same length (which positions
        are image tokens; the LLM gets the last n); their positions are the last n of `position_ids`. A prompt's
        prefill, a shared prefix's suffixes, and (without a cache) a whole sequence. Returns (logits, cache)."""
        new = inputs_embeds.shape[1]
        positions = self.position_ids(attention_mask, image_token_mask=image_token_mask)[:, -new:]
        routing = self.routing_mask(image_token_mask)
        routing = routing[:, -new:] if routing is not None else None
        return self.llm(inputs_embeds, attention_mask=attention_mask, position_ids=positions, past_key_values=cache,
                        use_cache=use_cache, image_token_mask=routing, logits_to_keep=logits_to_keep)

    def decode_step(self, tokens: torch.Tensor, attention_mask: torch.Tensor, cache, image_token_mask=None):
        """One new token per row (B,) after `cache`; `attention_mask` and `image_token_mask` (B, cached + 1) cover
        the cached positions and the new one. Returns (logits, cache)."""
        fed = tokens[:, None]
        if image_token_mask is None:
            image_token_mask = torch.zeros_like(attention_mask, dtype=torch.bool)
        return self.decode(self.llm.embed(fed), attention_mask, cache, image_token_mask)

    def _refuse_positions(self, position_ids) -> None:
        if position_ids is not None:
            raise ConfigError("packed sequences (position_ids) need a decoder-only LLM; this one is an encoder-decoder "
                              f"({self.llm.config.model_type}): train without packing")

    def _encode_decode(self, encoder_ids, encoder_mask, decoder_ids, decoder_mask, image_counts, pixel_values,
                       vision_features, record_ids, text_inputs, states=None):
        inputs_embeds, _ = self.embed(encoder_ids, image_counts, pixel_values, vision_features, record_ids,
                                      text_inputs=text_inputs, states=states)
        encoder_mask = encoder_mask.to(self.device)
        hidden = self.llm.encode(inputs_embeds, encoder_mask)
        return self.llm.decode(decoder_ids.to(self.device), hidden, encoder_mask,
                               decoder_mask=self._here(decoder_mask))

    def qformer_text(self):
        """The Q-Former's text reader (`QFormerText`): its own tokenizer over this model's tokens."""
        tokenizer = getattr(self.connector, "tokenizer", None)
        if tokenizer is None:
            raise ConfigError("this needs the Q-Former's text tokenizer: connector.type qformer and "
                              "connector.name_or_path a BERT or a trained Q-Former with one")
        return QFormerText(self.tokenizer, tokenizer, self.image_token_id, self.config.connector.max_text_tokens)

    def instruction_tokens(self, input_ids: torch.Tensor, image_counts: list[int], labels=None, device=None) -> dict:
        """For an instruction-aware Q-Former: each image's instruction in the Q-Former's tokens, as the connector's
        forward takes them (`QFormerText.instructions`)."""
        encoded = self.qformer_text().instructions(input_ids, image_counts, labels)
        return {"instruction_ids": encoded["input_ids"].to(device),
                "instruction_mask": encoded["attention_mask"].to(device)}

    # -- save / load ---------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, state_dict: dict | None = None) -> None:
        """Write config.json + model.safetensors + tokenizer + preprocessor config, atomically.

        `state_dict` replaces the model's own tensors (a sharded model's gathered full state)."""
        with atomic_dir(directory) as tmp:
            self._write(Path(tmp), state_dict)

    def _write(self, directory: Path, state_dict: dict | None = None) -> None:
        config = {
            "format": "vlmkit", "format_version": FORMAT_VERSION,
            "arch": self.config.to_dict(),
            "vision_tower": self.vision.tower.config.to_dict(),
            "llm": self.llm.config.to_dict() if self.llm is not None else None,  # None: not loaded (BLIP-2 stage 1)
            "llm_hidden": self.llm_hidden,
            "num_image_tokens": self.num_image_tokens,
            "lora": lora_record(self.llm),
        }
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str))
        if state_dict is None:
            save_model(self.as_tensor_module(), str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        else:
            save_file(_without_shared(state_dict), str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        self.tokenizer.save_pretrained(directory)
        text_tokenizer = getattr(self.connector, "tokenizer", None)  # the Q-Former's own (BERT) tokenizer
        if text_tokenizer is not None:
            text_tokenizer.save_pretrained(directory / CONNECTOR_TOKENIZER_DIR)
        self.image_transform.save(directory)
        if has_lora(self.llm):  # the adapters alone, in peft's format, for use with the base LLM elsewhere
            self.llm.model.save_pretrained(directory / ADAPTER_DIR)

    def as_tensor_module(self) -> nn.Module:
        """The module whose state dict is the checkpoint (the parts, without non-tensor attributes)."""
        return nn.ModuleDict(self.parts())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device=None, dtype=None,
                        allow_pickle: bool = False, trust_remote_code: bool = False) -> "VisionLanguageModel":
        """Load a vlmkit checkpoint. Weights are read from safetensors; a checkpoint that only has pickled
        weights (.bin/.pt) is refused unless `allow_pickle` (then read with torch.load(weights_only=True)).
        The saved config never turns on `llm.trust_remote_code` (a later `attach_llm` would run the code of the
        directory it names); `trust_remote_code` here does."""
        from transformers import AutoTokenizer  # start-up: transformers, 0.76 s

        directory = Path(directory)
        config_file = directory / CONFIG_NAME
        if not config_file.exists():
            raise FileNotFoundError(f"{directory} is not a vlmkit checkpoint (no {CONFIG_NAME})")
        saved = json.loads(config_file.read_text())
        if saved.get("format") != "vlmkit":
            raise ConfigError(f"{config_file} is not a vlmkit config (for a Hugging Face LLaVA directory use "
                              "`vlmkit convert from-hf`)")
        weights = directory / WEIGHTS_NAME
        if not weights.exists() and not any(directory.glob("*.bin")) and not any(directory.glob("*.pt")):
            raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME}")
        config = without_remote_code(ArchConfig.from_dict(saved["arch"]))
        config.llm.trust_remote_code = trust_remote_code
        transform = ImageTransform.from_pretrained(directory, pad_to_square=config.vision.pad_to_square)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        # built on the meta device (no memory, no random initialisation), then each tensor is read, cast and
        # moved on its own: a checkpoint never materialises in fp32 on the CPU on its way to a bf16 GPU model
        from accelerate import init_empty_weights  # start-up: accelerate, 88 ms

        with init_empty_weights(include_buffers=False):  # buffers computed at init (rotary tables) stay real
            llm = LanguageModel.from_hf_config(saved["llm"]) if saved["llm"] is not None else None
            if llm is not None and config.llm.visual_expert:
                llm.add_visual_experts()
            model = cls._assemble(config, load_vision_tower(None, hf_config=saved["vision_tower"]), llm, tokenizer,
                                  transform, llm_hidden=saved.get("llm_hidden"))
        if llm is not None:
            model.llm.causal_lm.tie_weights()  # not tied under init_empty_weights (it re-creates assigned parameters)
        if (directory / CONNECTOR_TOKENIZER_DIR).is_dir():
            model.connector.tokenizer = load_text_tokenizer(directory / CONNECTOR_TOKENIZER_DIR)
        if saved.get("lora"):  # kept adapters: the weights file holds them under peft's names
            record = dict(saved["lora"])
            token_ids = record.pop("trainable_token_indices", [])
            attach_lora(model.llm, LoRAConfig(**record), token_ids)
        target = torch.device(device) if device is not None else torch.device("cpu")
        if weights.exists():
            tensors = stream_safetensors(weights, dtype=dtype, device=target)
        else:
            state = read_state_dict(directory, allow_pickle=allow_pickle)
            tensors = ((k, v.to(device=target, dtype=dtype if dtype is not None and v.is_floating_point() else None))
                       for k, v in state.items())
        load_into(model.as_tensor_module(), tensors, source=str(weights if weights.exists() else directory))
        if has_lora(model.llm):
            restore_token_originals(model.llm.model)
        model.to(target)  # the buffers made at init (parameters are there already)
        model.eval()
        return model


def _index_in_image(image_token_mask: torch.Tensor, tokens_per_image: int) -> torch.Tensor:
    """For every image token, its index within its image (0 .. tokens_per_image - 1; images side by side are told
    apart by the count); -1 elsewhere."""
    count = image_token_mask.long().cumsum(-1)
    before_run = torch.where(image_token_mask, torch.zeros_like(count), count).cummax(-1).values
    index = (count - before_run - 1) % max(1, tokens_per_image)
    return torch.where(image_token_mask, index, torch.full_like(index, -1))


def _without_shared(state: dict) -> dict:
    """Tied tensors (embeddings = LM head) stored once, as safetensors requires (loading re-ties them)."""
    seen, out = set(), {}
    for key, tensor in state.items():
        pointer = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if pointer not in seen:
            seen.add(pointer)
            out[key] = tensor.contiguous()
    return out


def template_tokens(config: ArchConfig) -> list[str]:
    """Special tokens that the templates of a config's stages need (ChatML's <|im_start|>, <|im_end|>)."""
    names = [config.template] + [stage.template for stage in config.stages if stage.template]
    tokens = [token for name in dict.fromkeys(names) for token in get_template(name).special_tokens]
    return tokens + [placeholder(kind) for kind in config.states.kinds]


def coordinate_token_ids(model) -> list[int]:
    """The token ids of the box format's grid values when the model writes coordinates as whole tokens (the
    rows LoRA stages train besides the adapters), else []."""
    if not getattr(model.config, "coordinate_tokens", False):
        return []

    vocab = model.tokenizer.get_vocab()
    return [vocab[t] for t in coordinate_tokens(model.config.box_format) if t in vocab]


def add_coordinate_tokens(tokenizer, llm: LanguageModel, box_format: str) -> list[int]:
    """Add each grid value of `box_format` as one whole text token (kept when answers are decoded) and grow the
    embeddings. The new rows lie on a smooth curve of the value (sin-cos of the value at 8 frequencies, through
    a fixed random orthonormal map, at the norm of the existing rows around their mean), so neighbouring
    coordinates start out similar and the LM head can read a position off a direction; tokens the tokenizer
    already has (Qwen-VL's single digits) keep their rows."""
    tokens = coordinate_tokens(box_format)
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if not missing:
        return []
    before = len(tokenizer)
    tokenizer.add_tokens(missing)
    model = llm.model
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    vocab = tokenizer.get_vocab()
    new_ids = [vocab[t] for t in missing]
    values = torch.tensor([tokens.index(t) for t in missing], dtype=torch.float64) / max(1, len(tokens) - 1)
    tables = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not tables[0]:
        tables.append(output.weight)
    with torch.no_grad():
        for weight in tables:
            old = weight[:before].double()
            dim = weight.shape[1]
            freqs = torch.arange(1, min(8, max(1, dim // 4)) + 1, dtype=torch.float64)
            angles = torch.pi * values[:, None] * freqs[None]
            code = torch.cat([angles.cos(), angles.sin()], dim=1)  # (new, 2F), each row of norm sqrt(F)
            generator = torch.Generator().manual_seed(0)
            basis = torch.linalg.qr(torch.randn(dim, code.shape[1], generator=generator, dtype=torch.float64))[0]
            mean = old.mean(0)
            norm = (old - mean).norm(dim=1).mean()
            rows = mean + code @ basis.T * (norm / freqs.numel() ** 0.5)
            weight[new_ids] = rows.to(weight.dtype)
    return new_ids


def load_tokenizer(path, trust_remote_code: bool = False):
    """The LLM's own tokenizer class (AutoTokenizer), fast where one exists (character offsets for the mask)."""
    from transformers import AutoTokenizer  # start-up: transformers, 0.76 s

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def prepare_tokenizer(tokenizer, llm: LanguageModel, extra_tokens: list[str] = ()):
    """Make sure the tokenizer has an image placeholder, the templates' special tokens and a pad token; grow
    the embeddings if needed."""
    missing = [t for t in dict.fromkeys([IMAGE_TOKEN, *extra_tokens]) if token_id(tokenizer, t) is None]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if llm is not None and len(tokenizer) > llm.model.get_input_embeddings().num_embeddings:
        llm.model.resize_token_embeddings(len(tokenizer))
    return tokenizer
