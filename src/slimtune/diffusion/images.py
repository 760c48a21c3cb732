"""A folder of images with captions (``data.format: images``): read, checked, as tensors.

Captions come from ``captions.jsonl`` in the folder (one ``{"file": "a.png", "text": "..."}`` per line) or,
without it, from a sidecar ``a.txt`` beside each ``a.png``. Images are fitted to ``size`` x ``size`` (scaled so
the shorter side fits, then centre-cropped, as diffusers' training scripts' Resize + CenterCrop) and scaled to
[-1, 1]. Every problem is an ``ImageDataError`` naming the file (and line) and what is wrong; only image files,
JSON lines and text are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTIONS_FILE = "captions.jsonl"
MODES = {1: "L", 3: "RGB"}


class ImageDataError(ValueError):
    """An image folder, caption file or image that cannot be used, named."""


@dataclass(frozen=True)
class ImageSet:
    """images: (n, channels, size, size) float32 in [-1, 1]; captions and file names in the same order."""

    images: Tensor
    captions: tuple[str, ...]
    files: tuple[str, ...]


def load_images(folder: str | Path, size: int, channels: int = 3) -> ImageSet:
    """Read every image in ``folder`` (sorted by name) with its caption. Raises ImageDataError."""
    root = Path(folder)
    if not root.is_dir():
        raise ImageDataError(f"data.path={str(root)!r}: not a folder")
    if channels not in MODES:
        raise ImageDataError(f"channels={channels!r}: must be 1 (grey) or 3 (RGB)")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ImageDataError(f"{root}: holds no images ({', '.join(IMAGE_SUFFIXES)})")
    captions = _jsonl_captions(root / CAPTIONS_FILE, files) if (root / CAPTIONS_FILE).is_file() else _sidecars(files)
    images = torch.stack([_read(p, size, MODES[channels]) for p in files])
    return ImageSet(images, tuple(captions[p.name] for p in files), tuple(p.name for p in files))


def _jsonl_captions(path: Path, files: list[Path]) -> dict[str, str]:
    out: dict[str, str] = {}
    names = {p.name for p in files}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ImageDataError(f"{path}:{i}: not valid JSON: {e}") from None
        if not isinstance(row, dict) or not isinstance(row.get("file"), str) or not isinstance(row.get("text"), str):
            raise ImageDataError(f"{path}:{i}: each line must be an object with string fields 'file' and 'text'")
        if row["file"] not in names:
            raise ImageDataError(f"{path}:{i}: file={row['file']!r} is not an image in {path.parent}")
        out[row["file"]] = row["text"]
    missing = sorted(names - set(out))
    if missing:
        raise ImageDataError(f"{path}: no caption for {len(missing)} images (e.g. {missing[0]!r})")
    return out


def _sidecars(files: list[Path]) -> dict[str, str]:
    out = {}
    for p in files:
        txt = p.with_suffix(".txt")
        if not txt.is_file():
            raise ImageDataError(f"{p}: no caption: want {txt.name} beside it, or a {CAPTIONS_FILE} in the folder")
        out[p.name] = txt.read_text(encoding="utf-8").strip()
    return out


def _read(path: Path, size: int, mode: str) -> Tensor:
    """One image as (channels, size, size) in [-1, 1]."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            fitted = ImageOps.fit(img.convert(mode), (size, size), Image.Resampling.BICUBIC)
    except (UnidentifiedImageError, OSError) as e:
        raise ImageDataError(f"{path}: not a readable image: {e}") from None
    x = torch.frombuffer(bytearray(fitted.tobytes()), dtype=torch.uint8).view(size, size, len(mode))
    return x.permute(2, 0, 1).float() / 127.5 - 1.0
