"""Data: CLIP's image preprocessing in PIL + numpy; datasets (built-in synthetic captions, CSV/TSV, webdataset-style tar
shards, image folders); loaders for DDP whose global batch does not depend on the number of ranks or workers."""
import csv
import io
import itertools
import math
import os
import pathlib
import re
import signal
import tarfile
import threading
import zlib
from collections import Counter
from functools import partial

import numpy as np
from numpy.random import default_rng
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from PIL import Image, ImageDraw

MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's RGB normalisation
STD = (0.26862954, 0.26130258, 0.27577711)
# torchvision's ImageFolder
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TAR_EXTS = (".tar", ".tar.gz")  # webdataset shards, plain or gzipped
# a tar member's extension -> what it holds
MEMBER_KINDS = {".txt": "txt", **dict.fromkeys(IMAGE_EXTS, "image")}
# cluster preemption (SLURM's --signal sends SIGUSR1 ahead of time) and Ctrl-C: train.py saves and stops
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def channels_first(pixels):
    """RGB pixels [..., R, R, 3] (a PIL image or an array; uint8 or float) -> tensor [..., 3, R, R], not normalised:
    training batches travel as uint8 (4x less to copy) and are normalised on the device by train.py."""
    return torch.from_numpy(np.array(pixels)).movedim(-1, -3)


def normalize(pixels):
    """Pixels [..., 3, R, R] in 0..255 -> CLIP's normalised float tensor. The channel statistics enter as scalars: no
    host-to-device copy, which would make every training step wait for the device."""
    x = pixels.float() / 255
    return torch.stack([(x[..., c, :, :] - MEAN[c]) / STD[c] for c in range(3)], dim=-3)


