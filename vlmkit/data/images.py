"""Image loading and preprocessing with PIL and NumPy, following the vision tower's own config.

`ImageTransform.from_pretrained(dir)` reads the tower's `preprocessor_config.json` (size, crop, mean, std,
resample) so a hub checkpoint and a project-built one are treated alike. Decoding has a pixel limit, so a
file whose header claims a huge size is refused before it is decoded.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vlmkit.errors import BadRecord

MAX_IMAGE_PIXELS = 64_000_000
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_RESAMPLE = {0: Image.NEAREST, 1: Image.LANCZOS, 2: Image.BILINEAR, 3: Image.BICUBIC, 4: Image.BOX, 5: Image.HAMMING}


def load_image(path: str | os.PathLike, record_id="?", max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image as RGB, or raise BadRecord naming the record and what is wrong with the file."""
    path = Path(path)
    if not path.exists():
        raise BadRecord(record_id, f"image file not found: {path}", kind="missing_image")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise BadRecord(record_id, f"image {path} declares {width}x{height} pixels, more than the limit "
                                           f"of {max_pixels}", kind="image_too_large")
            image.load()
            return image.convert("RGB")
    except BadRecord:
        raise
    except Image.DecompressionBombError as exc:
        raise BadRecord(record_id, f"image {path} is too large to decode safely: {exc}", kind="image_too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadRecord(record_id, f"cannot decode image {path}: {exc}", kind="corrupt_image") from None


@dataclass
class ImageTransform:
    """Resize (shortest edge) -> centre crop -> scale -> normalise, as CLIPImageProcessor does."""
    size: int = 224
    crop: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    resample: int = 3
    pad_to_square: bool = False
    rescale_factor: float = 1 / 255
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, pad_to_square: bool = False) -> "ImageTransform":
        config_file = Path(path) / "preprocessor_config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"{path} has no preprocessor_config.json; the vision tower's image size, "
                                    "mean and std must be known")
        return cls.from_config(json.loads(config_file.read_text()), pad_to_square=pad_to_square)

    @classmethod
    def from_config(cls, config: dict, pad_to_square: bool = False) -> "ImageTransform":
        size = config.get("size", 224)
        if isinstance(size, dict):
            size = size.get("shortest_edge") or size.get("height")
        crop = config.get("crop_size", size) if config.get("do_center_crop", True) else size
        if isinstance(crop, dict):
            crop = (crop["height"], crop["width"])
        elif isinstance(crop, int):
            crop = (crop, crop)
        if not config.get("do_center_crop", True) and isinstance(config.get("size"), dict) \
                and "height" in config["size"]:
            crop = (config["size"]["height"], config["size"]["width"])
        return cls(size=int(size), crop=tuple(crop), mean=tuple(config.get("image_mean", CLIP_MEAN)),
                   std=tuple(config.get("image_std", CLIP_STD)), resample=int(config.get("resample", 3)),
                   rescale_factor=float(config.get("rescale_factor", 1 / 255)), pad_to_square=pad_to_square)

    def to_config(self) -> dict:
        """The CLIPImageProcessor fields that describe this transform."""
        return {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
                "size": {"shortest_edge": self.size}, "do_center_crop": True,
                "crop_size": {"height": self.crop[0], "width": self.crop[1]}, "do_rescale": True,
                "rescale_factor": self.rescale_factor, "do_normalize": True, "image_mean": list(self.mean),
                "image_std": list(self.std), "resample": self.resample, "do_convert_rgb": True}

    def save(self, directory) -> None:
        (Path(directory) / "preprocessor_config.json").write_text(json.dumps(self.to_config(), indent=2))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.pad_to_square:
            image = expand_to_square(image, tuple(int(m * 255) for m in self.mean))
        width, height = image.size
        scale = self.size / min(width, height)
        new_size = (max(self.crop[1], round(width * scale)), max(self.crop[0], round(height * scale)))
        if new_size != image.size:
            image = image.resize(new_size, _RESAMPLE.get(self.resample, Image.BICUBIC))
        left = (image.width - self.crop[1]) // 2
        top = (image.height - self.crop[0]) // 2
        if (left, top) != (0, 0) or image.size != (self.crop[1], self.crop[0]):
            image = image.crop((left, top, left + self.crop[1], top + self.crop[0]))
        array = np.asarray(image, dtype=np.float32) * self.rescale_factor
        array = (array - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(array.transpose(2, 0, 1).copy())


def expand_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas
