"""Models: a backbone (ResNet or a timm model, with an FPN) shared by one head per task."""
