"""Measure how annotation granularity changes deep-learning models for nuclei."""

__version__ = "0.1.0"