def to_rgb(image):
    """Any PIL mode -> RGB. 16-bit greyscale is scaled to 8 bits first (PIL's convert would clip it to white)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).clip(0, 255).round().astype(np.uint8))
    return image.convert("RGB")


def preprocess(image, resolution):
    """OpenAI's evaluation transform in its order: shorter side to `resolution` (bicubic; Pillow resizes palette images
    with NEAREST and RGBA with premultiplied alpha, as there), centre crop, then RGB, normalise."""
    # as torchvision's Resize(int): the longer side is rounded down; at the size already: a copy
    w, h = image.size
    w, h = (resolution, int(resolution * h / w)) if w <= h else (int(resolution * w / h), resolution)
    image = image.resize((w, h), Image.BICUBIC)
    # as torchvision's CenterCrop
    left, top = round((w - resolution) / 2), round((h - resolution) / 2)
    image = image.crop((left, top, left + resolution, top + resolution))
    return normalize(channels_first(to_rgb(image)))


def crop_box(width, height, rng):
    """torchvision's RandomResizedCrop.get_params at CLIP's scale (0.9, 1) and ratio (3/4, 4/3): up to 10 draws of an
    area fraction and a log-uniform aspect ratio until the crop fits, else the central crop of the nearest allowed
    aspect ratio. -> (left, top, right, bottom)."""
    for _ in range(10):
        area = width * height * rng.uniform(0.9, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    w, h = min(width, round(height * 4 / 3)), min(height, round(width * 4 / 3))
    return (width - w) // 2, (height - h) // 2, (width - w) // 2 + w, (height - h) // 2 + h


def random_resized_crop(image, resolution, rng):
    """CLIP's training transform: a crop_box resized bicubic to uint8 [3, R, R]. `rng` is a numpy Generator, so the crop
    is a function of its seed. A JPEG not yet decoded is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps at
    least R pixels across the crop (PIL's draft mode: several times faster on large photos)."""
    width, height = image.size
    box = crop_box(width, height, rng)
    reduce = min(box[2] - box[0], box[3] - box[1]) // resolution
    if reduce > 1 and image.format == "JPEG":
        # any size at least this
        image.draft("RGB", (math.ceil(width / reduce), math.ceil(height / reduce)))
    sx, sy = image.size[0] / width, image.size[1] / height
    box = [v * s for v, s in zip(box, (sx, sy, sx, sy))]
    return channels_first(to_rgb(image.resize((resolution, resolution), Image.BICUBIC, box=box)))

# ---------------------------------------------------------------------------------------------------- synthetic


# each shape is a regular polygon: (sides, rotation in degrees), as PIL's ImageDraw.regular_polygon draws it
POLYGONS = {"circle": (64, 0), "square": (4, 0), "triangle": (3, 0), "diamond": (4, 45)}
SHAPES = tuple(POLYGONS)
COLOURS = {"red": (215, 35, 35), "green": (30, 165, 55), "blue": (35, 75, 225),
           "yellow": (235, 215, 30), "purple": (145, 50, 185)}
SIZES = {"small": 0.26, "large": 0.34}  # radius as a fraction of the image side
POSITIONS = {"left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3), "bottom": (0.5, 0.7),
             "middle": (0.5, 0.5)}
CAPTIONS = ("a {size} {colour} {shape} {where}.", "{colour} {shape}, {size}, {where}",
            "the {shape} {where} is {colour}", "there is a {size} {shape} coloured {colour}",
            "{where}: one {colour} {shape}")
WHERE = ("on the {}", "at the {}", "in the {}")
# zero-shot prompts use words no training caption has ("picture", "drawing", "image", "photo", "object", ...); five
# of them per task (prompt ensembling, as CLIP's) make the accuracy depend less on how one prompt happens to read
SHAPE_PROMPTS = ("a picture of a {}.", "a drawing of a {}.", "an image with a {} in it.",
                 "a {} drawn in a picture.", "a photo of one {}.")
COLOUR_PROMPTS = ("a picture of a {} object.", "a drawing of something {}.", "an image of something {}.",
                  "a {} thing in a picture.", "a photo of a {} object.")
ZEROSHOT_TASKS = {"shape": (SHAPES, SHAPE_PROMPTS), "colour": (tuple(COLOURS), COLOUR_PROMPTS)}


def is_heldout(shape, colour, position):
    """20 of the 100 shape/colour/position triples never appear in training; zero-shot accuracy is measured on
    them. Every shape/colour pair is seen in training, but never at its held-out position."""
    index = SHAPES.index(shape) + 2 * list(COLOURS).index(colour) + 3 * list(POSITIONS).index(position)
    return index % 5 == 0


class Synthetic(Dataset):
    """Captioned images of coloured shapes (backgrounds made a batch at a time with array operations), deterministic
    per index. split="train": the 80 seen shape/colour/position triples; split="heldout": the 20 unseen ones.
    Indexed by a list of (step, index) keys, as data.global_batches makes them: -> (images, captions, skipped, None)."""

    def __init__(self, size, resolution=32, split="train", seed=0):
        self.size, self.resolution, self.seed = size, resolution, seed
        self.heldout = split == "heldout"
        triples = [(s, c, p) for s in SHAPES for c in COLOURS for p in POSITIONS]
        self.triples = [t for t in triples if is_heldout(*t) == self.heldout]

    def __len__(self):
        return self.size

    def __getitem__(self, keys):
        pixels, captions, _ = self.render([idx for _, idx in keys])
        return channels_first(pixels), captions, Counter(), None  # float 0..255; no stream position

    def render(self, indices):
        """-> (RGB pixels as float32 [n, R, R, 3] in 0..255, captions, labels {"shape": [n], "colour": [n]})."""
        R = self.resolution
        rngs = [default_rng([self.seed, idx, self.heldout]) for idx in indices]
        # [n, 10]: all but noise and caption
        u = np.stack([rng.random(10, dtype=np.float32) for rng in rngs])
        shape, colour, position = zip(*(self.triples[int(t * len(self.triples))] for t in u[:, 0]))
        size = [list(SIZES)[int(t * len(SIZES))] for t in u[:, 1]]
        # [n, 2] (x, y)
        centre = np.array([POSITIONS[p] for p in position], np.float32) + 0.08 * (u[:, 2:4] - 0.5)
        radius = np.array([SIZES[s] for s in size], np.float32) * (0.95 + 0.1 * u[:, 4])  # [n]
        fill = np.array([COLOURS[c] for c in colour], np.float32) + 40 * (u[:, 5:8] - 0.5)  # [n, 3]
        # background: a grey gradient in a random direction with pixel noise (flat backgrounds make all images look
        # alike to a new model, and CLOOB's Hopfield retrieval then stalls at the start)
        ramp = np.linspace(-1, 1, R, dtype=np.float32)
        angle = 2 * np.pi * u[:, 8, None, None]
        # [n, R, R]
        slope = np.cos(angle) * ramp[None, None, :] + np.sin(angle) * ramp[None, :, None]
        noise = np.stack([rng.random((R, R, 3), dtype=np.float32) for rng in rngs])  # [n, R, R, 3]
        # [n, R, R, 3]
        background = (40 + 140 * u[:, 9, None, None] + 50 * slope)[..., None] + 40 * noise
        # the shape's coverage of each pixel: drawn at twice the size, then each 2 x 2 block averaged (smooth edges)
        alpha = []
        for name, (x, y), r in zip(shape, centre.tolist(), radius.tolist()):
            canvas = Image.new("L", (2 * R, 2 * R))
            ImageDraw.Draw(canvas).regular_polygon((2 * R * x, 2 * R * y, 2 * R * r), *POLYGONS[name], fill=255)
            alpha.append(np.asarray(canvas.reduce(2), np.float32)[..., None] / 255)  # [R, R, 1]
        pixels = background + np.stack(alpha) * (fill[:, None, None, :] - background)  # [n, R, R, 3]
        captions = list(map(self.caption, rngs, shape, colour, size, position))
        labels = dict(shape=np.array([SHAPES.index(s) for s in shape]),
                      colour=np.array([list(COLOURS).index(c) for c in colour]))
        return np.clip(pixels, 0, 255, out=pixels), captions, labels

    @staticmethod
    def caption(rng, shape, colour, size, position):
        """Every caption names the shape and the colour; like real captions, about half leave out the size and
        half the position. (Captions that left out shape or colour half the time slowed CLOOB down a lot.)"""
        named = rng.random(2) < 0.5  # size, position
        words = dict(colour=colour, shape=shape, size=size if named[0] else "",
                     where=WHERE[rng.integers(len(WHERE))].format(position) if named[1] else "")
        text = CAPTIONS[rng.integers(len(CAPTIONS))].format(**words)
        # tidy the gaps
        return re.sub(r"( ?,)+ ?", ", ", " ".join(text.split())).replace(" .", ".").strip(" ,:")

# ---------------------------------------------------------------------------------------------------- files


def csv_arguments(parser):
    """train.py's and zeroshot.py's flags for CSV/TSV files (OpenCLIP's names)."""
    parser.add_argument("--csv-img-key", default="filepath")
    parser.add_argument("--csv-caption-key", default="title")
    parser.add_argument("--csv-separator", type=one_character)  # default: tab for .tsv, comma otherwise


def one_character(text):
    """--csv-separator: one character; \\t, as typed in a shell, is a tab. (argparse names the flag and this.)"""
    text = text.replace("\\t", "\t")
    if len(text) != 1:
        raise ValueError(text)
    return text


class CsvCaptions(Dataset):
    """Image paths (relative to the file's folder) and captions from a CSV/TSV. Items: (image path, caption,
    {"image": id of the row's image}); a row without the field gives None there (the sample is skipped and counted)."""

    def __init__(self, path, img_key="filepath", caption_key="title", separator=None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file not found: {path}")
        try:  # a byte-order mark, as spreadsheet programs write, is dropped
            text = pathlib.Path(path).read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
        separator = separator or ("\t" if path.endswith(".tsv") else ",")
        # tab-separated lines carry quotes as text (CC3M's captions do); a CSV's fields may be quoted
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=separator,
                                quoting=csv.QUOTE_NONE if separator == "\t" else csv.QUOTE_MINIMAL)
        columns = reader.fieldnames or []
        missing = [k for k in (img_key, caption_key) if k not in columns]
        if missing or len(set(columns)) < len(columns):
            problem = f"no column {missing[0]!r}" if missing else "a column name given twice"
            raise ValueError(f"{path}: {problem} (columns: {columns}); "
                             f"set --csv-img-key / --csv-caption-key / --csv-separator")
        self.rows, root = [], os.path.dirname(os.path.abspath(path))
        for row in reader:
            # None where a short row lacks the field
            image, caption = row[img_key], row[caption_key]
            if "\n" in f"{image}{caption}" or "\r" in f"{image}{caption}":
                raise ValueError(f"{path}, line {reader.line_num}: a field spans lines (no end quote?)")
            if image is not None:  # relative to the file's folder
                image = os.path.join(root, image)
            self.rows.append((image, caption))
        if not self.rows:
            raise ValueError(f"{path}: the dataset is empty")
        # rows that name one image file, however the path is spelled, share its id (several captions per image)
        files = [os.path.realpath(image) if image else "" for image, _ in self.rows]
        self.image_ids = np.unique(files, return_inverse=True)[1].tolist()

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, idx):
        return *self.rows[idx], {"image": self.image_ids[idx]}


