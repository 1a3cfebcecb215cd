"""Reading image files into uint8 arrays: from folders or straight out of zip archives."""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["IMAGE_EXTENSIONS", "ZipMember", "ImageRef", "decode_images", "image_mode"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass(frozen=True)
class ZipMember:
    """One file inside a zip archive: ``archive`` path and the ``member`` name within it."""

    archive: Path
    member: str

    @property
    def name(self) -> str:
        return self.member.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return f"{self.archive}:{self.member}"


#: An image file on disk or inside a zip archive.
ImageRef = Path | ZipMember


def _decode_bytes(
    data: bytes | Path, where: ImageRef, size: tuple[int, int] | None, mode: str
) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            image.load()  # decode now, so a truncated file fails here, naming the file
            image = image.convert(mode)
            if size is not None and image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot decode image {where}: {error}") from error
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def _read_zip_members(refs: Sequence[ImageRef]) -> dict[ZipMember, bytes]:
    """The bytes of every zip member among ``refs``, each archive opened once."""
    by_archive: dict[Path, list[ZipMember]] = {}
    for ref in refs:
        if isinstance(ref, ZipMember):
            by_archive.setdefault(ref.archive, []).append(ref)
    data = {}
    for archive, members in by_archive.items():
        try:
            with zipfile.ZipFile(archive) as handle:
                for ref in members:
                    data[ref] = handle.read(ref.member)
        except (zipfile.BadZipFile, KeyError, OSError) as error:
            raise ValueError(f"cannot read zip archive {archive}: {error}") from error
    return data


def decode_images(
    paths: Sequence[ImageRef], size: tuple[int, int] | None, mode: str = "RGB"
) -> np.ndarray:
    """Decode image files (threads: Pillow releases the GIL) into uint8 ``(N, H, W, C)``.

    ``paths`` are files on disk or :class:`ZipMember` s; ``size`` = (H, W) resizes
    (bilinear). Without ``size`` every image must have the size of the first; otherwise the
    first one that differs is named in a ``ValueError``.
    """
    if not paths:
        raise ValueError("no image files to decode")
    for ref in paths:
        if not isinstance(ref, ZipMember) and not Path(ref).is_file():
            raise FileNotFoundError(f"image file not found: {ref}")
    zipped = _read_zip_members(paths)
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        decoded = list(
            pool.map(
                lambda ref: _decode_bytes(
                    zipped[ref] if isinstance(ref, ZipMember) else Path(ref), ref, size, mode
                ),
                paths,
            )
        )
    first = decoded[0].shape
    for path, pixels in zip(paths, decoded):
        if pixels.shape != first:
            raise ValueError(
                f"image {path} is {pixels.shape[1]}x{pixels.shape[0]}, but {paths[0]} is "
                f"{first[1]}x{first[0]}: pass image_size= to resize them all"
            )
    return np.stack(decoded)


def image_mode(paths: Sequence[ImageRef]) -> str:
    """``"L"`` when every image is grayscale (Pillow modes 1, L, LA, I, I;16, F, or P with a
    gray palette), else ``"RGB"``. Reads headers (and palettes) only, not pixels."""
    zipped = _read_zip_members(paths)
    for ref in paths:
        source = io.BytesIO(zipped[ref]) if isinstance(ref, ZipMember) else Path(ref)
        try:
            with Image.open(source) as image:
                if image.mode in ("1", "L", "LA", "I", "I;16", "F"):
                    continue
                if image.mode == "P":
                    palette = np.asarray(image.convert("RGB"))
                    if (palette[..., 0] == palette[..., 1]).all() and (
                        palette[..., 1] == palette[..., 2]
                    ).all():
                        continue
                return "RGB"
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"cannot read image {ref}: {error}") from error
    return "L"
