"""Class maps: a dataset's raw class labels mapped onto ordered project classes."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import yaml

from granularity.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NucleusClass:
    """One project class: its name, display colour, severity rank and tumour flag."""

    name: str
    color: tuple[int, int, int]
    severity: int
    tumour: bool


def _parse_color(value, path: str, name: str) -> tuple[int, int, int]:
    if isinstance(value, str) and value.startswith("#") and len(value) == 7:
        return tuple(int(value[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in value):
        return tuple(value)  # type: ignore[return-value]
    raise ConfigError(f"{path}: class {name!r} has invalid color {value!r}; use '#rrggbb' or [r, g, b] with values 0-255")


def _normalise_label(label) -> str:
    """Return the lookup key of a raw label, so ids and names compare as lower-case text."""
    if isinstance(label, (float, np.floating)) and float(label).is_integer():
        label = int(label)
    return str(label).strip().lower()


class ClassMap:
    """Raw class ids or names of one dataset -> project classes in a fixed order.

    A class map may hold several label schemes for one dataset (CoNSeP ships
    with 7 classes, HoVer-Net merges them to 4). ``resolve_scheme`` picks the
    scheme that covers every raw label seen.
    """

    def __init__(self, name: str, classes: list[NucleusClass], schemes: dict[str, dict[str, str]], path: str = "<memory>"):
        if not classes:
            raise ConfigError(f"{path}: the class map defines no classes; add at least one entry under 'classes'")
        names = [c.name for c in classes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"{path}: class names must be unique, found {duplicates} more than once")
        if len(classes) > 254:
            raise ConfigError(f"{path}: {len(classes)} classes do not fit into a uint8 class mask; use at most 254")
        for scheme_name, labels in schemes.items():
            unknown = sorted({target for target in labels.values() if target not in names})
            if unknown:
                raise ConfigError(
                    f"{path}: scheme {scheme_name!r} maps labels to unknown classes {unknown}; valid classes are {names}"
                )
        # Every scheme also accepts the project class names, so files this project writes (QuPath GeoJSON
        # predictions, exported tables) read back through the class map they were made with.
        schemes = {
            scheme_name: {**{_normalise_label(n): n for n in names}, **labels} for scheme_name, labels in schemes.items()
        }
        self.name = name
        self.classes = classes
        self.schemes = schemes
        self.path = path
        self.scheme = next(iter(schemes)) if schemes else None

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def severities(self) -> list[int]:
        return [c.severity for c in self.classes]

    @property
    def tumour_indices(self) -> list[int]:
        return [i for i, c in enumerate(self.classes) if c.tumour]

    def index_of(self, class_name: str) -> int:
        return self.names.index(class_name)

    def resolve_scheme(self, raw_labels: Iterable, source: str = "the dataset") -> str:
        """Select the first scheme that covers every raw label and make it current."""
        seen = sorted({_normalise_label(label) for label in raw_labels})
        for scheme_name, labels in self.schemes.items():
            if all(label in labels for label in seen):
                if scheme_name != self.scheme:
                    logger.info("class map %s: using label scheme %r for %s", self.name, scheme_name, source)
                self.scheme = scheme_name
                return scheme_name
        best = min(self.schemes, key=lambda s: sum(label not in self.schemes[s] for label in seen))
        missing = [label for label in seen if label not in self.schemes[best]]
        raise ConfigError(
            f"{self.path}: class labels {missing} of {source} are missing from class map {self.name!r} "
            f"(scheme {best!r} knows {sorted(self.schemes[best])}); add them under 'labels' in the class map"
        )

    def class_index(self, raw_label, source: str = "") -> int:
        """Return the project class index of one raw label in the current scheme."""
        labels = self.schemes[self.scheme]
        key = _normalise_label(raw_label)
        if key not in labels:
            where = f" in {source}" if source else ""
            raise ConfigError(
                f"class label {raw_label!r}{where} is missing from class map {self.path} "
                f"(scheme {self.scheme!r} knows {sorted(labels)}); add it under 'labels' or pick another --class-map"
            )
        return self.names.index(labels[key])

    def to_dict(self) -> dict:
        """Return the class map as plain data, for logging as a run artifact."""
        return {
            "name": self.name,
            "scheme": self.scheme,
            "classes": [
                {"name": c.name, "color": "#%02x%02x%02x" % c.color, "severity": c.severity, "tumour": c.tumour}
                for c in self.classes
            ],
            "labels": self.schemes,
        }

    @classmethod
    def from_dict(cls, data: Mapping, path: str = "<memory>") -> "ClassMap":
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: a class map must be a YAML mapping with 'classes' and 'labels'")
        raw_classes = data.get("classes")
        if not isinstance(raw_classes, list):
            raise ConfigError(f"{path}: 'classes' must be a list of mappings with name, color, severity and tumour")
        classes = []
        for entry in raw_classes:
            if not isinstance(entry, Mapping) or "name" not in entry:
                raise ConfigError(f"{path}: every entry of 'classes' needs a 'name', got {entry!r}")
            name = str(entry["name"])
            severity = entry.get("severity", len(classes))
            if not isinstance(severity, int):
                raise ConfigError(f"{path}: class {name!r} has severity {severity!r}; use an integer rank")
            classes.append(
                NucleusClass(
                    name=name,
                    color=_parse_color(entry.get("color", "#ffffff"), path, name),
                    severity=severity,
                    tumour=bool(entry.get("tumour", False)),
                )
            )

        labels = data.get("labels")
        if labels is None:
            labels = {"default": {c.name: c.name for c in classes}}
        if not isinstance(labels, Mapping) or not labels:
            raise ConfigError(f"{path}: 'labels' must map raw labels to class names, or scheme names to such mappings")
        if all(isinstance(v, Mapping) for v in labels.values()):
            raw_schemes = labels
        else:
            raw_schemes = {"default": labels}
        schemes = {
            str(scheme): {_normalise_label(raw): str(target) for raw, target in mapping.items()}
            for scheme, mapping in raw_schemes.items()
        }
        return cls(name=str(data.get("name", Path(path).stem)), classes=classes, schemes=schemes, path=path)

    @classmethod
    def load(cls, path: str | Path) -> "ClassMap":
        path = Path(path)
        if not path.is_file():
            shipped = sorted(p.name for p in (Path(__file__).resolve().parents[3] / "mlproject" / "class_maps").glob("*.yaml"))
            raise ConfigError(f"class map {path} not found; pass a YAML file such as mlproject/class_maps/{shipped[0] if shipped else 'consep.yaml'}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: invalid YAML ({error}); fix the file or pass another --class-map") from error
        return cls.from_dict(data, str(path))