class ImageFolder(Dataset):
    """One sub-folder per class (sorted), images found at any depth below it. Items: (path, class folder name,
    {task: class index}), the task named after the folder. A class folder without images stays a candidate label."""

    def __init__(self, root):
        self.task = os.path.basename(os.path.normpath(root))
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder not found: {root}")
        self.classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
        self.items = [(path, i) for i, c in enumerate(self.classes) for path in find_images(os.path.join(root, c))]
        if not self.items:
            raise ValueError(f"{root}: no images in class sub-folders ({' '.join(IMAGE_EXTS)})")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, idx):
        path, label = self.items[idx]
        return path, self.classes[label], {self.task: label}


def find_images(folder):
    found = (os.path.join(d, f) for d, _, files in os.walk(folder, followlinks=True) for f in files)
    return sorted(f for f in found if f.lower().endswith(IMAGE_EXTS))


def load_sample(item, transform):
    """(transform(image), caption) from an item (image path or file; caption; labels), or a ValueError naming why it is
    unusable. The transform gets the image opened but not decoded (a training crop may decode a JPEG reduced)."""
    image, caption, _ = item
    if isinstance(image, str) and "://" in image:
        raise ValueError("image is a URL (download the images first, e.g. with img2dataset)")
    if image is None:
        raise ValueError("missing image")
    if not (caption or "").strip():  # None: a short CSV row
        raise ValueError("no caption")
    try:
        with Image.open(image) as opened:
            return transform(opened), caption
    except FileNotFoundError:
        raise ValueError("missing image") from None
    except IsADirectoryError:
        raise ValueError("a directory, not an image") from None
    except Image.DecompressionBombError:
        raise ValueError("image too large (over Pillow's decompression-bomb limit)") from None
    except (OSError, SyntaxError, ValueError):
        raise ValueError("corrupt image") from None


