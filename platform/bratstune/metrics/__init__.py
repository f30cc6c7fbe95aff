"""Segmentation metrics: BraTS lesion-wise (2023 and 2026 protocols) and legacy."""
