"""What every command writes: image I/O (image_io.py), captioned image grids (grid.py), bar charts (plots.py),
image-quality metrics (metrics.py) and result folders that never overwrite unasked (folders.py)."""