class TrainSet(Dataset):
    """A file dataset's training batches, indexed by a list of (step, index) keys: the crop of a sample is seeded
    by (seed, step, index), so its augmentation does not depend on which rank or worker loads it. An unusable
    item is replaced by the next usable index (deterministically) and counted. -> (images, captions, skipped, None):
    no stream position (the keys are the position)."""

    def __init__(self, dataset, resolution, seed=0):
        self.dataset, self.resolution, self.seed = dataset, resolution, seed

    def __getitem__(self, keys):
        images, captions, skipped = [], [], Counter()
        for step, idx in keys:
            for tries in range(100):
                i = (idx + tries) % len(self.dataset)
                rng = default_rng([self.seed, step, i])
                try:
                    crop = partial(random_resized_crop, resolution=self.resolution, rng=rng)
                    image, caption = load_sample(self.dataset[i], crop)
                    break
                except ValueError as e:
                    skipped[str(e)] += 1
            else:
                raise ValueError(f"100 unusable samples in a row from index {idx}: {dict(skipped)}")
            images.append(image)
            captions.append(caption)
        return torch.stack(images), captions, skipped, None


def worker_signals(worker_id):
    """Every loader's worker_init_fn (training and evaluation): workers leave a stop signal sent to the whole process
    group (SLURM, `timeout`, Ctrl-C) to the main process (train.py finishes its step and saves); the main process's
    own SIGTERM (as at its exit) ends them at once. (Linux; where there is no sigwaitinfo, as on macOS, workers keep
    PyTorch's own signal handling.)"""
    if hasattr(signal, "sigwaitinfo"):
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        threading.Thread(target=_exit_on_sigterm_from_parent, daemon=True).start()


