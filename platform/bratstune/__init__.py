"""bratstune: hyperparameter search and transfer learning for BraTS-style brain-tumour segmentation.

Importing the package touches no disk, GPU, Ray or MLflow.
"""

__version__ = "0.1.0"
