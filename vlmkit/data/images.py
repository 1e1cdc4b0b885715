"""Image loading and preprocessing with PIL and NumPy, following the vision tower's own config.

`ImageTransform.from_pretrained(dir)` reads the tower's `preprocessor_config.json` (size, crop, mean, std,
resample) so a hub checkpoint and a project-built one are treated alike. Decoding has a pixel limit, so a
file whose header claims a huge size is refused before it is decoded.
"""
from __future__ import annotations

import io
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vlmkit.errors import BadRecord, ConfigError
from vlmkit.io import loading

MAX_IMAGE_PIXELS = 40_000_000  # 6,300 x 6,300; decoded as RGB (4 bytes a pixel in PIL) that is 160 MB
MAX_IMAGE_SIDE = 16_384
MAX_IMAGE_ASPECT = 50.0
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_RESAMPLE = {0: Image.NEAREST, 1: Image.LANCZOS, 2: Image.BILINEAR, 3: Image.BICUBIC, 4: Image.BOX, 5: Image.HAMMING}


@dataclass(frozen=True)
class ImageLimits:
    """How large an image may be, judged on its header before any pixel is decoded: its pixels, each side, its
    aspect ratio, and the pixels of every image the transform makes of it (the padded square, the resized image).
    A 1 x 40000 PNG is 238 bytes with 40,000 pixels; padded to a square it would be 1.6 billion."""
    max_pixels: int = MAX_IMAGE_PIXELS      # --max-image-pixels: decoded, padded or resized
    max_side: int = MAX_IMAGE_SIDE          # --max-image-side
    max_aspect: float = MAX_IMAGE_ASPECT    # --max-image-aspect: long side / short side

    def check(self, width: int, height: int, label: str, record_id, transform: ImageTransform | None = None) -> None:
        """Raise BadRecord (kind image_too_large) naming the limit and its flag, or return."""
        def refuse(what: str, limit: str, flag: str) -> BadRecord:
            return BadRecord(record_id, f"{label} {what}, more than the limit of {limit} ({flag} raises it)",
                             kind="image_too_large")

        if width < 1 or height < 1:
            raise BadRecord(record_id, f"{label} declares {width}x{height} pixels", kind="corrupt_image")
        if width * height > self.max_pixels:
            raise refuse(f"declares {width}x{height} pixels", f"{self.max_pixels:,}", "--max-image-pixels")
        if max(width, height) > self.max_side:
            raise refuse(f"declares {width}x{height} pixels: a side of {max(width, height):,}", f"{self.max_side:,}",
                         "--max-image-side")
        aspect = max(width, height) / min(width, height)
        if aspect > self.max_aspect:
            raise refuse(f"is {width}x{height} pixels: an aspect ratio of {aspect:,.1f}", f"{self.max_aspect:g}",
                         "--max-image-aspect")
        for step, (w, h) in (transform.working_sizes(width, height) if transform is not None else []):
            if w * h > self.max_pixels:
                raise refuse(f"({width}x{height}) would be {w}x{h} pixels once {step}", f"{self.max_pixels:,}",
                             "--max-image-pixels")


def _limits(limits: ImageLimits | None, transform) -> ImageLimits:
    if limits is not None:
        return limits
    return getattr(transform, "limits", None) or ImageLimits()


def _regular_file(path: Path, record_id) -> None:
    """A FIFO, a device or a directory named as an image would hang or fail the reader: refuse it by name."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise BadRecord(record_id, f"image file not found: {path}", kind="missing_image") from None
    except OSError as exc:
        raise BadRecord(record_id, f"cannot read image {path}: {exc.strerror}", kind="missing_image") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else \
            "not a regular file"
        raise BadRecord(record_id, f"image {path} is {kind}, not a regular file", kind="not_a_file")


def load_image(path: str | os.PathLike, record_id="?", limits: ImageLimits | None = None,
               transform: ImageTransform | None = None) -> Image.Image:
    """Open an image as RGB, or raise BadRecord naming the record and what is wrong with the file. `limits`
    default to the transform's (each transform carries the limits of the command that made it)."""
    path = Path(path)
    _regular_file(path, record_id)
    return _decode(path, f"image {path}", record_id, _limits(limits, transform), transform)


