"""Finding Omniglot's files as users hold them: the official zips or their unpacked folders.

The official archives (brendenlake/omniglot, ``python/``) are ``images_background.zip``,
``images_evaluation.zip``, ``images_background_small1.zip``, ``images_background_small2.zip``
(each ``<part>/<alphabet>/<character>/*.png``) and ``all_runs.zip`` (``runNN/...``). A source
is a folder holding any of them, zipped or unpacked, or one such zip itself.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

from episodes.datasets.images import ImageRef, ZipMember

__all__ = ["OmniglotPart", "find_part", "Character"]

#: A character: ``("alphabet/character", image files in name order)``.
Character = tuple[str, list[ImageRef]]


@dataclass(frozen=True)
class OmniglotPart:
    """One top-level part (``images_background``, ...): a folder, or a zip holding it."""

    name: str
    folder: Path | None = None
    archive: Path | None = None

    def __str__(self) -> str:
        return str(self.folder if self.folder is not None else self.archive)

    def characters(self) -> list[Character]:
        """Every character of the part, sorted by alphabet then character name."""
        if self.folder is not None:
            return self._folder_characters(self.folder)
        return self._zip_characters()

    @staticmethod
    def _folder_characters(root: Path) -> list[Character]:
        characters: list[Character] = []
        for alphabet in sorted(p for p in root.iterdir() if p.is_dir()):
            for character in sorted(p for p in alphabet.iterdir() if p.is_dir()):
                files = sorted(p for p in character.iterdir() if p.suffix.lower() == ".png")
                if not files:
                    raise FileNotFoundError(f"Omniglot character folder {character} holds no .png")
                characters.append((f"{alphabet.name}/{character.name}", list(files)))
        return characters

    def _zip_characters(self) -> list[Character]:
        try:
            with zipfile.ZipFile(self.archive) as handle:
                members = handle.namelist()
        except (zipfile.BadZipFile, OSError) as error:
            raise ValueError(f"cannot read zip archive {self.archive}: {error}") from error
        grouped: dict[str, list[str]] = {}
        for member in members:
            parts = member.split("/")
            if len(parts) == 4 and parts[0] == self.name and parts[3].lower().endswith(".png"):
                grouped.setdefault(f"{parts[1]}/{parts[2]}", []).append(member)
        if not grouped:
            raise ValueError(
                f"{self.archive}: no {self.name}/<alphabet>/<character>/*.png members (is it "
                "an official Omniglot archive?)"
            )
        return [
            (name, [ZipMember(self.archive, m) for m in sorted(grouped[name])])
            for name in sorted(grouped)
        ]


def find_part(source: Path, name: str) -> OmniglotPart | None:
    """Part ``name`` in ``source``: the folder ``source/name``, the zip ``source/name.zip``, or
    ``source`` itself when it is that zip; None when absent."""
    if source.is_file():
        return OmniglotPart(name, archive=source) if source.name == f"{name}.zip" else None
    if (source / name).is_dir():
        return OmniglotPart(name, folder=source / name)
    if (source / f"{name}.zip").is_file():
        return OmniglotPart(name, archive=source / f"{name}.zip")
    return None
