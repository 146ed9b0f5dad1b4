"""File extensions a dataset may hold, in one place and without torch: the ImageFolder scan
(:mod:`raytimm.data.folder`) accepts these images, and the storage preflight looks for them."""
from __future__ import annotations

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DICE_ANNOTATION_EXTENSIONS = (".json",)  # a DICE export's annotations/*.json
