"""Data: CLIP's image preprocessing in PIL + numpy (datasets and loaders come with the training issue)."""
import numpy as np
import torch
from PIL import Image

MEAN = np.array((0.48145466, 0.4578275, 0.40821073), dtype=np.float32)  # CLIP's RGB normalisation
STD = np.array((0.26862954, 0.26130258, 0.27577711), dtype=np.float32)


def to_tensor(image):
    """RGB PIL image [R, R] -> normalised float tensor [3, R, R]."""
    arr = (np.asarray(image, dtype=np.float32) / 255.0 - MEAN) / STD  # [R, R, 3]
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def preprocess(image, resolution):
    """CLIP's evaluation transform: RGB, shorter side to `resolution` (bicubic), centre crop, normalise."""
    image = image.convert("RGB")
    w, h = image.size
    short = min(w, h)
    if short != resolution:  # as torchvision's Resize(int): the longer side is rounded down
        w, h = (resolution, int(resolution * h / w)) if w <= h else (int(resolution * w / h), resolution)
        image = image.resize((w, h), Image.BICUBIC)
    left, top = int(round((w - resolution) / 2.0)), int(round((h - resolution) / 2.0))
    return to_tensor(image.crop((left, top, left + resolution, top + resolution)))
