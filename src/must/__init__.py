"""must: multi-task self-training (MuST) for computer vision."""

__version__ = "0.1.0"
