"""Zero-shot checks on any checkpoint cloob.load_model reads (ours or a train.py run directory, OpenAI TorchScript,
OpenCLIP files and hub folders, Hugging Face CLIPModel folders, official CLOOB):
  python zeroshot.py --model logs/RUN --data synthetic              # the built-in held-out benchmark
  python zeroshot.py --model ViT-B-32.pt --data imagenet/val        # one sub-folder per class
  python zeroshot.py --model ViT-B-32.pt --image cat.jpg --labels "a cat,a dog,a diagram"
  python zeroshot.py --model ViT-B-32.pt --retrieval coco.csv       # image<->text recall@1/5/10
  torchrun --nproc_per_node=8 zeroshot.py --model ViT-B-32.pt --data imagenet/val   # the images split over 8 GPUs
train.py's periodic zero-shot evaluation calls evaluate() below.

Flags:
  --model PATH       any checkpoint file or folder load_model reads, or a train.py run directory
  --gelu             --model is a bare OpenCLIP state dict of a GELU model (not -quickgelu)
  --data DIR         image folder with one sub-folder per class, or 'synthetic' (the built-in held-out benchmark)
  --image FILE...    classify these images against --labels (comma-separated)
  --retrieval FILE   CSV/TSV of images and captions (--csv-img-key, --csv-caption-key, --csv-separator, as
                     OpenCLIP's; default separator: tab for .tsv, comma otherwise): image<->text recall@1/5/10
  --classnames FILE  one class name per line, in sorted-folder order (default: the folder names, _ -> space)
  --templates        ensemble (CLIP's 7 ImageNet prompts; the folder default) | single | FILE (one {} a line)
  --output FILE      write the results as JSON to this file"""
import argparse
import json
import os
import pathlib
import sys
import time
from collections import Counter
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import cloob
import data

TEMPLATES = {  # CLIP's 7-template ImageNet ensemble, and its single prompt
    "ensemble": ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                 "a {} in a video game.", "art of the {}.", "a photo of the small {}."),
    "single": ("a photo of a {}.",),
}


def image_features(model, images, device):
    """[B, 3, R, R] -> L2-normalised float32 features [B, D] on the device."""
    return F.normalize(model.encode_image(images.to(device, non_blocking=True)).float(), dim=-1)


def text_features(model, tokenizer, texts, device, batch_size=256):
    """Captions -> L2-normalised float32 features [N, D] on the CPU, batch_size at a time."""
    batches = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]
    features = [model.encode_text(tokenizer(batch).to(device)).float().cpu() for batch in batches]
    return F.normalize(torch.cat(features), dim=-1)


@torch.no_grad()
def classifier(model, tokenizer, classnames, templates, device="cpu"):
    """[D, C] weights: for each class, encode every template filled with its name, L2-normalise, average,
    renormalise (CLIP's prompt ensembling). One class at a time, as OpenAI's notebook: memory does not grow with C."""
    weights = [text_features(model, tokenizer, [t.replace("{}", c) for t in templates], device).mean(dim=0)
               for c in progress(classnames, len(classnames), "classes")]
    return F.normalize(torch.stack(weights, dim=1), dim=0).to(device)  # [D, C]


@torch.no_grad()
def evaluate(model, tokenizer, tasks, batches, device="cpu"):
    """Zero-shot classification. tasks: {name: (classnames, templates)}; batches: iterable of (images [B, 3, R, R],
    {name: labels [B]}, Counter of unusable images left out), e.g. loader() or
    benchmark(). Under torch.distributed each rank passes its own share of the images and all get the
    totals.
    -> {name: {"top1", "top5", "n", "skipped"}}, accuracies as fractions."""
    weights = {name: classifier(model, tokenizer, *task, device) for name, task in tasks.items()}
    # top-1 hits, top-5 hits, images
    counts = {name: torch.zeros(3) for name in tasks}
    skipped = 0
    for images, labels, batch_skipped in batches:
        skipped += sum(batch_skipped.values())
        if not len(images):
            continue
        features = image_features(model, images, device)  # [B, D]
        for name, w in weights.items():
            y, scores = labels[name], (features @ w).cpu()  # [B], [B, C]
            # as OpenAI's notebook and OpenCLIP count: the k best by topk, so a tie with the true class is broken as
            # topk breaks it, not in its favour; a true class scored NaN (or inf) is no hit
            top = scores.topk(min(5, scores.shape[1])).indices  # [B, k]
            hits = (top == y[:, None]) & scores.gather(1, y[:, None]).isfinite()
            counts[name] += torch.tensor([hits[:, 0].sum(), hits.sum(), len(y)])
    parts = _all_ranks((counts, skipped))  # every rank's counts, summed
    skipped = sum(s for _, s in parts)
    results = {}
    for name in tasks:
        top1, top5, n = sum(part[name] for part, _ in parts).tolist()
        results[name] = dict(top1=top1 / max(n, 1), top5=top5 / max(n, 1), n=int(n), skipped=skipped)
    return results

