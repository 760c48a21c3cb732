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


def save_image_folder(folder: str | Path, images: Tensor, captions: list[str]) -> Path:
    """Write ``images`` (n, c, h, w) in [-1, 1] as ``folder/00000.png``... with ``captions.jsonl``, the layout
    ``load_images`` reads: into a temporary folder beside it, renamed at the end (an existing folder is
    replaced only then). Raises ValueError when captions and images differ in number."""
    import shutil
    import tempfile

    from PIL import Image

    if images.shape[0] != len(captions):
        raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
    target = Path(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
        rows = []
        for i, (x, text) in enumerate(zip(pixels, captions)):
            name = f"{i:05d}.png"
            Image.fromarray(x[..., 0].numpy() if x.shape[-1] == 1 else x.numpy()).save(tmp / name)
            rows.append(json.dumps({"file": name, "text": text}))
        (tmp / CAPTIONS_FILE).write_text("\n".join(rows) + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
