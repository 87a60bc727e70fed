"""Data: CLIP's image preprocessing in PIL + numpy; datasets (built-in synthetic captions, CSV/TSV, webdataset-style
tar shards, image folders); loaders for DDP whose global batch does not depend on the number of ranks or workers."""
import collections
import csv
import io
import math
import os
import re
import tarfile

import numpy as np
import torch
from PIL import Image, ImageDraw

MEAN = np.array((0.48145466, 0.4578275, 0.40821073), dtype=np.float32)  # CLIP's RGB normalisation
STD = np.array((0.26862954, 0.26130258, 0.27577711), dtype=np.float32)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def to_tensor(image):
    """RGB PIL image [R, R] -> normalised float tensor [3, R, R]."""
    arr = (np.asarray(image, dtype=np.float32) / 255.0 - MEAN) / STD  # [R, R, 3]
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def preprocess(image, resolution):
    """CLIP's evaluation transform: RGB, shorter side to `resolution` (bicubic), centre crop, normalise."""
    image = image.convert("RGB")
    w, h = image.size
    if min(w, h) != resolution:  # as torchvision's Resize(int): the longer side is rounded down
        w, h = (resolution, int(resolution * h / w)) if w <= h else (int(resolution * w / h), resolution)
        image = image.resize((w, h), Image.BICUBIC)
    left, top = int(round((w - resolution) / 2.0)), int(round((h - resolution) / 2.0))
    return to_tensor(image.crop((left, top, left + resolution, top + resolution)))


def random_resized_crop(image, resolution, rng, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)):
    """CLIP's training transform (torchvision's RandomResizedCrop): a random area fraction and aspect ratio,
    resized bicubic to [3, R, R]. `rng` is a numpy Generator, so the crop is a function of its seed."""
    image = image.convert("RGB")
    w, h = image.size
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            break
    else:  # no valid crop found: the central square
        cw = ch = min(w, h)
        left, top = (w - cw) // 2, (h - ch) // 2
    return to_tensor(image.resize((resolution, resolution), Image.BICUBIC, box=(left, top, left + cw, top + ch)))

# ---------------------------------------------------------------------------------------------------- synthetic


SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (215, 35, 35), "green": (30, 165, 55), "blue": (35, 75, 225), "yellow": (235, 215, 30),
           "purple": (145, 50, 185)}
SIZES = {"small": 0.26, "large": 0.34}  # radius as a fraction of the image side
POSITIONS = {"left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3), "bottom": (0.5, 0.7), "middle": (0.5, 0.5)}
CAPTIONS = ("a {size} {colour} {shape} {where}.", "{colour} {shape}, {size}, {where}", "the {shape} {where} is {colour}",
            "there is a {size} {shape} coloured {colour}", "{where}: one {colour} {shape}")
WHERE = ("on the {}", "at the {}", "in the {}")
# zero-shot prompts use words no training caption has ("picture", "drawing", "object")
ZEROSHOT_TASKS = {"shape": (SHAPES, ("a picture of a {}.", "a drawing of a {}.")),
                  "colour": (tuple(COLOURS), ("a picture of a {} object.", "a drawing of something {}."))}


def is_heldout(shape, colour, position):
    """20 of the 100 shape/colour/position triples never appear in training; zero-shot accuracy is measured on
    them. Every shape/colour pair is seen in training, but never at its held-out position."""
    return (SHAPES.index(shape) + 2 * list(COLOURS).index(colour) + 3 * list(POSITIONS).index(position)) % 5 == 0


class Synthetic(torch.utils.data.Dataset):
    """Captioned images drawn with PIL, deterministic per index. split="train": the 80 seen shape/colour/position
    triples; split="heldout": the 20 unseen ones. Items: (PIL image, caption, {"shape": i, "colour": j})."""

    def __init__(self, size, resolution=32, split="train", seed=0):
        self.size, self.resolution, self.heldout, self.seed = size, resolution, split == "heldout", seed
        self.triples = [(s, c, p) for s in SHAPES for c in COLOURS for p in POSITIONS if is_heldout(s, c, p) == self.heldout]

    def __len__(self):
        return self.size

    def __getitem__(self, idx):
        rng = np.random.default_rng([self.seed, idx, self.heldout])
        shape, colour, position = self.triples[rng.integers(len(self.triples))]
        size = list(SIZES)[rng.integers(len(SIZES))]
        S = 2 * self.resolution  # drawn at 2x, then downsampled: smooth edges
        # background: a grey gradient in a random direction, with pixel noise (flat backgrounds make all images
        # look alike to a new model, and CLOOB's Hopfield retrieval then stalls at the start)
        ramp = np.linspace(-1, 1, S)
        t = np.cos(rng.uniform(0, 2 * np.pi)) * ramp[None, :] + np.sin(rng.uniform(0, 2 * np.pi)) * ramp[:, None]  # [S, S]
        grey = rng.uniform(60, 200) + rng.uniform(-50, 50) * t[..., None] + rng.normal(0, 12, (S, S, 3))  # [S, S, 3]
        image = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8))
        cx, cy = (S * (p + rng.uniform(-0.04, 0.04)) for p in POSITIONS[position])
        r = S * SIZES[size] * rng.uniform(0.95, 1.05)
        fill = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + rng.integers(-20, 21, 3), 0, 255))
        draw = ImageDraw.Draw(image)
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "square":
            draw.rectangle([cx - 0.9 * r, cy - 0.9 * r, cx + 0.9 * r, cy + 0.9 * r], fill=fill)
        elif shape == "triangle":  # upright, equilateral
            draw.polygon([(cx, cy - 1.2 * r), (cx - 1.04 * r, cy + 0.6 * r), (cx + 1.04 * r, cy + 0.6 * r)], fill=fill)
        else:  # cross: two bars
            draw.rectangle([cx - r, cy - r / 3, cx + r, cy + r / 3], fill=fill)
            draw.rectangle([cx - r / 3, cy - r, cx + r / 3, cy + r], fill=fill)
        caption = self.caption(rng, shape, colour, size, position)
        labels = {"shape": SHAPES.index(shape), "colour": list(COLOURS).index(colour)}
        return image.resize((self.resolution, self.resolution), Image.BICUBIC), caption, labels

    @staticmethod
    def caption(rng, shape, colour, size, position):
        """Every caption names the shape and the colour; like real captions, about half leave out the size and
        half the position. (Captions that left out shape or colour half the time slowed CLOOB down a lot.)"""
        named = rng.random(2) < 0.5  # size, position
        words = dict(colour=colour, shape=shape, size=size if named[0] else "",
                     where=WHERE[rng.integers(len(WHERE))].format(position) if named[1] else "")
        text = CAPTIONS[rng.integers(len(CAPTIONS))].format(**words)
        return re.sub(r"( ?,)+ ?", ", ", " ".join(text.split())).replace(" .", ".").strip(" ,:")  # tidy the gaps

