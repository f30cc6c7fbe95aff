"""Data layer: case discovery, synthetic cohorts, preprocessing, cache, sampling, augmentation."""
