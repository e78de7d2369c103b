"""Benchmark of the prepare step on consep-256: package vs plain reference vs decoding alone.

Each phase runs in its own Python process, so its peak resident memory
(``ru_maxrss``) and its CPU time (user + system, all threads) are its own:

- ``baseline``: imports only, the memory floor of the other phases;
- ``decode``: ``read_regions`` alone (images and labels, on the reader's
  thread pool);
- ``cold``: ``prepare_dataset`` without a cache: decoding, hashing the
  input, deriving the ellipse and box maps and labelling the windows of
  every granularity and patch size (on a thread pool), and the tables;
- ``serial``: the same with the conversion on one thread, to show what the
  thread pool adds;
- ``write``: ``prepare_dataset`` into an empty cache folder (a cache miss
  that writes the entry); the entry is kept for ``warm``;
- ``warm``: ``prepare_dataset`` on that entry (a cache hit);
- ``reference``: ``read_regions``, then ``reference_prepare`` on every
  ``--reference-step``-th region. Its time is scaled to all regions by the
  region count, which makes it an estimate when the step is above 1.

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
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = PROJECT_ROOT.parent / "shared" / "datasets" / "consep-256"
CLASS_MAP = PROJECT_ROOT / "mlproject" / "class_maps" / "consep.yaml"
PATCH_SIZES = (32, 64, 128)
GRANULARITIES = ("pw", "el", "bd")
TIMED_PHASES = ("decode", "cold", "serial", "write", "warm")


def peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_phase(phase: str, dataset: Path, reference_step: int, cache: Path) -> dict:
    """Run one phase in this process and return its timings, counts and peak memory."""
    sys.path.insert(0, str(PROJECT_ROOT / "bench"))
    from reference_prepare import prepare_region

    import numpy as np
    from scipy import ndimage

    import granularity.data.prepared as prepared
    from granularity.data.class_map import ClassMap
    from granularity.data.granularity import derive_granularities, fit_ellipse
    from granularity.data.patches import window_labels
    from granularity.data.readers import read_regions

    class_map = ClassMap.load(CLASS_MAP)
    result: dict = {"phase": phase}
    if phase == "baseline":
        result["peak_rss_mib"] = peak_rss_mib()
        return result

    if phase == "serial":
        # One worker: every region is converted on this thread.
        prepared.map_in_threads = lambda function, items, desc: [function(item) for item in items]

    wall, cpu = time.perf_counter(), cpu_seconds()
    if phase == "decode":
        regions = read_regions(dataset, "consep", class_map)
        result["regions"] = len(regions)
    elif phase in ("cold", "serial", "write", "warm"):
        options = {"use_cache": False} if phase in ("cold", "serial") else {"cache_root": cache}
        done = prepared.prepare_dataset(dataset, "consep", class_map, patch_sizes=PATCH_SIZES, **options)
        result.update(
            regions=len(done.regions),
            cache_hit=done.cache_hit,
            timings=done.timings,
            windows=sum(len(table) for table in done.windows.values()),
            ellipse_fallbacks=done.ellipse_fallbacks,
        )
    result["wall_s"] = time.perf_counter() - wall
    result["cpu_s"] = cpu_seconds() - cpu
    result["peak_rss_mib"] = peak_rss_mib()

    if phase == "serial":
        # The floor of the conversion: cropping, tracing contours and fitting ellipses, nothing else (not included above).
        start = time.perf_counter()
        for region in done.regions:
            for index, box in enumerate(ndimage.find_objects(region.instances)):
                if box is not None:
                    fit_ellipse((region.instances[box] == index + 1).view(np.uint8), box[1].start, box[0].start)
        result["fit_floor_s"] = time.perf_counter() - start

    if phase == "reference":
        regions = read_regions(dataset, "consep", class_map)
        result["decode_s"] = time.perf_counter() - wall
        result["regions"] = len(regions)
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
        result.update(reference_windows=total, mismatched_windows=mismatched, peak_rss_mib=peak_rss_mib())
    return result


def run_child(phase: str, args: argparse.Namespace, cache: Path) -> dict:
    command = [
        sys.executable, __file__, "--phase", phase, "--dataset", str(args.dataset),
        "--reference-step", str(args.reference_step), "--cache", str(cache),
    ]
    env = dict(os.environ, TQDM_DISABLE="1")
    completed = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def warm_file_cache(dataset: Path) -> None:
    """Read every dataset file once, so no phase pays for a cold disk cache."""
    for path in sorted(dataset.rglob("*")):
        if path.is_file():
            path.read_bytes()


def median_run(runs: list[dict]) -> dict:
    """Return the run with the median wall time (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda run: run["wall_s"])
    return ordered[(len(ordered) - 1) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, help="consep-256 folder")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the timed phases; the median is reported")
    parser.add_argument("--reference-step", type=int, default=8, help="time the reference on every n-th region and scale")
    parser.add_argument("--skip-reference", action="store_true", help="leave out the reference phase")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench" / "results" / "prepare.json", help="JSON file for the results")
    parser.add_argument("--phase", choices=("baseline", "reference") + TIMED_PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase:
        print(json.dumps(run_phase(args.phase, args.dataset, args.reference_step, args.cache)))
        return

    warm_file_cache(args.dataset)
    baseline = run_child("baseline", args, Path("."))
    load_before = os.getloadavg()

    # Rounds run the phases in turn, so that load from other processes hits all of them alike.
    runs: dict[str, list[dict]] = {phase: [] for phase in TIMED_PHASES}
    for _ in range(args.repeat):
        cache = Path(tempfile.mkdtemp(prefix="bench-prepare-cache-"))
        try:
            for phase in TIMED_PHASES:
                runs[phase].append(run_child(phase, args, cache))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    reference = None if args.skip_reference else run_child("reference", args, Path("."))
    load_after = os.getloadavg()

    medians = {phase: median_run(phase_runs) for phase, phase_runs in runs.items()}
    decode = medians["decode"]
    rows = [("decode only (read_regions)", decode)]
    rows += [(f"{phase}: {text}", medians[phase]) for phase, text in (
        ("cold", "prepare_dataset, no cache"),
        ("serial", "the same, conversion on one thread"),
        ("write", "cache miss, writes the entry"),
        ("warm", "cache hit"),
    )]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"load average (1, 5, 15 min) before {', '.join(f'{v:.1f}' for v in load_before)}, after {', '.join(f'{v:.1f}' for v in load_after)}")
    print(f"dataset: {args.dataset} ({decode['regions']} regions), {len(PATCH_SIZES)} patch sizes x {len(GRANULARITIES)} granularities")
    print(f"median of {args.repeat} rounds by wall time")
    print()
    print("| phase | wall (s) | CPU (s) | / decode (wall) | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for name, run in rows:
        print(f"| {name} | {run['wall_s']:.2f} | {run['cpu_s']:.2f} | {run['wall_s'] / decode['wall_s']:.2f} | {run['peak_rss_mib']:.0f} |")
    print(f"| imports only | | | | {baseline['peak_rss_mib']:.0f} |")
    print()
    for phase in ("cold", "serial", "warm"):
        steps = ", ".join(f"{name} {seconds:.2f}" for name, seconds in medians[phase]["timings"].items())
        print(f"{phase} steps (s): {steps}")
    print(f"crop + findContours + fitEllipse alone, one thread: {medians['serial']['fit_floor_s']:.2f} s")
    print(f"kept windows: {medians['cold']['windows']}; ellipse fallbacks: {medians['cold']['ellipse_fallbacks']}")

    record = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in load_after],
        "repeat": args.repeat,
        "baseline_rss_mib": round(baseline["peak_rss_mib"], 1),
        "runs": runs,
    }
    if reference is not None:
        reference_scaled = reference["reference_sample_s"] * reference["regions"] / reference["reference_sample_regions"]
        reference_s = reference["decode_s"] + reference_scaled
        print(
            f"reference (1 in {args.reference_step} regions, scaled to all): {reference_s:.2f} s, "
            f"peak RSS {reference['peak_rss_mib']:.0f} MiB"
        )
        print(f"reference / cold: {reference_s / medians['cold']['wall_s']:.1f}x (goal >= 20x)")
        print(
            f"reference check: {reference['mismatched_windows']} differing windows out of "
            f"{reference['reference_windows']} on {reference['reference_sample_regions']} regions"
        )
        record["reference"] = dict(reference, scaled_s=round(reference_s, 2))
    print(f"cold / decode only: {medians['cold']['wall_s'] / decode['wall_s']:.2f}x (goal <= 2x)")
    print(f"warm / decode only: {medians['warm']['wall_s'] / decode['wall_s']:.2f}x")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