def _exit_on_sigterm_from_parent():
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != os.getppid():
        pass
    os._exit(0)


def steps_per_epoch(num_samples, global_batch):
    if num_samples < global_batch:
        raise ValueError(f"{num_samples} samples are fewer than one global batch of {global_batch}")
    return num_samples // global_batch


def global_batches(num_samples, batch_size, rank=0, world=1, seed=0, start=0, accum_steps=1):
    """This rank's share of each global batch, as a list of (step, index) keys. Epoch e is a permutation seeded by
    (seed, e), cut into global batches of world*batch_size. Cut into `accum_steps` micro-batches (gradient caching),
    micro-batch k of each rank holds its share of the global batch's micro-batch k: the ranks together normalise
    (--sync-bn) what one process would. Without: rank r takes rows [r*batch_size, (r+1)*batch_size). Infinite, from
    step `start`: a generator, which DataLoader takes as its sampler."""
    per_epoch = steps_per_epoch(num_samples, batch_size * world)
    for step in itertools.count(start):
        epoch, b = divmod(step, per_epoch)
        if b == 0 or step == start:
            perm = default_rng([seed, epoch]).permutation(num_samples)
        rows = perm[b * world * batch_size:(b + 1) * world * batch_size]  # the global batch
        mine = rows.reshape(accum_steps, world, -1)[:, rank]  # [micro-batches, rows of each]
        yield [(step, int(i)) for i in mine.flatten()]

# ---------------------------------------------------------------------------------------------------- tar shards


def expand_braces(pattern):
    """'dir/{00000..00003}.tar' -> the 4 paths, zero padding kept (the webdataset / img2dataset convention). One
    range; a step is refused."""
    m = re.search(r"\{(\d+)\.\.(\d+)(\.\.\d+)?\}", pattern)
    if not m:
        return [pattern]
    lo, hi, step = m.groups()
    if step:
        raise ValueError(f"{pattern}: a brace range with a step ({m.group()}) is not supported")
    return [pattern.replace(m.group(), str(i).zfill(len(lo)), 1) for i in range(int(lo), int(hi) + 1)]


def tar_samples(path):
    """(image file bytes, caption) of each sample of a webdataset-style shard: members KEY.jpg|png|webp and KEY.txt,
    adjacent; a repeated member starts a new sample (as webdataset). A sample missing its image or caption has None
    in that place. Raises tarfile.TarError (or EOFError, zlib.error) where the shard is damaged: truncated (tarfile
    itself takes a cut at a member boundary for the end), not a tar, empty."""
    group, key = {}, None
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            stem, ext = os.path.splitext(member.name)
            kind = MEMBER_KINDS.get(ext.lower())
            if (stem != key or kind in group) and group:
                yield group.get("image"), group.get("txt")
                group = {}
            key = stem
            if kind:
                group[kind] = tar.extractfile(member).read()
        if group:
            yield group.get("image"), group.get("txt")
        # no end-of-archive blocks: cut short
        if path.endswith(".tar") and os.path.getsize(path) < tar.offset + 1024:
            raise tarfile.ReadError(f"unexpected end of data in {path}")