def check_image(path: str | os.PathLike, record_id="?", limits: ImageLimits | None = None,
                transform: ImageTransform | None = None) -> tuple[int, int]:
    """Read only an image's header (format, size): the file exists, is a regular file, is an image and is within
    the limits. Decoding waits until a batch needs the pixels."""
    path = Path(path)
    _regular_file(path, record_id)
    limits = _limits(limits, transform)
    label = f"image {path}"
    try:
        with _opened(path, label, record_id, limits) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadRecord(record_id, f"cannot decode {label}: {exc}", kind="corrupt_image") from None
    limits.check(width, height, label, record_id, transform)
    return width, height


def _opened(source, label: str, record_id, limits: ImageLimits) -> Image.Image:
    try:
        return Image.open(source)
    except Image.DecompressionBombError as exc:  # PIL refuses in open() itself, before our check can run
        raise _bomb(exc, label, record_id, limits.max_pixels) from None


def _bomb(exc, label: str, record_id, max_pixels: int) -> BadRecord:
    declared = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(declared.group(1)):,} pixels" if declared else "too many pixels"
    return BadRecord(record_id, f"{label} declares {size}, more than the limit of {max_pixels:,} "
                                "(a decompression bomb; --max-image-pixels raises the limit); it was not decoded",
                     kind="image_too_large")


def decode_image(data: bytes, label: str = "image", record_id="?", limits: ImageLimits | None = None,
                 transform: ImageTransform | None = None) -> Image.Image:
    """Decode image bytes (an upload, a data: URI) as RGB under the same limits as files."""
    if not data:
        raise BadRecord(record_id, f"{label} is empty (0 bytes)", kind="corrupt_image")
    return _decode(io.BytesIO(data), label, record_id, _limits(limits, transform), transform)


def _decode(source, label: str, record_id, limits: ImageLimits, transform) -> Image.Image:
    try:
        with _opened(source, label, record_id, limits) as image:
            limits.check(*image.size, label, record_id, transform)
            image.load()
            return image if image.mode == "RGB" else image.convert("RGB")
    except BadRecord:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadRecord(record_id, f"cannot decode {label}: {exc}", kind="corrupt_image") from None


# image processors whose fields ImageTransform reproduces (the fast/PIL variants share the fields)
_KNOWN_PROCESSORS = ("CLIPImageProcessor", "SiglipImageProcessor", "LlavaImageProcessor", "ViTImageProcessor",
                     "ConvNextImageProcessor", "BlipImageProcessor")