# ---------------------------------------------------------------------------------------------------- data


def progress(items, total, what, step=1):
    """Yields `items`, each `step` of `total` `what`. On rank 0, once they have taken 2 seconds, says on stderr at each
    tenth how many are done, how fast, and the time left: one line rewritten on a terminal, a line each in a log file.
    Short passes (the tests, the demo) stay silent."""
    start, tenths = time.time(), 0
    for i, item in enumerate(items, 1):
        yield item
        done, elapsed = min(total, i * step), time.time() - start
        if done * 10 // total > tenths and elapsed > 2 and cloob.rank0():
            tenths = done * 10 // total
            end = "\r" if sys.stderr.isatty() and done < total else "\n"
            print(f"{what} {done}/{total}: {done / elapsed:.0f}/s, {(total - done) / done * elapsed / 60:.1f} min left",
                  end=end, file=sys.stderr, flush=True)


class Loader(DataLoader):
    """A DataLoader whose passes show their progress in images."""

    def __iter__(self):
        return progress(super().__iter__(), len(self.dataset), "images", self.batch_size)


def _shard(n):
    """This rank's share of n items, every W-th from its rank on: evaluation is split over the W ranks, never done by
    one while others wait."""
    if not cloob._distributed():
        return slice(0, n)
    return slice(dist.get_rank(), n, dist.get_world_size())


def _all_ranks(part):
    """Every rank's `part` (anything picklable, on the CPU), in rank order; [part] in one process."""
    if not cloob._distributed():
        return [part]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return parts


def benchmark(where, resolution, batch_size=256, workers=2, classnames=None, templates=None):
    """-> (tasks, this rank's batches of their images), for evaluate(). `where`: an
    image folder (one task, named after the folder: its classes, as class_task says), or "synthetic": the built-in
    benchmark, 500 images of the held-out shape/colour/position triples with their shape and colour tasks, in one
    batch (split over the ranks), the same whatever seed the model was trained with."""
    if where != "synthetic":
        folder = data.ImageFolder(where)
        tasks = {folder.task: class_task(folder, classnames, templates)}
        return tasks, loader(folder, resolution, batch_size, workers)
    if classnames or templates:
        raise ValueError("--data synthetic has its own class names and templates")
    pixels, _, labels = data.Synthetic(500, resolution, "heldout").render(range(500))
    part = _shard(500)
    images = data.normalize(data.channels_first(pixels[part]))  # [n, 3, R, R]
    labels = {k: torch.from_numpy(v[part]) for k, v in labels.items()}
    return dict(data.ZEROSHOT_TASKS), [(images, labels, Counter())]


def _load_batch(resolution, items):
    """(image path, caption, labels) items -> (preprocessed images [B, 3, R, R], labels {name: [B]}, Counter of the
    unusable items left out), in a loader worker."""
    images, labels, skipped = [], [], Counter()
    transform = partial(data.preprocess, resolution=resolution)
    for item in items:
        try:
            image, _ = data.load_sample(item, transform)
        except ValueError as e:
            skipped[str(e)] += 1
            continue
        images.append(image)
        labels.append(item[2])
    images = torch.stack(images) if images else torch.empty(0, 3, resolution, resolution)
    return images, {k: torch.tensor([x[k] for x in labels]) for k in items[0][2]}, skipped


def loader(dataset, resolution, batch_size=256, workers=2):
    """Batches of a folder or CSV dataset (this rank's share), as _load_batch makes them, read by `workers`
    processes."""
    part = Subset(dataset, range(len(dataset))[_shard(len(dataset))])
    return Loader(part, batch_size=batch_size, num_workers=workers, collate_fn=partial(_load_batch, resolution),
                  worker_init_fn=data.worker_signals, pin_memory=torch.cuda.is_available())

