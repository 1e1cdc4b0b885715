"""Vision encoders: any `transformers` vision tower behind one interface.

`VisionEncoder(pixel_values) -> (num_images, num_tokens, hidden)` returns the features of one chosen
hidden state (`feature_layer`, default the penultimate) or of several concatenated along the hidden
dimension (a list of layers, as transformers' LLaVA allows), with or without the CLS token. ViT-style towers
(CLIP, SigLIP) give (B, N, D) hidden states; convolutional towers (ConvNeXt, ResNet) give (B, C, H, W) maps,
which are flattened to H*W tokens. Later encoders (EVA, a Q-Former's input) implement the same interface.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from vlmkit.config import VisionConfig
from vlmkit.errors import ConfigError

# dual-encoder checkpoints whose image half loads on its own (as LLaVA loads CLIPVisionModel from CLIP)
_VISION_HALF = {"clip": ("CLIPVisionModel", "vision_config"), "siglip": ("SiglipVisionModel", "vision_config"),
                "blip-2": ("Blip2VisionModel", "vision_config")}  # blip-2: the ViT of a whole BLIP-2 checkpoint
# vision towers that AutoModel does not map from their own config: the class to build them with
_DIRECT = {"blip_2_vision_model": "Blip2VisionModel"}
_HAS_CLS = ("clip_vision_model", "vit", "dinov2", "blip_2_vision_model")


def load_vision_tower(path: str | None, hf_config: dict | None = None, **kwargs) -> nn.Module:
    """A `transformers` vision tower from a directory/hub id, or (untrained) from a saved config dict."""
    import transformers  # start-up: transformers, 0.76 s
    from transformers import AutoConfig, AutoModel  # start-up: transformers, 0.76 s

    if hf_config is not None:
        config = AutoConfig.for_model(**hf_config)
        if config.model_type in _DIRECT:
            return getattr(transformers, _DIRECT[config.model_type])(config)
        return AutoModel.from_config(config)
    config = AutoConfig.from_pretrained(path)
    if config.model_type == "blip-2":  # a whole BLIP-2 checkpoint: its ViT (MiniGPT-4 and VisualGLM read it so)
        return _blip2_vision_half(path, config, **kwargs)
    if config.model_type in _DIRECT:
        return getattr(transformers, _DIRECT[config.model_type]).from_pretrained(path, **kwargs)
    if config.model_type in _VISION_HALF:
        class_name, _ = _VISION_HALF[config.model_type]
        return getattr(transformers, class_name).from_pretrained(path, **kwargs)
    model = AutoModel.from_pretrained(path, **kwargs)
    if hasattr(model, "vision_model") and hasattr(model, "text_model"):
        raise ConfigError(f"{path}: a {config.model_type} dual encoder; vlmkit knows how to take the vision half of "
                          f"{sorted(_VISION_HALF)} only")
    return model


def _blip2_vision_half(path: str, config, dtype=None, device_map=None, **_):
    """`Blip2VisionModel` with the `vision_model.*` weights of a Blip2ForConditionalGeneration checkpoint (a directory
    or hub id; safetensors only)."""
    from transformers import Blip2VisionModel  # start-up: transformers, 0.76 s

    directory = Path(path)
    if not directory.exists():
        from huggingface_hub import snapshot_download  # start-up: huggingface_hub's downloads

        directory = Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors"]))
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{path}: no .safetensors weights for its vision model (vlmkit reads safetensors)")
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key.startswith("vision_model."):
                    state[key[len("vision_model."):]] = handle.get_tensor(key)
    tower = Blip2VisionModel(config.vision_config)
    missing, unexpected = tower.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{path}: its vision_model weights do not fit Blip2VisionModel (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    tower.to(dtype=dtype if dtype is not None else torch.float32)
    if device_map is not None and not isinstance(device_map, (str, dict)):
        tower.to(device_map)
    return tower.eval()


SELECTIONS = ("patch", "cls_patch", "patch_mean")


class VisionEncoder(nn.Module):
    def __init__(self, tower: nn.Module, config: VisionConfig, image_size: int | None = None):
        super().__init__()
        self.tower = tower
        self.config = config
        self._image_size = image_size  # the preprocessor's crop size; towers without a fixed size need it
        hf = tower.config
        self.has_cls = hf.model_type in _HAS_CLS
        if config.final_norm and self.final_norm is None:
            raise ConfigError(f"vision.final_norm is set but the {hf.model_type} tower has no post_layernorm")
        if config.select not in SELECTIONS:
            raise ConfigError(f"vision.select must be one of {', '.join(map(repr, SELECTIONS))}, not {config.select!r}")
        if config.select == "cls_patch" and not self.has_cls:
            raise ConfigError(f"{hf.model_type} has no CLS token; use vision.select='patch'")
        self.num_tokens, self.hidden_size = self._probe()

    @property
    def image_size(self) -> int:
        return self._image_size or getattr(self.tower.config, "image_size", 224)

    @property
    def interpolates(self) -> bool:
        """A ViT run at another size than it was trained at: its position embeddings are interpolated."""
        hf = self.tower.config
        return hasattr(hf, "patch_size") and self._image_size is not None and self._image_size != hf.image_size

    def set_image_size(self, size: int) -> None:
        patch = getattr(self.tower.config, "patch_size", None)
        if patch and size % patch:
            raise ConfigError(f"image_size {size} is not a multiple of the vision tower's patch size {patch}")
        self._image_size = size
        self.num_tokens, self.hidden_size = self._probe()

    @property
    def final_norm(self) -> nn.Module | None:
        """The tower's last LayerNorm (`post_layernorm`, on the tower or its `vision_model`), if it has one."""
        for owner in (self.tower, getattr(self.tower, "vision_model", None)):
            norm = getattr(owner, "post_layernorm", None)
            if isinstance(norm, nn.Module):
                return norm
        return None

    @property
    def feature_layers(self) -> list[int]:
        layer = self.config.feature_layer
        return list(layer) if isinstance(layer, (list, tuple)) else [layer]

    def _probe(self) -> tuple[int, int]:
        hf = self.tower.config
        if hasattr(hf, "patch_size") and hasattr(hf, "image_size") and hasattr(hf, "hidden_size"):
            side = (self._image_size or hf.image_size) // hf.patch_size
            extra = (self.has_cls and self.config.select == "cls_patch") + (self.config.select == "patch_mean")
            return (side * side + extra,
                    hf.hidden_size * len(self.feature_layers))
        channels = getattr(hf, "num_channels", 3)
        if any(p.is_meta for p in self.tower.parameters()):  # built empty, to be loaded: measure shapes on meta
            probe = VisionEncoder.__new__(VisionEncoder)
            nn.Module.__init__(probe)
            probe.tower, probe.config, probe._image_size, probe.has_cls = (copy.deepcopy(self.tower).to("meta"),
                                                                            self.config, self._image_size, self.has_cls)
            features = probe.forward(torch.zeros(1, channels, self.image_size, self.image_size, device="meta"))
            return features.shape[1], features.shape[2]
        with torch.no_grad():  # convolutional towers: measure once on a blank image
            features = self.forward(torch.zeros(1, channels, self.image_size, self.image_size))
        return features.shape[1], features.shape[2]

    def _encoder(self) -> nn.Module | None:
        """The block stack of a ViT tower (CLIP/SigLIP: `encoder.layers`, or `vision_model.encoder.layers` in
        older transformers), if it has one."""
        for owner in (self.tower, getattr(self.tower, "vision_model", None)):
            encoder = getattr(owner, "encoder", None)
            if isinstance(getattr(encoder, "layers", None), nn.ModuleList):
                return encoder
        return None

    def _blocks_needed(self, blocks: int) -> int | None:
        """How many of a tower's `blocks` the selected hidden states need (at least one, so the tower still reports
        its hidden states); None when a feature layer is out of range. Hidden states: the embeddings, then one per
        block."""
        count = blocks + 1
        if any(not -count <= layer < count for layer in self.feature_layers):
            return None
        return max(1, *(layer % count for layer in self.feature_layers))

    def unused_modules(self) -> list[nn.Module]:
        """Parts of the tower that the selected features never depend on: blocks (a ViT's layers, a conv tower's
        stages) after the deepest selected hidden state, and the modules that only the tower's own pooled output
        or last hidden state goes through (`post_layernorm` unless `final_norm`, ConvNeXt's `layernorm`, SigLIP's
        pooling `head`). No gradient ever reaches them, so a stage that trains the tower freezes them: an
        optimizer holds no state for them, and a sharded checkpoint without that state could not be resumed."""
        unused = []
        count = None
        for owner in (self.tower, getattr(self.tower, "vision_model", None)):
            if owner is None:
                continue
            encoder = getattr(owner, "encoder", None)
            blocks = getattr(encoder, "layers", None)
            if not isinstance(blocks, nn.ModuleList):
                blocks = getattr(encoder, "stages", None)
            if isinstance(blocks, nn.ModuleList) and count is None:
                count = len(blocks)
                needed = self._blocks_needed(count)
                if needed is not None:
                    unused += list(blocks)[needed:]
            for name in ("post_layernorm", "layernorm", "head"):
                module = getattr(owner, name, None)
                if isinstance(module, nn.Module) and not (name == "post_layernorm" and self.config.final_norm):
                    unused.append(module)
        return [m for m in unused if any(True for _ in m.parameters())]

    @contextlib.contextmanager
    def _only_needed_layers(self):
        """Run the blocks up to the deepest selected hidden state and no further: with the penultimate layer
        (LLaVA's default) the last block's output is never used, so computing it is wasted work. Yields the
        absolute hidden-state indices to read. The tower's modules are restored afterwards."""
        encoder = self._encoder()
        if encoder is None:
            yield self.feature_layers
            return
        layers = encoder.layers
        needed = self._blocks_needed(len(layers))
        if needed is None:
            yield self.feature_layers  # out of range: the lookup below names the problem
            return
        wanted = [layer % (len(layers) + 1) for layer in self.feature_layers]
        try:  # transformers >= 5 hooks every block on the first forward: hook all of them, not just the ones run
            from transformers.utils.output_capturing import (  # start-up: transformers, 0.76 s
                maybe_install_capturing_hooks,
            )

            maybe_install_capturing_hooks(self.tower)
        except ImportError:
            pass
        encoder.layers = nn.ModuleList(list(layers)[:needed])
        try:
            yield wanted
        finally:
            encoder.layers = layers

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        param = next(self.tower.parameters())
        with self._only_needed_layers() as feature_layers:
            extra = {"interpolate_pos_encoding": True} if self.interpolates else {}
            outputs = self.tower(pixel_values=pixel_values.to(device=param.device, dtype=param.dtype),
                                 output_hidden_states=True, **extra)
        hidden_states = outputs.hidden_states
        selected = []
        for layer in feature_layers:
            if not -len(hidden_states) <= layer < len(hidden_states):
                raise ConfigError(f"vision.feature_layer={self.config.feature_layer} but the tower has "
                                  f"{len(hidden_states)} hidden states")
            features = hidden_states[layer]
            if self.config.final_norm:
                features = self.final_norm(features)
            if features.dim() == 4:  # (B, C, H, W) -> (B, H*W, C)
                features = features.flatten(2).transpose(1, 2)
            elif self.has_cls and self.config.select in ("patch", "patch_mean"):
                features = features[:, 1:]
            if self.config.select == "patch_mean":  # one more token: the mean of the patch tokens, last
                features = torch.cat([features, features.mean(dim=1, keepdim=True)], dim=1)
            selected.append(features)
        return selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)