@dataclass
class ImageTransform:
    """Resize -> centre crop -> scale -> normalise, as CLIPImageProcessor does.

    `size` is the shortest edge after resizing, or with `resize_exact` the image is resized to `crop`
    ignoring its aspect ratio (SigLIP's processors, and any processor whose size is height x width).
    """
    size: int = 224
    crop: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    resample: int = 3
    pad_to_square: bool = False
    rescale_factor: float = 1 / 255
    resize_exact: bool = False
    normalize: bool = True
    limits: ImageLimits = field(default_factory=ImageLimits, compare=False, repr=False)  # not a pixel setting

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, pad_to_square: bool | None = None) -> ImageTransform:
        """Read `preprocessor_config.json`, or the `image_processor` entry of a processor's `processor_config.json`."""
        if not Path(path).is_dir():  # a hub id: the file from the Hugging Face cache (downloaded if online)
            from transformers.utils import cached_file  # start-up: transformers, 0.76 s

            with loading("--vision.name-or-path", str(path)):
                found = cached_file(str(path), "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
                found = found or cached_file(str(path), "processor_config.json")
            path = Path(found).parent
        path = Path(path)
        config_file = path / "preprocessor_config.json"
        if config_file.exists():
            config = json.loads(config_file.read_text())
        elif (path / "processor_config.json").exists() and \
                "image_processor" in json.loads((path / "processor_config.json").read_text()):
            config = json.loads((path / "processor_config.json").read_text())["image_processor"]
        else:
            raise FileNotFoundError(f"{path} has no preprocessor_config.json; the vision tower's image size, "
                                    "mean and std must be known")
        return cls.from_config(config, pad_to_square=pad_to_square, source=str(config_file))

    @classmethod
    def from_config(cls, config: dict, pad_to_square: bool | None = None, source: str = "image processor config"
                    ) -> ImageTransform:
        """Honour every field of a transformers image processor config that changes the pixels, or refuse."""
        kind = config.get("image_processor_type", "CLIPImageProcessor")
        if kind.removesuffix("Fast").removesuffix("Pil") not in _KNOWN_PROCESSORS:
            raise ConfigError(f"{source}: image processor {kind!r} is not one vlmkit reproduces "
                              f"({', '.join(_KNOWN_PROCESSORS)})")
        for flag in ("do_resize", "do_rescale", "do_convert_rgb"):
            if config.get(flag, True) is False:
                raise ConfigError(f"{source}: {flag}=false is not supported (vlmkit always resizes, rescales and "
                                  "converts to RGB)")
        if pad_to_square is None:
            pad_to_square = bool(config.get("do_pad", False)) and kind.startswith("Llava")
        size = config.get("size", 224)
        resize_exact = False
        if isinstance(size, dict):
            if "shortest_edge" in size:
                size = size["shortest_edge"]
            else:
                resize_exact, size = True, (size["height"], size["width"])
        else:
            resize_exact = kind.startswith(("Siglip", "ViT", "Blip"))  # these resize an int size to a square
            size = size if resize_exact is False else (size, size)
        center_crop = config.get("do_center_crop", not resize_exact)
        if resize_exact:
            if center_crop:
                raise ConfigError(f"{source}: an exact resize followed by a centre crop is not supported")
            crop = tuple(size)
        else:
            crop = config.get("crop_size", size) if center_crop else size
            if not center_crop:
                raise ConfigError(f"{source}: a shortest-edge resize without a centre crop gives images of varying "
                                  "size; vlmkit needs a fixed image size")
            crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
        normalize = config.get("do_normalize", True)
        return cls(size=int(crop[0] if resize_exact else size), crop=tuple(int(c) for c in crop),
                   mean=tuple(config.get("image_mean", CLIP_MEAN)), std=tuple(config.get("image_std", CLIP_STD)),
                   resample=int(config.get("resample", 3)), rescale_factor=float(config.get("rescale_factor", 1 / 255)),
                   pad_to_square=pad_to_square, resize_exact=resize_exact, normalize=bool(normalize))

    def to_config(self) -> dict:
        """The image processor fields that describe this transform (CLIP's, or SigLIP's for an exact resize)."""
        config = {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
                  "size": {"shortest_edge": self.size}, "do_center_crop": True,
                  "crop_size": {"height": self.crop[0], "width": self.crop[1]}, "do_rescale": True,
                  "rescale_factor": self.rescale_factor, "do_normalize": self.normalize, "image_mean": list(self.mean),
                  "image_std": list(self.std), "resample": self.resample, "do_convert_rgb": True}
        if self.resize_exact:
            config.update(image_processor_type="SiglipImageProcessor", do_center_crop=False,
                          size={"height": self.crop[0], "width": self.crop[1]})
            del config["crop_size"]
        return config

    def save(self, directory) -> None:
        (Path(directory) / "preprocessor_config.json").write_text(json.dumps(self.to_config(), indent=2))

    def _resized(self, width: int, height: int) -> tuple[int, int]:
        if self.resize_exact:
            return self.crop[1], self.crop[0]
        # as transformers: the short edge becomes `size`, the long edge int(size * long / short)
        if width <= height:
            return self.size, int(self.size * height / width)
        return int(self.size * width / height), self.size

    def working_sizes(self, width: int, height: int) -> list[tuple[str, tuple[int, int]]]:
        """The (width, height) of each image this transform makes on its way from a width x height image."""
        sizes = []
        if self.pad_to_square and width != height:
            side = max(width, height)
            width = height = side
            sizes.append(("padded to a square", (side, side)))
        sizes.append(("resized", self._resized(width, height)))
        return sizes

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.pad_to_square:
            image = expand_to_square(image, tuple(int(m * 255) for m in self.mean))
        new_size = self._resized(*image.size)
        if new_size != image.size:
            image = image.resize(new_size, _RESAMPLE.get(self.resample, Image.BICUBIC))
        left = (image.width - self.crop[1]) // 2
        top = (image.height - self.crop[0]) // 2
        if (left, top) != (0, 0) or image.size != (self.crop[1], self.crop[0]):
            image = image.crop((left, top, left + self.crop[1], top + self.crop[0]))
        array = np.asarray(image, dtype=np.float32) * self.rescale_factor
        if self.normalize:
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
