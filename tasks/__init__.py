"""End-to-end jobs (restore, generate, edit, benchmark, calibrate), metrics, image I/O and the CLI."""

from .image_io import load_image, save_image, to_pil, write_atomic

__all__ = ["load_image", "save_image", "to_pil", "write_atomic"]
