"""Architecture factory and named layer groups."""
