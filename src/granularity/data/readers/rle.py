"""COCO run-length encoding: decoding uncompressed (counts list) and compressed (counts string) masks.

COCO masks are run lengths over the pixels in column-major order (down the
first column, then the next), alternating background and foreground and
starting with background. The compressed form packs those run lengths into
a string, as pycocotools' ``rleToString`` writes it: each value is split into
5-bit groups, least significant first, each stored as a character
``48 + group``, with bit 0x20 set on every group but the last and bit 0x10 of
the last group carrying the sign. From the fourth value on, the stored value
is the difference to the value two places before.
"""

from __future__ import annotations

import numpy as np


class RleError(ValueError):
    """A run-length encoding that cannot be decoded; the reader adds the file name."""


def decode_counts_string(counts: str) -> list[int]:
    """Decode a compressed COCO counts string into run lengths."""
    runs: list[int] = []
    position = 0
    text = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    while position < len(text):
        value = 0
        shift = 0
        more = True
        while more:
            if position >= len(text):
                raise RleError(f"compressed RLE string ends inside a value at character {position}")
            group = text[position] - 48
            if group < 0 or group > 63:
                raise RleError(f"compressed RLE string has invalid character {chr(text[position])!r} at {position}")
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def decode(counts, height: int, width: int) -> np.ndarray:
    """Decode COCO RLE counts (a list of ints or a compressed string) into an H x W bool mask."""
    runs = decode_counts_string(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
    runs_array = np.asarray(runs, dtype=np.int64)
    if runs_array.size and runs_array.min() < 0:
        raise RleError(f"run lengths must not be negative, found {int(runs_array.min())}")
    total = int(runs_array.sum())
    if total != height * width:
        raise RleError(f"run lengths add up to {total} pixels but the mask size {height} x {width} has {height * width}")

    values = np.zeros(runs_array.size, dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, runs_array)
    return flat.reshape((width, height)).T
