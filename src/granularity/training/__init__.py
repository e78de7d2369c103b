"""Training: the shared loop, checkpoints, devices, and one runner per task."""
