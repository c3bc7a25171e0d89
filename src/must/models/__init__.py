"""Models: a ResNet + FPN backbone shared by one head per task."""
