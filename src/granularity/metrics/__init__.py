"""Classification and segmentation metrics, computed with torchmetrics."""
