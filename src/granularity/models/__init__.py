"""Classifier and segmenter factories, and pretrained-weight lookup."""
