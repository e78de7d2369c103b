"""Dataset readers: one module per annotation format, all returning ``Region`` objects.

``read_regions`` picks the reader by ``format`` (or detects it), reads every
region and maps nucleus classes through the class map. ``input_files`` lists
the files a read opens, for the prepared-dataset cache digest. Every reader
raises ``DatasetError`` (or ``ConfigError`` for class-map gaps) before
returning anything, so a caller never gets a partly read dataset.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from granularity.data.class_map import ClassMap
from granularity.data.readers import coco, consep, geojson, imagescope, instance_map
from granularity.data.region import Region
from granularity.errors import ConfigError, DatasetError

FORMATS = ("consep", "coco", "imagescope", "geojson", "instance_map")

_READERS: dict[str, ModuleType] = {
    "consep": consep,
    "coco": coco,
    "imagescope": imagescope,
    "geojson": geojson,
    "instance_map": instance_map,
}

_LAYOUTS = {
    "consep": "Images/ and Labels/*.mat, or split folders holding them",
    "coco": "annotations.json (or one *.json) with images/",
    "imagescope": "*.xml beside .tif/.png images",
    "geojson": "*.geojson beside images",
    "instance_map": "images/ and labels/ with <stem>.png + <stem>.csv",
}


def _reader(format: str) -> ModuleType:
    if format not in _READERS:
        raise ConfigError(f"unknown dataset format {format!r}; use --format with one of {', '.join(FORMATS)}")
    return _READERS[format]


def detect_format(path: str | Path) -> str:
    """Return the format whose layout ``path`` has; raise when none or several match."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset {path} not found; pass --dataset pointing to an existing folder or file")

    found = [name for name in FORMATS if _READERS[name].matches(path)]
    if len(found) == 1:
        return found[0]

    if not found:
        if path.is_dir():
            entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
            seen = f"it contains {entries[:8]}{' and more' if len(entries) > 8 else ''}"
        else:
            seen = f"it is a {path.suffix or 'suffix-less'} file"
        layouts = "; ".join(f"{name}: {layout}" for name, layout in _LAYOUTS.items())
        raise DatasetError(
            f"dataset {path} matches no known layout ({seen}); arrange it as one of [{layouts}] "
            f"or pass --format with one of {', '.join(FORMATS)}"
        )
    raise DatasetError(
        f"dataset {path} matches several layouts: {', '.join(found)}; pass --format with one of them"
    )


def read_regions(path: str | Path, format: str | None, class_map: ClassMap) -> list[Region]:
    """Read every region of a dataset, with nucleus classes as project class indices.

    ``format`` is one of ``FORMATS``, or None to detect it from the layout.
    """
    path = Path(path)
    if format is None:
        format = detect_format(path)
    reader = _reader(format)
    if not path.exists():
        raise DatasetError(f"dataset {path} not found; pass --dataset pointing to an existing folder or file")
    regions = reader.read(path, class_map)
    if not regions:
        raise DatasetError(f"dataset {path} contains no regions in the {format} layout; check the folder and --format")
    return regions


def input_files(path: str | Path, format: str | None) -> list[Path]:
    """Return every file ``read_regions`` opens for this dataset, sorted."""
    path = Path(path)
    if format is None:
        format = detect_format(path)
    reader = _reader(format)
    if not path.exists():
        raise DatasetError(f"dataset {path} not found; pass --dataset pointing to an existing folder or file")
    return sorted(reader.input_files(path))


__all__ = ["FORMATS", "detect_format", "read_regions", "input_files"]
