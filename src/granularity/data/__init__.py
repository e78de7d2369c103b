"""Datasets: readers, the canonical Region, granularity conversion and patches."""
