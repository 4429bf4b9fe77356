"""Rebuild the example photos in this folder from scikit-image's bundled data (public-domain / CC0 only).

    pip install scikit-image pillow
    python demos/images/make_images.py          # writes <name>.png next to this file

Each photo is center-cropped to a square and resized to 256x256 (Lanczos), then saved as an optimised PNG.
The licence of every file is recorded in README.md.
"""

from pathlib import Path

from PIL import Image
from skimage import data

NAMES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field")
SIZE = 256


def square(image: Image.Image, size: int = SIZE) -> Image.Image:
    """The central square of ``image``, resized to size x size."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)


if __name__ == "__main__":
    folder = Path(__file__).resolve().parent
    for name in NAMES:
        path = folder / f"{name}.png"
        square(Image.fromarray(getattr(data, name)()).convert("RGB")).save(path, optimize=True)
        print(f"{path.name}: {path.stat().st_size // 1024} KB")
