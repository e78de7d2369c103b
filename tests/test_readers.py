"""Dataset readers: every format decoded pixel by pixel against hand-drawn masks, bad input, real data."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
import tifffile
from PIL import Image

from granularity.data.class_map import ClassMap
from granularity.data.images import load_label_image, load_rgb
from granularity.data.readers import FORMATS, detect_format, input_files, read_regions
from granularity.data.readers.rle import decode, decode_counts_string
from granularity.errors import ConfigError, DatasetError

from conftest import CLASS_MAPS, CONSEP, PANNUKE

CONSEP_MAP = CLASS_MAPS / "consep.yaml"
MONUSEG_MAP = CLASS_MAPS / "monuseg.yaml"


# ---------------------------------------------------------------- builders


def rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def save_image(path: Path, pixels: np.ndarray) -> None:
    """Write an image with Pillow, so the readers' cv2/tifffile decoding is checked by another library."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def disk(shape: tuple[int, int], row: float, col: float, radius: float) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return np.hypot(rows - row, cols - col) <= radius


def rectangle(shape: tuple[int, int], top: int, left: int, bottom: int, right: int) -> np.ndarray:
    """Mask of rows top..bottom and columns left..right, both inclusive."""
    mask = np.zeros(shape, dtype=bool)
    mask[top : bottom + 1, left : right + 1] = True
    return mask