class TarShards(IterableDataset):
    """Webdataset-style shards split over ranks and workers without overlap, looped over forever (shard order
    reshuffled each pass); yields whole batches (images, captions, skipped, position). A damaged shard is read up to
    the damage, then skipped and counted by name.
    DataLoader takes batches from its workers in turn, so step s is made by "slot" s % workers of this rank. A batch
    carries its slot's stream position after it: (pass, shard in that pass's order, samples read from the shard,
    usable samples found in the pass). A run resumed at `start` from `positions` ({slot: its position after its last
    batch before `start`}; a slot not in it starts at the beginning) has worker w play slot (start + w) % workers from its position: it reads
    again at most the part of one shard it had read, whatever the step."""

    start, positions = 0, {}  # set by train.py's loader: the step it starts at, {slot: position} to resume from

    def __init__(self, pattern, batch_size, resolution=224, rank=0, world=1, seed=0, workers=1):
        self.shards = expand_braces(pattern)
        missing = [s for s in self.shards if not os.path.isfile(s)]
        if missing:
            raise FileNotFoundError(f"shard not found: {missing[0]} ({len(missing)} of {len(self.shards)})")
        if len(self.shards) < world * max(1, workers):
            raise ValueError(f"{len(self.shards)} shards for {world} ranks x {workers} workers each")
        self.batch_size, self.resolution, self.rank, self.world, self.seed = batch_size, resolution, rank, world, seed

    def __iter__(self):
        info = get_worker_info()
        workers = info.num_workers if info else 1
        slot = (self.start + (info.id if info else 0)) % workers
        shards = self.shards[self.rank * workers + slot::self.world * workers]
        step = self.start + (slot - self.start) % workers  # this slot's first step
        first_pass, first_shard, read, found = self.positions.get(slot) or (0, 0, 0, 0)
        images, captions, skipped = [], [], Counter()
        for epoch in itertools.count(first_pass):
            if epoch > first_pass:  # else a batch would hold a sample twice (or, with none, hang)
                if found < self.batch_size:
                    raise ValueError(f"{found} usable samples in a pass over the {len(shards)} shards of rank "
                                     f"{self.rank}, loader worker {slot}: fewer than a batch of {self.batch_size} "
                                     f"({dict(skipped)})")
                first_shard, read, found = 0, 0, 0
            order = default_rng([self.seed, epoch, self.rank, slot]).permutation(shards)
            for j in range(first_shard, len(order)):
                try:
                    for k, (image, caption) in enumerate(tar_samples(order[j])):
                        if j == first_shard and k < read:  # read before the position: not decoded again
                            continue
                        caption = None if caption is None else caption.decode("utf-8", "replace")
                        rng = default_rng([self.seed, step, len(images), self.rank])
                        file = io.BytesIO(image) if image else None
                        try:
                            crop = partial(random_resized_crop, resolution=self.resolution, rng=rng)
                            image, caption = load_sample((file, caption, {}), crop)
                        except ValueError as e:
                            skipped[str(e)] += 1
                            continue
                        found += 1
                        images.append(image)
                        captions.append(caption)
                        if len(images) == self.batch_size:
                            yield torch.stack(images), captions, skipped, (epoch, j, k + 1, found)
                            images, captions, skipped, step = [], [], Counter(), step + workers
                except (tarfile.TarError, EOFError, zlib.error):
                    skipped[f"damaged shard {os.path.basename(order[j])}"] += 1
