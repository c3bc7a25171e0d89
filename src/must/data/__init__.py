"""Data layer: the procedural scene world, on-disk formats, readers and joint augmentation."""
