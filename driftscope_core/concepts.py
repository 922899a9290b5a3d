"""Built-in concept lists (dataset class names) and the English stop-word list."""

from __future__ import annotations

from pathlib import Path

BUILTIN_LISTS = ("cifar10", "cifar100", "coco80", "imagenet1k")

_DATA_DIR = Path(__file__).parent / "data"


def _read_lines(filename: str) -> list[str]:
    text = (_DATA_DIR / filename).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_concept_list(name: str) -> list[str]:
    """Return the class names of a built-in list, in the dataset's class-index order."""
    if name not in BUILTIN_LISTS:
        raise ValueError(
            f"unknown concept list {name!r}; valid names: {', '.join(BUILTIN_LISTS)}"
        )
    return _read_lines(f"{name}.txt")


def load_stopwords() -> frozenset[str]:
    """Return the lowercase English stop words."""
    return frozenset(_read_lines("stopwords.txt"))
