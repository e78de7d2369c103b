"""Dihedral variants, colour jitter and the study's 16-fold expansion."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest

from granularity.data.augment import StudyAugmentation, adjust_colour, dihedral, expand_study


def coordinate_variant(array: np.ndarray, k: int) -> np.ndarray:
    """Build dihedral variant k by moving every pixel explicitly (square arrays only)."""
    n = array.shape[0]
    out = np.empty_like(array)
    for y in range(n):
        for x in range(n):
            sx = n - 1 - x if k >= 4 else x
            # Counter-clockwise rotation by 90 degrees r times: (y, x) -> (n - 1 - x, y).
            ty, tx = y, sx
            for _ in range(k % 4):
                ty, tx = n - 1 - tx, ty
            out[ty, tx] = array[y, x]
    return out


def test_dihedral_matches_explicit_pixel_moves():
    array = np.arange(25).reshape(5, 5)
    for k in range(8):
        assert np.array_equal(dihedral(array, k), coordinate_variant(array, k))


def test_dihedral_variants_are_the_group():
    array = np.arange(12).reshape(3, 4)
    variants = [dihedral(array, k) for k in range(8)]

    assert np.array_equal(variants[0], array)
    assert len({v.tobytes() + bytes(v.shape) for v in variants}) == 8
    # Four quarter turns and two mirrors give the identity.
    turned = array
    for _ in range(4):
        turned = dihedral(turned, 1)
    assert np.array_equal(turned, array)
    assert np.array_equal(dihedral(dihedral(array, 4), 4), array)
    # Every variant composed with another variant is again a variant.
    for a in variants:
        for k in range(8):
            composed = dihedral(a, k)
            assert any(composed.shape == v.shape and np.array_equal(composed, v) for v in variants)


def test_dihedral_channels_and_values():
    image = np.random.default_rng(0).integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    for k in range(8):
        out = dihedral(image, k)
        assert out.shape == (6, 6, 3)
        assert out.flags["C_CONTIGUOUS"]
        for channel in range(3):
            assert np.array_equal(out[..., channel], dihedral(image[..., channel], k))
    with pytest.raises(ValueError, match="variant 8"):
        dihedral(image, 8)


def test_augmentation_keeps_mask_values():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    mask = rng.choice(np.array([0, 3, 7, 200], dtype=np.uint8), size=(16, 16))
    instances = rng.integers(0, 40, size=(16, 16)).astype(np.int32)
    augment = StudyAugmentation(seed=0, jitter_probability=1.0)

    for _ in range(10):
        out, out_mask, out_instances = augment(image, mask, instances)
        assert out_mask.dtype == mask.dtype
        assert np.array_equal(np.unique(out_mask, return_counts=True)[1], np.unique(mask, return_counts=True)[1])
        assert np.array_equal(np.bincount(out_instances.ravel()), np.bincount(instances.ravel()))
        # Both masks moved by the same variant.
        matches = [k for k in range(8) if np.array_equal(out_mask, dihedral(mask, k))]
        assert any(np.array_equal(out_instances, dihedral(instances, k)) for k in matches)


def test_augmentation_same_variant_for_image_and_mask():
    image = np.random.default_rng(2).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    augment = StudyAugmentation(seed=3, jitter_probability=0.0)

    for _ in range(10):
        out, mask = augment(image, image[..., 0].copy())
        assert np.array_equal(out[..., 0], mask)
    assert augment(image).shape == image.shape


def test_augmentation_rejects_mismatched_mask():
    with pytest.raises(ValueError, match="does not match"):
        StudyAugmentation()(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9), np.uint8))


def test_colour_identity_and_brightness():
    image = np.random.default_rng(4).integers(20, 200, size=(8, 8, 3), dtype=np.uint8)
    same = adjust_colour(image, 0.0, 1.0, 1.0, 0.0)
    assert np.abs(same.astype(int) - image).max() <= 1

    grey = np.full((4, 4, 3), 100, dtype=np.uint8)
    assert (adjust_colour(grey, 64 / 255, 1.0, 1.0, 0.0) == 164).all()


def test_colour_hue_shift_matches_colorsys():
    pixel = (200, 60, 30)
    image = np.full((2, 2, 3), pixel, dtype=np.uint8)
    out = adjust_colour(image, 0.0, 1.0, 1.0, 0.1)

    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in pixel))
    expected = np.array(colorsys.hsv_to_rgb((h + 0.1) % 1.0, s, v)) * 255
    assert np.abs(out[0, 0].astype(float) - expected).max() <= 1.0


def test_colour_saturation_and_contrast():
    image = np.random.default_rng(5).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)

    grey = adjust_colour(image, 0.0, 1.0, 0.0, 0.0)
    assert (grey.max(axis=2) - grey.min(axis=2)).max() <= 1

    flat = adjust_colour(image, 0.0, 0.0, 1.0, 0.0)
    expected = np.rint(image.reshape(-1, 3).mean(axis=0))
    assert np.abs(flat.reshape(-1, 3) - expected).max() <= 1


def test_expand_study_sixteen():
    image = np.random.default_rng(6).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    patches = expand_study(image, seed=0)

    assert len(patches) == 16
    for k in range(8):
        assert np.array_equal(patches[k], dihedral(image, k))
        assert patches[8 + k].shape == image.shape
        assert not np.array_equal(patches[8 + k], patches[k])
    again = expand_study(image, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(patches, again))
