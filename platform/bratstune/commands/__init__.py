"""Sub-commands of the `bratstune` console script (one module each)."""