# ---------------------------------------------------------------------------------------------------- retrieval


def retrieval_recall(image_features, text_features, text_image, ks=(1, 5, 10), chunk=4096):
    """The standard (COCO, Flickr30k) protocol. image_features [M, D]; text_features [N, D], caption j describing
    image text_image[j]. Image->text: an image is a hit at k when one of its captions is among its k best; text->image:
    when its image is among the k best of the M. Queries are scored `chunk` at a time."""
    images = torch.arange(len(image_features))
    out = dict(images=len(image_features), captions=len(text_features))
    for direction, queries, keys, query_image, key_image in [
            ("image_to_text", image_features, text_features, images, text_image),
            ("text_to_image", text_features, image_features, text_image, images)]:
        hits = []  # [queries, k]: whether the query's i-th best key shows its image
        for i in range(0, len(queries), chunk):
            best = (queries[i:i + chunk] @ keys.T).topk(min(max(ks), len(keys))).indices
            hits.append(key_image[best] == query_image[i:i + chunk, None])
        hits = torch.cat(hits)
        out.update({f"{direction}_R@{k}": hits[:, :k].any(dim=-1).float().mean().item() for k in ks})
    return out


def retrieval(args, model, tokenizer, device):
    """--retrieval: each image of a CSV read and encoded once (rows naming one file share it), each caption of a usable
    image encoded, then recall@k both ways. Under torch.distributed the images are split over the ranks (every rank
    encodes all captions: they cost little)."""
    dataset = data.CsvCaptions(args.retrieval, args.csv_img_key, args.csv_caption_key, args.csv_separator)
    captioned = [i for i, (_, caption) in enumerate(dataset.rows) if (caption or "").strip()]
    # one row of each captioned image file
    images = {dataset.image_ids[i]: dataset[i] for i in captioned}
    features, skipped = {}, Counter()  # image id -> [D]
    batches = loader(list(images.values()), model.config.image_resolution, args.batch_size, args.workers)
    for batch, labels, batch_skipped in batches:
        features.update(zip(labels["image"].tolist(), image_features(model, batch, device).cpu()))
        skipped += batch_skipped
    parts = _all_ranks((features, skipped))
    features = {image: x for part, _ in parts for image, x in part.items()}
    uncaptioned = Counter({"no caption": len(dataset) - len(captioned)})
    skipped = sum((part for _, part in parts), uncaptioned)
    note = f"; skipped {dict(skipped)}" if skipped else ""
    if not features:
        raise ValueError(f"{args.retrieval}: no usable image{note}")
    column = {image: n for n, image in enumerate(features)}  # image id -> row of x
    rows = [i for i in captioned if dataset.image_ids[i] in column]  # the captions of usable images
    y = text_features(model, tokenizer, [dataset.rows[i][1] for i in rows], device)  # [N, D]
    text_image = torch.tensor([column[dataset.image_ids[i]] for i in rows])
    r = dict(retrieval_recall(torch.stack(list(features.values())), y, text_image), skipped=dict(skipped))
    print(f"{r['images']} images, {r['captions']} captions: " +
          "  ".join(f"{k} {v:.2%}" for k, v in r.items() if "R@" in k) + note)
    return r

# ---------------------------------------------------------------------------------------------------- CLI


def repeated(names):
    """The names given more than once, sorted."""
    return sorted(name for name, n in Counter(names).items() if n > 1)


def read_lines(path):
    """A UTF-8 text file's lines, stripped, the empty ones left out."""
    return [line.strip() for line in pathlib.Path(path).read_text("utf-8").splitlines() if line.strip()]


