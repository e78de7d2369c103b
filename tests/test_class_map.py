"""Class maps: label schemes, class-name labels and invalid files."""

from __future__ import annotations

import pytest

from granularity.data.class_map import ClassMap
from granularity.errors import ConfigError

from conftest import CLASS_MAPS


def test_consep_merged_scheme_keeps_ids():
    class_map = ClassMap.load(CLASS_MAPS / "consep.yaml")
    assert class_map.resolve_scheme([1, 2, 3, 4]) == "merged"
    assert [class_map.class_index(raw) for raw in (1, 2, 3, 4)] == [0, 1, 2, 3]
    assert class_map.names == ["other", "inflammatory", "epithelial", "spindle"]


def test_consep_official_scheme_merges_classes():
    class_map = ClassMap.load(CLASS_MAPS / "consep.yaml")
    assert class_map.resolve_scheme([1, 2, 3, 4, 5, 6, 7]) == "official"
    expected = ["other", "inflammatory", "epithelial", "epithelial", "spindle", "spindle", "spindle"]
    assert [class_map.names[class_map.class_index(raw)] for raw in range(1, 8)] == expected


def test_consep_severity_and_tumour():
    class_map = ClassMap.load(CLASS_MAPS / "consep.yaml")
    ranked = sorted(class_map.names, key=lambda name: class_map.severities[class_map.index_of(name)])
    assert ranked == ["other", "spindle", "inflammatory", "epithelial"]
    assert class_map.tumour_indices == [class_map.index_of("epithelial")]


def test_pannuke_names_and_ids():
    class_map = ClassMap.load(CLASS_MAPS / "pannuke.yaml")
    class_map.resolve_scheme(["Neoplastic", "No-neoplastic"])
    assert class_map.names[class_map.class_index("Neoplastic")] == "neoplastic"
    assert class_map.names[class_map.class_index("No-neoplastic")] == "non-neoplastic"
    assert class_map.tumour_indices == [1]


def test_class_names_read_back_as_labels():
    class_map = ClassMap.load(CLASS_MAPS / "consep.yaml")
    class_map.resolve_scheme(["epithelial", "spindle"])
    assert class_map.class_index("Epithelial") == 2
    assert class_map.class_index("spindle") == 3


def test_unknown_label_names_the_fix():
    class_map = ClassMap.load(CLASS_MAPS / "consep.yaml")
    with pytest.raises(ConfigError, match=r"\['9'\].*add them under 'labels'"):
        class_map.resolve_scheme([1, 9], source="Labels/x.mat")


def test_label_pointing_to_unknown_class():
    with pytest.raises(ConfigError, match="unknown classes"):
        ClassMap.from_dict({"classes": [{"name": "a"}], "labels": {1: "b"}})


def test_duplicate_class_names_rejected():
    with pytest.raises(ConfigError, match="unique"):
        ClassMap.from_dict({"classes": [{"name": "a"}, {"name": "a"}]})


def test_missing_file_names_shipped_maps(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ClassMap.load(tmp_path / "absent.yaml")


def test_invalid_colour_rejected():
    with pytest.raises(ConfigError, match="invalid color"):
        ClassMap.from_dict({"classes": [{"name": "a", "color": "red"}]})