def outline(mask: np.ndarray) -> np.ndarray:
    """Trace a mask's outer outline as an N x 2 array of (x, y) pixel centres."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    assert len(contours) == 1
    return contours[0].reshape(-1, 2)


def rle_counts(mask: np.ndarray) -> list[int]:
    """Encode a mask as COCO run lengths, column-major, starting with a background run."""
    runs = []
    current = False
    length = 0
    for value in mask.T.reshape(-1):
        if bool(value) == current:
            length += 1
        else:
            runs.append(length)
            current = not current
            length = 1
    runs.append(length)
    return runs


def rle_string(runs: list[int]) -> str:
    """Compress run lengths into COCO's string form, following the algorithm of pycocotools' rleToString."""
    characters = []
    for index, run in enumerate(runs):
        value = run - runs[index - 2] if index > 2 else run
        more = True
        while more:
            group = value & 0x1F
            value >>= 5
            more = value != -1 if group & 0x10 else value != 0
            if more:
                group |= 0x20
            characters.append(chr(group + 48))
    return "".join(characters)


def class_map(labels: dict, names=("normal", "tumour")) -> ClassMap:
    return ClassMap.from_dict(
        {
            "name": "test",
            "classes": [{"name": n, "severity": i, "tumour": i > 0} for i, n in enumerate(names)],
            "labels": labels,
        }
    )


def write_consep(root: Path, split: str | None, name: str, instances: np.ndarray, inst_type, image=None) -> np.ndarray:
    """Write one CoNSeP region; ``split`` None writes into ``root`` itself. Returns the image."""
    folder = root / split if split else root
    image = rgb(*instances.shape, seed=len(name)) if image is None else image
    save_image(folder / "Images" / f"{name}.png", image)
    (folder / "Labels").mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(
        folder / "Labels" / f"{name}.mat",
        {"inst_map": instances.astype(np.int32), "inst_type": np.asarray(inst_type, dtype=np.int32).reshape(-1, 1)},
    )
    return image


def same_instances(actual: np.ndarray, expected_masks: dict[int, np.ndarray], classes: dict[int, int], expected_classes: dict[int, int]):
    """Check that each expected mask is one instance of the decoded map, with the expected class.

    The readers number nuclei themselves, so the check matches decoded ids to
    expected masks by their pixels.
    """
    expected_foreground = np.zeros(actual.shape, dtype=bool)
    for key, mask in expected_masks.items():
        ids = np.unique(actual[mask])
        assert ids.size == 1, f"nucleus {key} is split over ids {ids}"
        assert ids[0] != 0, f"nucleus {key} is missing"
        assert np.array_equal(actual == ids[0], mask), f"nucleus {key} differs from its drawn mask"
        assert classes[int(ids[0])] == expected_classes[key]
        expected_foreground |= mask
    assert np.array_equal(actual > 0, expected_foreground)
    assert set(classes) == set(int(i) for i in np.unique(actual) if i)


# ---------------------------------------------------------------- images


def test_load_rgb_png_and_jpeg(tmp_path):
    pixels = rgb(9, 11)
    save_image(tmp_path / "a.png", pixels)
    assert np.array_equal(load_rgb(tmp_path / "a.png"), pixels)

    smooth = np.zeros((16, 16, 3), dtype=np.uint8)
    smooth[..., 0] = 200
    smooth[..., 2] = 40
    Image.fromarray(smooth).save(tmp_path / "a.jpg", quality=95)
    decoded = load_rgb(tmp_path / "a.jpg")
    assert decoded.shape == (16, 16, 3)
    assert np.abs(decoded.astype(int) - smooth).max() <= 3


def test_load_rgb_rgba_drops_alpha(tmp_path, caplog):
    pixels = np.dstack([rgb(5, 6), np.full((5, 6), 7, dtype=np.uint8)])
    save_image(tmp_path / "rgba.png", pixels)
    with caplog.at_level(logging.WARNING):
        loaded = load_rgb(tmp_path / "rgba.png")
    assert np.array_equal(loaded, pixels[:, :, :3])
    assert "alpha" in caplog.text


def test_load_rgb_greyscale_replicated(tmp_path, caplog):
    grey = rgb(5, 6)[:, :, 0]
    save_image(tmp_path / "grey.png", grey)
    with caplog.at_level(logging.WARNING):
        loaded = load_rgb(tmp_path / "grey.png")
    assert loaded.shape == (5, 6, 3)
    for channel in range(3):
        assert np.array_equal(loaded[:, :, channel], grey)
    assert "greyscale" in caplog.text


def test_load_rgb_16bit_scaled(tmp_path, caplog):
    deep = np.array([[0, 257, 65535], [25700, 514, 1000]], dtype=np.uint16)
    tifffile.imwrite(tmp_path / "deep.tif", np.dstack([deep, deep, deep]))
    with caplog.at_level(logging.WARNING):
        loaded = load_rgb(tmp_path / "deep.tif")
    expected = np.array([[0, 1, 255], [100, 2, 4]], dtype=np.uint8)
    assert np.array_equal(loaded[:, :, 1], expected)
    assert "16-bit" in caplog.text


def test_load_rgb_palette_expanded(tmp_path, caplog):
    indices = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([10, 20, 30, 200, 100, 0, 0, 0, 255] + [0] * (253 * 3))
    image.save(tmp_path / "palette.png")
    with caplog.at_level(logging.WARNING):
        loaded = load_rgb(tmp_path / "palette.png")
    assert loaded[0, 0].tolist() == [10, 20, 30]
    assert loaded[0, 1].tolist() == [200, 100, 0]
    assert loaded[1, 0].tolist() == [0, 0, 255]
    assert "palette" in caplog.text


def test_load_rgb_planar_tiff(tmp_path):
    pixels = rgb(7, 9)
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(pixels, -1, 0), planarconfig="separate")
    assert np.array_equal(load_rgb(tmp_path / "planar.tif"), pixels)


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\nnot really a png at all"])
def test_load_rgb_empty_or_corrupt(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match="broken.png"):
        load_rgb(path)


def test_load_rgb_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_rgb(tmp_path / "absent.png")


def test_load_label_image_rejects_rgb(tmp_path):
    save_image(tmp_path / "labels.png", rgb(4, 4))
    with pytest.raises(DatasetError, match="one channel"):
        load_label_image(tmp_path / "labels.png")


# ---------------------------------------------------------------- CoNSeP


def consep_dataset(root: Path) -> dict:
    """Two splits with non-contiguous ids and official 7-class labels; returns what was drawn."""
    shape = (20, 24)
    first = np.zeros(shape, dtype=np.int32)
    first[disk(shape, 6, 6, 3)] = 2
    first[rectangle(shape, 10, 12, 16, 20)] = 5
    second = np.zeros(shape, dtype=np.int32)
    second[disk(shape, 10, 10, 4)] = 1
    image_a = write_consep(root, "Train", "train_3_001", first, [1, 4, 2, 2, 6])
    image_b = write_consep(root, "Test", "test_1_000", second, [7])
    return {"first": first, "second": second, "image_a": image_a, "image_b": image_b}


def test_consep_pixels_classes_groups(tmp_path):
    drawn = consep_dataset(tmp_path)
    regions = read_regions(tmp_path, "consep", ClassMap.load(CONSEP_MAP))

    by_name = {r.name: r for r in regions}
    assert sorted(by_name) == ["test_1_000", "train_3_001"]
    train = by_name["train_3_001"]
    assert np.array_equal(train.instances, drawn["first"])
    assert train.instances.dtype == np.int32
    assert np.array_equal(train.image, drawn["image_a"])
    # Official classes 4 (malignant epithelial) and 6 (muscle) map to epithelial and spindle.
    assert train.classes == {2: 2, 5: 3}
    assert train.group == "train_3"
    test = by_name["test_1_000"]
    assert test.classes == {1: 3}
    assert test.group == "test_1"
    assert np.array_equal(test.image, drawn["image_b"])


def test_consep_merged_labels(tmp_path):
    shape = (8, 8)
    instances = np.zeros(shape, dtype=np.int32)
    instances[1:3, 1:3] = 1
    instances[5:7, 5:7] = 2
    write_consep(tmp_path, None, "tile_0_000", instances, [2, 1])
    cmap = ClassMap.load(CONSEP_MAP)
    (region,) = read_regions(tmp_path, "consep", cmap)
    assert cmap.scheme == "merged"
    assert region.classes == {1: 1, 2: 0}


def test_consep_whole_tile_is_own_group(tmp_path):
    instances = np.zeros((6, 6), dtype=np.int32)
    instances[2:4, 2:4] = 1
    write_consep(tmp_path, "Train", "train_7", instances, [1])
    write_consep(tmp_path, "Train", "train_8", instances, [1])
    regions = read_regions(tmp_path, "consep", ClassMap.load(CONSEP_MAP))
    assert [r.group for r in regions] == ["train_7", "train_8"]


def test_consep_names_unique_across_splits(tmp_path):
    instances = np.zeros((6, 6), dtype=np.int32)
    instances[2:4, 2:4] = 1
    write_consep(tmp_path, "Train", "1", instances, [1])
    write_consep(tmp_path, "Test", "1", instances, [1])
    names = sorted(r.name for r in read_regions(tmp_path, "consep", ClassMap.load(CONSEP_MAP)))
    assert names == ["test_1", "train_1"]


def test_consep_inst_type_too_short(tmp_path):
    instances = np.zeros((6, 6), dtype=np.int32)
    instances[0:2, 0:2] = 1
    instances[3:5, 3:5] = 3
    write_consep(tmp_path, None, "a_1_001", instances, [1, 2])
    with pytest.raises(DatasetError, match=r"a_1_001\.mat.*'inst_type' has 2 rows.*id 3"):
        read_regions(tmp_path, "consep", ClassMap.load(CONSEP_MAP))


def test_consep_size_mismatch(tmp_path):
    instances = np.zeros((6, 6), dtype=np.int32)
    instances[0:2, 0:2] = 1
    write_consep(tmp_path, None, "a_1_001", instances, [1], image=rgb(6, 7))
    with pytest.raises(DatasetError, match=r"a_1_001\.png is 7 x 6 px.*a_1_001\.mat is 6 x 6 px"):
        read_regions(tmp_path, "consep", ClassMap.load(CONSEP_MAP))


def test_consep_class_missing_from_map(tmp_path):
    instances = np.zeros((6, 6), dtype=np.int32)
    instances[0:2, 0:2] = 1
    write_consep(tmp_path, None, "a_1_001", instances, [9])
    with pytest.raises(ConfigError, match=r"\['9'\].*consep"):
        read_regions(tmp_path, "consep", ClassMap.load(CONSEP_MAP))


def test_consep_image_without_label(tmp_path):
    instances = np.zeros((6, 6), dtype=np.int32)
    write_consep(tmp_path, None, "a_1_001", instances, [])
    save_image(tmp_path / "Images" / "a_1_002.png", rgb(6, 6))
    with pytest.raises(DatasetError, match=r"a_1_002\.png has no \.mat label"):
        read_regions(tmp_path, "consep", ClassMap.load(CONSEP_MAP))


def test_consep_label_without_image(tmp_path):
    instances = np.zeros((6, 6), dtype=np.int32)
    write_consep(tmp_path, None, "a_1_001", instances, [])
    (tmp_path / "Images" / "a_1_001.png").unlink()
    with pytest.raises(DatasetError, match=r"a_1_001\.mat has no image"):
        read_regions(tmp_path, "consep", ClassMap.load(CONSEP_MAP))


@pytest.mark.parametrize("content", [b"", b"MATLAB 5.0 MAT-file, broken beyond repair"])
def test_consep_empty_or_corrupt_label(tmp_path, content):
    instances = np.zeros((6, 6), dtype=np.int32)
    write_consep(tmp_path, None, "a_1_001", instances, [])
    (tmp_path / "Labels" / "a_1_001.mat").write_bytes(content)
    with pytest.raises(DatasetError, match=r"a_1_001\.mat"):
        read_regions(tmp_path, "consep", ClassMap.load(CONSEP_MAP))


def test_consep_missing_inst_type(tmp_path):
    (tmp_path / "Labels").mkdir()
    save_image(tmp_path / "Images" / "a.png", rgb(4, 4))
    scipy.io.savemat(tmp_path / "Labels" / "a.mat", {"inst_map": np.zeros((4, 4), dtype=np.int32)})
    with pytest.raises(DatasetError, match=r"a\.mat has no 'inst_type'"):
        read_regions(tmp_path, "consep", ClassMap.load(CONSEP_MAP))


def test_missing_dataset_folder(tmp_path):
    for format in FORMATS:
        with pytest.raises(DatasetError, match="absent.*not found"):
            read_regions(tmp_path / "absent", format, ClassMap.load(CONSEP_MAP))


# ---------------------------------------------------------------- COCO


SHAPE = (24, 30)


def coco_file(root: Path, annotations: list[dict], images=None, categories=None) -> Path:
    images = images or [{"id": 1, "file_name": "tile_a.png", "height": SHAPE[0], "width": SHAPE[1]}]
    for entry in images:
        save_image(root / "images" / entry["file_name"], rgb(*SHAPE, seed=3))
    categories = categories or [{"id": 1, "name": "Tumour"}, {"id": 2, "name": "Normal"}]
    data = {"images": images, "annotations": annotations, "categories": categories}
    path = root / "annotations.json"
    path.write_text(json.dumps(data))
    return path


COCO_MAP = {"tumour": "tumour", "normal": "normal"}


def test_coco_polygons_pixel_exact(tmp_path):
    box = rectangle(SHAPE, 2, 3, 8, 12)
    round_nucleus = disk(SHAPE, 16, 20, 5)
    two_parts = rectangle(SHAPE, 14, 2, 16, 4) | rectangle(SHAPE, 19, 2, 21, 6)
    annotations = [
        {"id": 10, "image_id": 1, "category_id": 1, "segmentation": [[3, 2, 12, 2, 12, 8, 3, 8]]},
        {"id": 11, "image_id": 1, "category_id": 2, "segmentation": [outline(round_nucleus).reshape(-1).tolist()]},
        {"id": 12, "image_id": 1, "category_id": 2, "segmentation": [[2, 14, 4, 14, 4, 16, 2, 16], [2, 19, 6, 19, 6, 21, 2, 21]]},
    ]
    coco_file(tmp_path, annotations)
    (region,) = read_regions(tmp_path, "coco", class_map(COCO_MAP))
    assert region.name == "tile_a"
    assert region.group == "tile_a"
    same_instances(
        region.instances,
        {"box": box, "round": round_nucleus, "parts": two_parts},
        region.classes,
        {"box": 1, "round": 0, "parts": 0},
    )


def test_coco_uncompressed_rle(tmp_path):
    first = disk(SHAPE, 8, 8, 4)
    second = rectangle(SHAPE, 15, 18, 22, 27)
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": {"counts": rle_counts(first), "size": list(SHAPE)}},
        {"id": 2, "image_id": 1, "category_id": 2, "segmentation": {"counts": rle_counts(second), "size": list(SHAPE)}},
    ]
    coco_file(tmp_path, annotations)
    (region,) = read_regions(tmp_path, "coco", class_map(COCO_MAP))
    same_instances(region.instances, {"a": first, "b": second}, region.classes, {"a": 1, "b": 0})


def test_coco_compressed_rle(tmp_path):
    masks = {"a": disk(SHAPE, 12, 15, 7), "b": rectangle(SHAPE, 0, 0, 3, 29), "c": rectangle(SHAPE, 20, 0, 23, 0)}
    annotations = [
        {"id": k, "image_id": 1, "category_id": 1, "segmentation": {"counts": rle_string(rle_counts(m)), "size": list(SHAPE)}}
        for k, m in enumerate(masks.values(), start=1)
    ]
    coco_file(tmp_path, annotations)
    (region,) = read_regions(tmp_path, "coco", class_map(COCO_MAP))
    same_instances(region.instances, masks, region.classes, {"a": 1, "b": 1, "c": 1})


def test_rle_string_round_trip_large_runs():
    # Long and irregular runs exercise multi-character values and negative differences.
    runs = [0, 5, 4000, 1, 3, 70000, 2, 1, 31, 32, 1023, 1024]
    assert decode_counts_string(rle_string(runs)) == runs


def test_rle_decode_column_major():
    # Runs go down the columns: 1 background, 2 foreground (rows 1-2 of column 0), 3 background.
    mask = decode([1, 2, 3], 3, 2)
    assert mask.tolist() == [[False, False], [True, False], [True, False]]


def test_coco_ids_and_rle_stored_as_text(tmp_path):
    mask = disk(SHAPE, 10, 10, 3)
    annotations = [
        {
            "id": "7",
            "image_id": "1",
            "category_id": "2",
            "iscrowd": "0",
            "segmentation": {"counts": json.dumps(rle_counts(mask)), "size": json.dumps(list(SHAPE))},
        }
    ]
    coco_file(tmp_path, annotations)
    (region,) = read_regions(tmp_path, "coco", class_map(COCO_MAP))
    same_instances(region.instances, {"a": mask}, region.classes, {"a": 0})


def test_coco_overlap_goes_to_smaller(tmp_path):
    large = rectangle(SHAPE, 2, 2, 14, 14)
    small = rectangle(SHAPE, 10, 10, 18, 18)
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 2, "segmentation": {"counts": rle_counts(small), "size": list(SHAPE)}},
        {"id": 2, "image_id": 1, "category_id": 1, "segmentation": {"counts": rle_counts(large), "size": list(SHAPE)}},
    ]
    coco_file(tmp_path, annotations)
    (region,) = read_regions(tmp_path, "coco", class_map(COCO_MAP))
    same_instances(region.instances, {"small": small, "large": large & ~small}, region.classes, {"small": 0, "large": 1})


def test_coco_crowd_skipped_and_json_given_directly(tmp_path):
    mask = disk(SHAPE, 10, 10, 3)
    crowd = rectangle(SHAPE, 0, 0, 5, 5)
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": {"counts": rle_counts(mask), "size": list(SHAPE)}},
        {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 1, "segmentation": {"counts": rle_counts(crowd), "size": list(SHAPE)}},
    ]
    path = coco_file(tmp_path, annotations)
    (region,) = read_regions(path, "coco", class_map(COCO_MAP))
    same_instances(region.instances, {"a": mask}, region.classes, {"a": 1})


def test_coco_rle_size_mismatch(tmp_path):
    mask = np.zeros((SHAPE[0] + 1, SHAPE[1]), dtype=bool)
    annotations = [{"id": 5, "image_id": 1, "category_id": 1, "segmentation": {"counts": rle_counts(mask), "size": list(mask.shape)}}]
    coco_file(tmp_path, annotations)
    with pytest.raises(DatasetError, match=r"annotations\.json.*annotation 5.*25 x 30"):
        read_regions(tmp_path, "coco", class_map(COCO_MAP))


def test_coco_image_size_mismatch(tmp_path):
    images = [{"id": 1, "file_name": "tile_a.png", "height": SHAPE[0] + 2, "width": SHAPE[1]}]
    coco_file(tmp_path, [], images=images)
    with pytest.raises(DatasetError, match=r"tile_a\.png is 30 x 24 px.*annotations\.json is 30 x 26 px"):
        read_regions(tmp_path, "coco", class_map(COCO_MAP))


def test_coco_unknown_category(tmp_path):
    annotations = [{"id": 5, "image_id": 1, "category_id": 9, "segmentation": [[1, 1, 4, 1, 4, 4]]}]
    coco_file(tmp_path, annotations)
    with pytest.raises(DatasetError, match=r"annotations\.json.*category_id 9"):
        read_regions(tmp_path, "coco", class_map(COCO_MAP))


def test_coco_category_missing_from_map(tmp_path):
    annotations = [{"id": 5, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 4, 1, 4, 4]]}]
    coco_file(tmp_path, annotations)
    with pytest.raises(ConfigError, match=r"\['tumour'\]"):
        read_regions(tmp_path, "coco", class_map({"normal": "normal"}, names=("normal", "neoplastic")))


def test_coco_missing_image_file(tmp_path):
    path = coco_file(tmp_path, [])
    (tmp_path / "images" / "tile_a.png").unlink()
    with pytest.raises(DatasetError, match=r"annotations\.json lists image 'tile_a\.png'"):
        read_regions(path, "coco", class_map(COCO_MAP))


@pytest.mark.parametrize("content", ["", "{not json", json.dumps({"images": []})])
def test_coco_empty_or_corrupt_json(tmp_path, content):
    (tmp_path / "annotations.json").write_text(content)
    with pytest.raises(DatasetError, match=r"annotations\.json"):
        read_regions(tmp_path, "coco", class_map(COCO_MAP))


# ---------------------------------------------------------------- ImageScope


def imagescope_xml(regions: list[tuple[np.ndarray, str]], annotation_name: str = "") -> str:
    """Write ImageScope XML: one Region per (vertices, Text), in an Annotation of the given Name."""
    parts = [f'<Annotations><Annotation Id="1" Name="{annotation_name}">']
    parts.append('<Attributes><Attribute Name="Description" Id="0" Value=""/></Attributes><Regions>')
    for index, (vertices, text) in enumerate(regions, start=1):
        parts.append(f'<Region Id="{index}" Type="0" Text="{text}"><Attributes/><Vertices>')
        parts.extend(f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in vertices)
        parts.append("</Vertices></Region>")
    parts.append("</Regions></Annotation></Annotations>")
    return "".join(parts)


def test_imagescope_monuseg_layout(tmp_path):
    image = rgb(*SHAPE, seed=5)
    (tmp_path / "Tissue Images").mkdir()
    tifffile.imwrite(tmp_path / "Tissue Images" / "TCGA-A.tif", image)
    (tmp_path / "Annotations").mkdir()
    round_nucleus = disk(SHAPE, 12, 20, 4)
    box = rectangle(SHAPE, 3, 2, 9, 8)
    # Float vertices as MoNuSeg writes them; the outline of the box is exact at integers.
    xml = imagescope_xml([(outline(round_nucleus).astype(float), ""), (np.array([[2.0, 3.0], [8.0, 3.0], [8.0, 9.0], [2.0, 9.0]]), "")])
    (tmp_path / "Annotations" / "TCGA-A.xml").write_text(xml)

    assert detect_format(tmp_path) == "imagescope"
    (region,) = read_regions(tmp_path, None, ClassMap.load(MONUSEG_MAP))
    assert region.name == "TCGA-A"
    assert np.array_equal(region.image, image)
    same_instances(region.instances, {"round": round_nucleus, "box": box}, region.classes, {"round": 0, "box": 0})


def test_imagescope_named_classes(tmp_path):
    save_image(tmp_path / "slide.png", rgb(*SHAPE))
    first = np.array([[2, 2], [6, 2], [6, 6], [2, 6]])
    second = np.array([[10, 10], [15, 10], [15, 15], [10, 15]])
    (tmp_path / "slide.xml").write_text(imagescope_xml([(first, "Tumour"), (second, "")], annotation_name="Normal"))
    (region,) = read_regions(tmp_path, "imagescope", class_map(COCO_MAP))
    same_instances(
        region.instances,
        {"first": rectangle(SHAPE, 2, 2, 6, 6), "second": rectangle(SHAPE, 10, 10, 15, 15)},
        region.classes,
        {"first": 1, "second": 0},
    )


def test_imagescope_class_missing_from_map(tmp_path):
    save_image(tmp_path / "slide.png", rgb(*SHAPE))
    (tmp_path / "slide.xml").write_text(imagescope_xml([(np.array([[2, 2], [6, 2], [6, 6]]), "")]))
    with pytest.raises(ConfigError, match=r"\['nucleus'\]"):
        read_regions(tmp_path, "imagescope", class_map(COCO_MAP))


def test_imagescope_corrupt_xml(tmp_path):
    save_image(tmp_path / "slide.png", rgb(*SHAPE))
    (tmp_path / "slide.xml").write_text("<Annotations><Annotation>")
    with pytest.raises(DatasetError, match=r"slide\.xml is not valid XML"):
        read_regions(tmp_path, "imagescope", ClassMap.load(MONUSEG_MAP))


def test_imagescope_annotation_without_image(tmp_path):
    save_image(tmp_path / "slide.png", rgb(*SHAPE))
    (tmp_path / "slide.xml").write_text(imagescope_xml([]))
    (tmp_path / "other.xml").write_text(imagescope_xml([]))
    with pytest.raises(DatasetError, match=r"other\.xml has no image"):
        read_regions(tmp_path, "imagescope", ClassMap.load(MONUSEG_MAP))


# ---------------------------------------------------------------- GeoJSON


def feature(geometry: dict, name: str | None) -> dict:
    properties = {"objectType": "detection"}
    if name is not None:
        properties["classification"] = {"name": name, "color": [255, 0, 0]}
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def square(left: int, top: int, right: int, bottom: int) -> list[list[int]]:
    return [[left, top], [right, top], [right, bottom], [left, bottom], [left, top]]


def test_geojson_polygons_holes_multipolygons(tmp_path):
    save_image(tmp_path / "region_1.png", rgb(*SHAPE))
    with_hole = rectangle(SHAPE, 1, 1, 11, 11) & ~rectangle(SHAPE, 4, 4, 7, 7)
    two_parts = rectangle(SHAPE, 15, 2, 18, 5) | rectangle(SHAPE, 15, 9, 20, 12)
    round_nucleus = disk(SHAPE, 10, 22, 4)
    features = [
        feature({"type": "Polygon", "coordinates": [square(1, 1, 11, 11), square(4, 4, 7, 7)]}, "Tumour"),
        feature({"type": "MultiPolygon", "coordinates": [[square(2, 15, 5, 18)], [square(9, 15, 12, 20)]]}, None),
        feature({"type": "Polygon", "coordinates": [outline(round_nucleus).tolist()]}, "Normal"),
        feature({"type": "Point", "coordinates": [3, 3]}, "Tumour"),
    ]
    (tmp_path / "region_1.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))

    assert detect_format(tmp_path) == "geojson"
    labels = dict(COCO_MAP, unclassified="normal")
    (region,) = read_regions(tmp_path, None, class_map(labels))
    same_instances(
        region.instances,
        {"hole": with_hole, "parts": two_parts, "round": round_nucleus},
        region.classes,
        {"hole": 1, "parts": 0, "round": 0},
    )


def test_geojson_bare_feature_list(tmp_path):
    save_image(tmp_path / "r.png", rgb(*SHAPE))
    features = [feature({"type": "Polygon", "coordinates": [square(3, 3, 9, 6)]}, "Tumour")]
    (tmp_path / "r.geojson").write_text(json.dumps(features))
    (region,) = read_regions(tmp_path / "r.geojson", "geojson", class_map(COCO_MAP))
    same_instances(region.instances, {"a": rectangle(SHAPE, 3, 3, 6, 9)}, region.classes, {"a": 1})


def test_geojson_unclassified_missing_from_map(tmp_path):
    save_image(tmp_path / "r.png", rgb(*SHAPE))
    features = [feature({"type": "Polygon", "coordinates": [square(3, 3, 9, 6)]}, None)]
    (tmp_path / "r.geojson").write_text(json.dumps(features))
    with pytest.raises(ConfigError, match=r"\['unclassified'\]"):
        read_regions(tmp_path, "geojson", class_map(COCO_MAP))


def test_geojson_image_without_annotation(tmp_path):
    save_image(tmp_path / "r.png", rgb(*SHAPE))
    save_image(tmp_path / "s.png", rgb(*SHAPE))
    (tmp_path / "r.geojson").write_text("[]")
    with pytest.raises(DatasetError, match=r"s\.png has no GeoJSON file"):
        read_regions(tmp_path, "geojson", class_map(COCO_MAP))


def test_geojson_empty_file(tmp_path):
    save_image(tmp_path / "r.png", rgb(*SHAPE))
    (tmp_path / "r.geojson").write_text("")
    with pytest.raises(DatasetError, match=r"r\.geojson is empty"):
        read_regions(tmp_path, "geojson", class_map(COCO_MAP))


# ---------------------------------------------------------------- instance map + CSV


def write_instance_dataset(root: Path, stem: str, instances: np.ndarray, rows: list[tuple], suffix: str = ".png") -> np.ndarray:
    image = rgb(*instances.shape, seed=9)
    save_image(root / "images" / f"{stem}.png", image)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    if suffix == ".png":
        Image.fromarray(instances.astype(np.uint16)).save(root / "labels" / f"{stem}.png")
    else:
        tifffile.imwrite(root / "labels" / f"{stem}{suffix}", instances.astype(np.int32))
    lines = ["id,class"] + [f"{i},{c}" for i, c in rows]
    (root / "labels" / f"{stem}.csv").write_text("\n".join(lines) + "\n")
    return image


def test_instance_map_16bit_png(tmp_path):
    instances = np.zeros(SHAPE, dtype=np.int64)
    instances[disk(SHAPE, 8, 8, 4)] = 300
    instances[rectangle(SHAPE, 14, 14, 20, 26)] = 7
    image = write_instance_dataset(tmp_path, "r1", instances, [(7, "Normal"), (300, 1), (999, "Normal")])

    assert detect_format(tmp_path) == "instance_map"
    (region,) = read_regions(tmp_path, None, class_map({"1": "tumour", "normal": "normal"}))
    assert np.array_equal(region.instances, instances)
    assert np.array_equal(region.image, image)
    assert region.classes == {7: 0, 300: 1}


def test_instance_map_32bit_tiff_renumbers_sparse_ids(tmp_path):
    instances = np.zeros(SHAPE, dtype=np.int64)
    first = disk(SHAPE, 8, 8, 4)
    second = rectangle(SHAPE, 14, 14, 20, 26)
    instances[first] = 2_000_000_000
    instances[second] = 70_000
    write_instance_dataset(tmp_path, "r1", instances, [(2_000_000_000, "Tumour"), (70_000, "Normal")], suffix=".tif")
    (region,) = read_regions(tmp_path, "instance_map", class_map(COCO_MAP))
    assert region.instances.max() == 2
    same_instances(region.instances, {"first": first, "second": second}, region.classes, {"first": 1, "second": 0})


def test_instance_map_id_missing_from_csv(tmp_path):
    instances = np.zeros(SHAPE, dtype=np.int64)
    instances[2:5, 2:5] = 4
    write_instance_dataset(tmp_path, "r1", instances, [(3, "Normal")])
    with pytest.raises(DatasetError, match=r"r1\.csv has no row for nucleus ids \[4\]"):
        read_regions(tmp_path, "instance_map", class_map(COCO_MAP))


def test_instance_map_without_csv(tmp_path):
    instances = np.zeros(SHAPE, dtype=np.int64)
    write_instance_dataset(tmp_path, "r1", instances, [])
    (tmp_path / "labels" / "r1.csv").unlink()
    with pytest.raises(DatasetError, match=r"r1\.png has no class table"):
        read_regions(tmp_path, "instance_map", class_map(COCO_MAP))


def test_instance_map_bad_header(tmp_path):
    instances = np.zeros(SHAPE, dtype=np.int64)
    write_instance_dataset(tmp_path, "r1", instances, [])
    (tmp_path / "labels" / "r1.csv").write_text("nucleus,type\n1,2\n")
    with pytest.raises(DatasetError, match=r"r1\.csv has the header.*'id,class'"):
        read_regions(tmp_path, "instance_map", class_map(COCO_MAP))


def test_instance_map_size_mismatch(tmp_path):
    instances = np.zeros(SHAPE, dtype=np.int64)
    write_instance_dataset(tmp_path, "r1", instances, [])
    save_image(tmp_path / "images" / "r1.png", rgb(SHAPE[0], SHAPE[1] + 1))
    with pytest.raises(DatasetError, match=r"r1\.png is 31 x 24 px.*labels/r1\.png is 30 x 24 px"):
        read_regions(tmp_path, "instance_map", class_map(COCO_MAP))


def test_instance_map_without_labels_folder(tmp_path):
    save_image(tmp_path / "images" / "r1.png", rgb(4, 4))
    with pytest.raises(DatasetError, match="no labels/ folder"):
        read_regions(tmp_path, "instance_map", class_map(COCO_MAP))


# ---------------------------------------------------------------- detection and input files


def test_detect_format_each_layout(tmp_path):
    consep_dataset(tmp_path / "consep")
    coco_file(tmp_path / "coco", [])
    instances = np.zeros((4, 4), dtype=np.int64)
    write_instance_dataset(tmp_path / "plain", "r", instances, [])
    assert detect_format(tmp_path / "consep") == "consep"
    assert detect_format(tmp_path / "consep" / "Train") == "consep"
    assert detect_format(tmp_path / "coco") == "coco"
    assert detect_format(tmp_path / "coco" / "annotations.json") == "coco"
    assert detect_format(tmp_path / "plain") == "instance_map"


def test_detect_format_ambiguous(tmp_path):
    coco_file(tmp_path, [])
    (tmp_path / "images" / "tile_a.xml").write_text(imagescope_xml([]))
    with pytest.raises(DatasetError, match=r"several layouts: coco, imagescope; pass --format"):
        detect_format(tmp_path)


def test_detect_format_unknown(tmp_path):
    save_image(tmp_path / "lonely.png", rgb(4, 4))
    with pytest.raises(DatasetError, match=r"matches no known layout.*lonely\.png.*consep, coco, imagescope, geojson, instance_map"):
        detect_format(tmp_path)


def test_unknown_format_name(tmp_path):
    consep_dataset(tmp_path)
    with pytest.raises(ConfigError, match=r"'hovernet'.*--format"):
        read_regions(tmp_path, "hovernet", ClassMap.load(CONSEP_MAP))


def test_input_files_list_everything_read(tmp_path):
    consep_dataset(tmp_path / "c")
    expected = sorted(
        [
            tmp_path / "c" / "Test" / "Images" / "test_1_000.png",
            tmp_path / "c" / "Test" / "Labels" / "test_1_000.mat",
            tmp_path / "c" / "Train" / "Images" / "train_3_001.png",
            tmp_path / "c" / "Train" / "Labels" / "train_3_001.mat",
        ]
    )
    assert input_files(tmp_path / "c", "consep") == expected

    json_path = coco_file(tmp_path / "j", [])
    assert input_files(tmp_path / "j", None) == [json_path, tmp_path / "j" / "images" / "tile_a.png"]


# ---------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def consep_regions():
    if not CONSEP.exists():
        pytest.skip(f"real dataset {CONSEP} is absent")
    return read_regions(CONSEP, "consep", ClassMap.load(CONSEP_MAP))


@pytest.fixture(scope="module")
def pannuke_regions():
    if not PANNUKE.exists():
        pytest.skip(f"real dataset {PANNUKE} is absent")
    return read_regions(PANNUKE, "coco", ClassMap.load(CLASS_MAPS / "pannuke.yaml"))


def test_consep_real_counts_and_groups(consep_regions):
    splits = Counter(Path(r.source).parts[-3] for r in consep_regions)
    assert splits == {"Train": 432, "Test": 224}
    assert len({r.name for r in consep_regions}) == 656
    assert len({r.group for r in consep_regions}) == 41
    assert all(r.name.startswith(r.group + "_") for r in consep_regions)


def test_consep_real_class_masks_equal_type_map(consep_regions):
    for region in consep_regions:
        type_map = scipy.io.loadmat(region.source, variable_names=("type_map",))["type_map"]
        assert np.array_equal(region.class_map_image(), type_map), region.name


def test_pannuke_real_counts(pannuke_regions):
    names = ClassMap.load(CLASS_MAPS / "pannuke.yaml").names
    counts = Counter(names[c] for r in pannuke_regions for c in r.classes.values())
    assert len(pannuke_regions) == 25
    assert counts == {"neoplastic": 216, "non-neoplastic": 415}


def test_pannuke_real_foreground_equals_rle(pannuke_regions):
    data = json.loads((PANNUKE / "annotations.json").read_text())
    names = {entry["id"]: Path(entry["file_name"]).stem for entry in data["images"]}
    union = {r.name: np.zeros(r.shape, dtype=bool) for r in pannuke_regions}
    for annotation in data["annotations"]:
        height, width = annotation["segmentation"]["size"]
        flat = np.zeros(height * width, dtype=bool)
        position = 0
        for index, run in enumerate(annotation["segmentation"]["counts"]):
            flat[position : position + run] = index % 2 == 1
            position += run
        union[names[annotation["image_id"]]] |= flat.reshape(width, height).T
    for region in pannuke_regions:
        assert np.array_equal(region.instances > 0, union[region.name]), region.name