def read_templates(spec):
    """--templates: ensemble | single | FILE with one template containing {} per line."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"--templates: not {' or '.join(TEMPLATES)}, nor a file: {spec}")
    templates = read_lines(spec)
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(f"{spec}: every template needs a {{}} for the name (bad: {bad[:1] or 'no line'})")
    return templates


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", required=True)
    a("--gelu", action="store_true")
    mode = p.add_mutually_exclusive_group(required=True).add_argument
    mode("--data")
    mode("--image", nargs="+")
    mode("--retrieval")
    a("--labels")
    data.csv_arguments(p)
    a("--classnames")
    a("--templates")
    a("--batch-size", type=int, default=256)
    a("--workers", type=int, default=2)
    a("--output")
    args = p.parse_args(argv)
    if args.image and not args.labels:
        p.error("--image needs --labels")
    if args.batch_size < 1 or args.workers < 0:
        p.error("--batch-size must be >= 1 and --workers >= 0")
    return args


def classify_images(args, model, tokenizer, device):
    """The classic CLIP demo: softmax over the labels of logit_scale x cosine, per image."""
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if not labels:
        raise ValueError(f"--labels {args.labels!r} names no label")
    if repeated(labels):
        raise ValueError(f"--labels: {repeated(labels)} repeated")
    templates = read_templates(args.templates) if args.templates else ("{}",)  # else: the label alone
    w = classifier(model, tokenizer, labels, templates, device)
    transform = partial(data.preprocess, resolution=model.config.image_resolution)
    results = {}
    for path in args.image:
        try:  # missing, corrupt, too large, a directory
            image, _ = data.load_sample((path, "-", {}), transform)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        probs = (model.logit_scale.exp() * image_features(model, image[None], device) @ w).softmax(dim=-1)[0]
        results[path] = dict(sorted(zip(labels, probs.tolist()), key=lambda kv: -kv[1]))
        print(path + "".join(f"\n  {prob:7.2%}  {label}" for label, prob in results[path].items()))
    return results


def classify_folder(args, model, tokenizer, device):
    tasks, batches = benchmark(args.data, model.config.image_resolution, args.batch_size, args.workers,
                               args.classnames, args.templates)
    results = evaluate(model, tokenizer, tasks, batches, device)
    for name, r in results.items():
        top5 = f"  top-5 {r['top5']:.2%}" if len(tasks[name][0]) > 5 else ""  # else trivially 100%
        print(f"{name}: top-1 {r['top1']:.2%}{top5}  ({r['n']} images, {r['skipped']} unreadable)")
    return results


def class_task(folder, classnames=None, templates=None):
    """(class names, templates) of an image folder: folder names with _ -> space, or --classnames FILE (one name per
    line, in sorted-folder order); CLIP's 7-template ensemble unless --templates says otherwise."""
    names = [c.replace("_", " ") for c in folder.classes]
    if classnames:
        names = read_lines(classnames)
    if len(names) != len(folder.classes):
        raise ValueError(f"{classnames}: {len(names)} class names for {len(folder.classes)} class folders")
    if repeated(names) and cloob.rank0():  # two classes named alike score alike: top-k credits one of them
        print(f"warning: class names given twice: {repeated(names)}", file=sys.stderr)
    return names, read_templates(templates or "ensemble")


@torch.no_grad()
def main(argv=None):
    """Under torchrun --data and --retrieval split the images over the ranks (NCCL or gloo); rank 0 alone prints and
    writes --output. The process group it runs in (its own, or one already started) is ended when it returns."""
    args = parse_args(argv)
    rank, _, device = cloob.setup_distributed()
    if rank > 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")
    try:  # bad input: one line, no traceback
        if args.output:  # before any work: a path that cannot be written is an error now, not after the run
            open(args.output, "a").close()
        model, info = cloob.load_model(args.model, **(dict(quick_gelu=False) if args.gelu else {}))
        tokenizer = cloob.tokenizer_for(model.config, info["tokenizer"])
        print(f"{args.model}: {info['format']} checkpoint, {info['method']}, {info['tokenizer']} "
              f"tokenizer, {model.config.image_resolution}px", file=sys.stderr)
        model = model.to(device)
        if args.image:
            results = classify_images(args, model, tokenizer, device)
        elif args.retrieval:
            results = retrieval(args, model, tokenizer, device)
        else:
            results = classify_folder(args, model, tokenizer, device)
        if args.output and rank == 0:
            pathlib.Path(args.output).write_text(json.dumps(dict(results, model=args.model), indent=1))
        return results
    except (OSError, ValueError) as e:  # a rank other than 0 says it too, on its own stderr
        print(f"zeroshot.py: error: {str(e).strip().splitlines()[-1]}", file=sys.__stderr__ if rank else sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
