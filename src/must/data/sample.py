"""What one rendered scene yields: the image and its exactly derived labels (NumPy arrays)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SceneSample:
    """One rendered image with every label, all aligned pixel for pixel.

    Conventions (also documented in docs/data.md):
    - camera coordinates are OpenCV's: x right, y down, z forward;
    - ``depth`` is the distance along the camera's z axis in metres, 0 where no surface was hit;
    - ``normals`` are unit vectors in camera coordinates facing the camera, (0, 0, 0) where
      no surface was hit;
    - ``instances`` holds 0 for "no object" and k >= 1 for the k-th object of the scene;
    - ``semantic`` indexes the style's segmentation vocabulary (stuff classes first, then
      object categories);
    - ``boxes`` are tight [x1, y1, x2, y2] pixel boxes around each kept object's visible
      pixels, x2/y2 exclusive (so a one-pixel object at (3, 5) has box [3, 5, 4, 6]);
    - ``box_labels`` index the style's object categories; ``box_instances`` give the value of
      each box's object in ``instances``;
    - ``image_label`` indexes the object categories: the category of the most prominent object.
    """

    image: np.ndarray  # (H, W, 3) uint8 RGB
    depth: np.ndarray  # (H, W) float32, metres
    normals: np.ndarray  # (H, W, 3) float32
    instances: np.ndarray  # (H, W) int32
    semantic: np.ndarray  # (H, W) uint8
    boxes: np.ndarray  # (N, 4) float32
    box_labels: np.ndarray  # (N,) int64
    box_instances: np.ndarray  # (N,) int32
    image_label: int

    def instance_masks(self) -> np.ndarray:
        """(N, H, W) bool masks, one per box, in box order."""
        return self.instances[None] == self.box_instances[:, None, None]
