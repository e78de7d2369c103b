"""Benchmark of the prepare step on consep-256: package vs plain reference vs decoding alone.

Each phase runs in its own Python process, so its peak resident memory
(``ru_maxrss``) is its own:

- ``baseline``: imports only, the memory floor of the other phases;
- ``decode``: ``read_regions`` alone (images and labels);
- ``ours``: ``read_regions``, then ``derive_granularities`` and the window
  labels for every granularity and patch size, region by region;
- ``reference``: ``read_regions``, then ``reference_prepare`` on every
  ``--reference-step``-th region; its time is scaled to all regions by the
  region count, which is an estimate.

The reference's windows are compared with the package's on the same regions.

Usage:
    .venv/bin/python bench/bench_prepare.py [--dataset ../shared/datasets/consep-256] [--repeat 3] [--reference-step 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = PROJECT_ROOT.parent / "shared" / "datasets" / "consep-256"
CLASS_MAP = PROJECT_ROOT / "mlproject" / "class_maps" / "consep.yaml"
PATCH_SIZES = (32, 64, 128)
GRANULARITIES = ("pw", "el", "bd")


def peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_phase(phase: str, dataset: Path, reference_step: int) -> dict:
    """Run one phase in this process and return its timings, counts and peak memory."""
    sys.path.insert(0, str(PROJECT_ROOT / "bench"))
    from reference_prepare import prepare_region

    from granularity.data.class_map import ClassMap
    import numpy as np
    from scipy import ndimage

    from granularity.data.granularity import derive_granularities, fit_ellipse
    from granularity.data.patches import class_integrals, window_labels
    from granularity.data.readers import read_regions

    class_map = ClassMap.load(CLASS_MAP)
    result: dict = {"phase": phase}
    if phase == "baseline":
        result["peak_rss_mib"] = peak_rss_mib()
        return result

    start = time.perf_counter()
    regions = read_regions(dataset, "consep", class_map)
    result["decode_s"] = time.perf_counter() - start
    result["regions"] = len(regions)

    if phase == "ours":
        derive_s = label_s = 0.0
        windows = 0
        fallbacks = 0
        for region in regions:
            start = time.perf_counter()
            maps = derive_granularities(region, class_map)
            derive_s += time.perf_counter() - start

            start = time.perf_counter()
            for granularity in GRANULARITIES:
                integrals = class_integrals(maps, granularity)
                for size in PATCH_SIZES:
                    windows += len(window_labels(maps, granularity, size, integrals=integrals).x)
            label_s += time.perf_counter() - start
            fallbacks += maps.ellipse_fallbacks
        result.update(derive_s=derive_s, label_s=label_s, windows=windows, ellipse_fallbacks=fallbacks)

        # The floor of the conversion: cropping, tracing contours and fitting ellipses, nothing else.
        start = time.perf_counter()
        for region in regions:
            for index, box in enumerate(ndimage.find_objects(region.instances)):
                if box is not None:
                    fit_ellipse((region.instances[box] == index + 1).view(np.uint8), box[1].start, box[0].start)
        result["fit_floor_s"] = time.perf_counter() - start

    if phase == "reference":
        sample = regions[::reference_step]
        start = time.perf_counter()
        reference = [prepare_region(r, class_map.severities, PATCH_SIZES, GRANULARITIES) for r in sample]
        result["reference_sample_s"] = time.perf_counter() - start
        result["reference_sample_regions"] = len(sample)

        # Compare with the package on the same regions (not timed).
        mismatched = total = 0
        for region, expected in zip(sample, reference):
            maps = derive_granularities(region, class_map)
            for (size, granularity), kept in expected.items():
                ours = window_labels(maps, granularity, size)
                got = list(zip(ours.x.tolist(), ours.y.tolist(), ours.label.tolist()))
                total += len(kept)
                mismatched += len(set(kept) ^ set(got))
        result.update(reference_windows=total, mismatched_windows=mismatched)

    result["peak_rss_mib"] = peak_rss_mib()
    return result


def run_child(phase: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--phase", phase, "--dataset", str(args.dataset), "--reference-step", str(args.reference_step)]
    env = dict(os.environ, TQDM_DISABLE="1")
    completed = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def warm_file_cache(dataset: Path) -> None:
    """Read every dataset file once, so no phase pays for a cold disk cache."""
    for path in sorted(dataset.rglob("*")):
        if path.is_file():
            path.read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, help="consep-256 folder")
    parser.add_argument("--repeat", type=int, default=3, help="runs of the decode and ours phases; the median is reported")
    parser.add_argument("--reference-step", type=int, default=8, help="time the reference on every n-th region and scale")
    parser.add_argument("--phase", choices=["baseline", "decode", "ours", "reference"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase:
        print(json.dumps(run_phase(args.phase, args.dataset, args.reference_step)))
        return

    warm_file_cache(args.dataset)
    baseline = run_child("baseline", args)
    # Alternate decode and ours so that load from other processes hits both alike.
    decodes, ours_runs = [], []
    for _ in range(args.repeat):
        decodes.append(run_child("decode", args))
        ours_runs.append(run_child("ours", args))
    reference = run_child("reference", args)

    decode_s = statistics.median(r["decode_s"] for r in decodes)
    ours_total = [r["decode_s"] + r["derive_s"] + r["label_s"] for r in ours_runs]
    ours_s = statistics.median(ours_total)
    ours = ours_runs[ours_total.index(ours_s)] if ours_s in ours_total else ours_runs[0]
    regions = reference["regions"]
    reference_scaled = reference["reference_sample_s"] * regions / reference["reference_sample_regions"]
    reference_s = reference["decode_s"] + reference_scaled

    rows = [
        ("decode only (read_regions)", decode_s, statistics.median(r["peak_rss_mib"] for r in decodes)),
        ("ours: decode + derive + label", ours_s, ours["peak_rss_mib"]),
        ("  of which derive_granularities", ours["derive_s"], None),
        ("  of which window labels (9 combinations)", ours["label_s"], None),
        ("  (not included) crop + findContours + fitEllipse alone", ours["fit_floor_s"], None),
        (f"reference (1 in {args.reference_step} regions, scaled)", reference_s, reference["peak_rss_mib"]),
        ("imports only", None, baseline["peak_rss_mib"]),
    ]
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, load average after the run {load}")
    print(f"dataset: {args.dataset} ({regions} regions), {len(PATCH_SIZES)} patch sizes x {len(GRANULARITIES)} granularities")
    print(f"runs: median of {args.repeat} for decode and ours; reference once on {reference['reference_sample_regions']} regions")
    print()
    print("| phase | time (s) | peak RSS (MiB) |")
    print("|---|---|---|")
    for name, seconds, rss in rows:
        print(f"| {name} | {'' if seconds is None else f'{seconds:.2f}'} | {'' if rss is None else f'{rss:.0f}'} |")
    print()
    print(f"reference / ours: {reference_s / ours_s:.1f}x (goal >= 20x)")
    print(f"ours / decode only: {ours_s / decode_s:.2f}x (goal <= 2x)")
    print(f"kept windows: {ours['windows']}; ellipse fallbacks: {ours['ellipse_fallbacks']}")
    print(
        f"reference check: {reference['mismatched_windows']} differing windows out of "
        f"{reference['reference_windows']} on {reference['reference_sample_regions']} regions"
    )


if __name__ == "__main__":
    main()