# ---------------------------------------------------------------------------------------------------- files


class CsvCaptions(torch.utils.data.Dataset):
    """Image paths (relative to the file's folder) and captions from a CSV/TSV. Items: (image path, caption, {})."""

    def __init__(self, path, img_key="filepath", caption_key="title", separator=None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"training data not found: {path}")
        separator = separator or ("\t" if path.endswith(".tsv") else ",")
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=separator)
            missing = [k for k in (img_key, caption_key) if k not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: no column {missing[0]!r} (columns: {reader.fieldnames}); "
                                 f"set --csv-img-key / --csv-caption-key / --csv-separator")
            self.rows = [(row[img_key], row[caption_key]) for row in reader]
        if not self.rows:
            raise ValueError(f"{path}: the dataset is empty")
        self.root = os.path.dirname(os.path.abspath(path))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, idx):
        path, caption = self.rows[idx]
        return os.path.join(self.root, path), caption, {}


def open_image(path_or_file):
    """PIL image, fully decoded now so that a corrupt file fails here, not later."""
    image = Image.open(path_or_file)
    image.load()
    return image


def expand_braces(pattern):
    """'dir/{00000..00003}.tar' -> the 4 paths, zero padding kept (the webdataset / img2dataset convention)."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    return [p for i in range(int(lo), int(hi) + 1)
            for p in expand_braces(pattern[:m.start()] + str(i).zfill(len(lo)) + pattern[m.end():])]


def tar_samples(path):
    """(key, image file bytes, caption) of each sample of a webdataset-style shard: members KEY.jpg|png|webp
    and KEY.txt, adjacent. A sample missing its image or caption yields None in that place."""
    group, key = {}, None
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            stem, ext = os.path.splitext(member.name)
            if stem != key and group:
                yield key, group.get("image"), group.get("txt")
                group = {}
            key, ext = stem, ext.lower()
            if ext in IMAGE_EXTS or ext == ".txt":
                group["image" if ext != ".txt" else "txt"] = tar.extractfile(member).read()
    if group:
        yield key, group.get("image"), group.get("txt")

# ---------------------------------------------------------------------------------------------------- loading


def load_sample(item, transform):
    """(image tensor, caption) from an item (PIL image, path or file; caption; labels), or ValueError naming
    why it is unusable."""
    image, caption, _ = item
    if image is None:
        raise ValueError("missing image")
    try:
        image = image if isinstance(image, Image.Image) else open_image(image)
    except FileNotFoundError:
        raise ValueError("missing image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise ValueError("corrupt image") from None
    if not caption or not caption.strip():
        raise ValueError("empty caption")
    return transform(image), caption


class TrainSet(torch.utils.data.Dataset):
    """Map-style training samples keyed by (step, index): the crop is seeded by (seed, step, index), so a
    sample's augmentation does not depend on which rank or worker loads it. An unusable item is replaced by
    the next usable index (deterministically) and counted."""

    def __init__(self, dataset, resolution, seed=0):
        self.dataset, self.resolution, self.seed = dataset, resolution, seed

    def __getitem__(self, key):
        step, idx = key
        skipped = collections.Counter()
        for tries in range(100):
            i = (idx + tries) % len(self.dataset)
            rng = np.random.default_rng([self.seed, step, i])
            try:
                image, caption = load_sample(self.dataset[i], lambda im: random_resized_crop(im, self.resolution, rng))
                return image, caption, skipped
            except ValueError as e:
                skipped[str(e)] += 1
        raise ValueError(f"100 unusable samples in a row from index {idx} ({dict(skipped)}): check the dataset")


def collate(samples):
    """[(image, caption, skipped)] -> (images [B, 3, R, R], captions, skipped counts of the batch)."""
    images, captions, skipped = zip(*samples)
    return torch.stack(images), list(captions), sum(skipped, collections.Counter())


class GlobalBatches(torch.utils.data.Sampler):
    """This rank's slice of each global batch. Epoch e is a permutation seeded by (seed, e), cut into global
    batches of world*batch_size; rank r takes rows [r*batch_size, (r+1)*batch_size). Infinite, from `start`."""

    def __init__(self, num_samples, batch_size, rank=0, world=1, seed=0, start=0):
        self.n, self.batch_size, self.rank, self.world, self.seed, self.start = num_samples, batch_size, rank, world, seed, start
        self.steps_per_epoch = num_samples // (batch_size * world)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{num_samples} samples are fewer than one global batch of {batch_size * world}")

    def __iter__(self):
        step, perm = self.start, None
        while True:
            epoch, b = divmod(step, self.steps_per_epoch)
            if b == 0 or perm is None:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            first = (b * self.world + self.rank) * self.batch_size
            yield [(step, int(i)) for i in perm[first:first + self.batch_size]]
            step += 1


class TarShards(torch.utils.data.IterableDataset):
    """Webdataset-style shards split over ranks and workers without overlap, looped over forever (shard order
    reshuffled each pass); yields whole batches (images, captions, skipped).
    DataLoader takes batches from its workers in turn, so step s is made by "slot" s % workers of this rank:
    worker w of a run resumed at `start` plays slot (start + w) % workers and first skips the batches that
    slot made before `start` (counting samples without decoding them: exact unless images are corrupt)."""

    def __init__(self, pattern, batch_size, resolution=224, rank=0, world=1, seed=0, start=0):
        self.shards = expand_braces(pattern)
        missing = [s for s in self.shards if not os.path.isfile(s)]
        if missing:
            raise FileNotFoundError(f"training shard not found: {missing[0]} ({len(missing)} of {len(self.shards)} missing)")
        self.batch_size, self.resolution, self.rank, self.world, self.seed, self.start = batch_size, resolution, rank, world, seed, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers = info.num_workers if info else 1
        slot = (self.start + (info.id if info else 0)) % workers
        shards = self.shards[self.rank * workers + slot::self.world * workers]
        if not shards:
            raise ValueError(f"{len(self.shards)} shards cannot feed {self.world} ranks x {workers} workers")
        step, skip = self.start + (slot - self.start) % workers, len(range(slot, self.start, workers)) * self.batch_size
        images, captions, skipped, usable = [], [], collections.Counter(), 0
        for epoch in range(10 ** 9):
            if epoch and not usable:  # a whole pass over the shards without one usable sample: never hang
                raise ValueError(f"no usable sample in {len(shards)} shards ({dict(skipped)})")
            usable = 0
            for shard in (shards[i] for i in np.random.default_rng([self.seed, epoch, self.rank, slot]).permutation(len(shards))):
                for key, image, caption in tar_samples(shard):
                    caption = (caption or b"").decode("utf-8", "replace")
                    if skip:  # fast-forward
                        usable += image is not None and bool(caption.strip())
                        skip -= image is not None and bool(caption.strip())
                        continue
                    rng = np.random.default_rng([self.seed, step, len(images), self.rank])
                    try:
                        image, caption = load_sample((image and io.BytesIO(image), caption, {}),
                                                     lambda im: random_resized_crop(im, self.resolution, rng))
                    except ValueError as e:
                        skipped[str(e)] += 1
                        continue
                    usable += 1
                    images.append(image)
                    captions.append(caption)
                    if len(images) == self.batch_size:
                        yield torch.stack(images), captions, skipped
                        images, captions, skipped, step = [], [], collections.Counter(), step + workers


class ImageFolder(torch.utils.data.Dataset):
    """One sub-folder per class (sorted). Items: (path, class folder name, {"label": class index})."""

    def __init__(self, root):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder not found: {root}")
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.items = [(os.path.join(root, c, f), i) for i, c in enumerate(self.classes)
                      for f in sorted(os.listdir(os.path.join(root, c))) if f.lower().endswith(IMAGE_EXTS)]
        if not self.items:
            raise ValueError(f"{root}: no images in class sub-folders")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, idx):
        path, label = self.items[idx]
        return path, self.classes[label], {"label": label}
