"""Zero-shot checks on any checkpoint cloob.load_model reads (ours or a train.py run directory, OpenAI TorchScript,
OpenCLIP files and hub folders, Hugging Face CLIPModel folders, official CLOOB):
  python zeroshot.py --model logs/RUN --data synthetic              # the built-in held-out benchmark
  python zeroshot.py --model ViT-B-32.pt --data imagenet/val        # one sub-folder per class
  python zeroshot.py --model ViT-B-32.pt --image cat.jpg --labels "a cat,a dog,a diagram"
  python zeroshot.py --model ViT-B-32.pt --retrieval coco.csv       # image<->text recall@1/5/10
  torchrun --nproc_per_node=8 zeroshot.py --model ViT-B-32.pt --data imagenet/val   # the images split over 8 GPUs
train.py's periodic zero-shot evaluation calls evaluate() below."""
import argparse
import json
import math
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
    return F.normalize(torch.cat([torch.zeros(0, model.config.embed_dim), *features]), dim=-1)


@torch.no_grad()
def classifier(model, tokenizer, classnames, templates, device="cpu", batch_size=256):
    """[D, C] weights: for each class, encode every template filled with its name, L2-normalise, average,
    renormalise (CLIP's prompt ensembling). About batch_size prompts at a time: memory does not grow with C."""
    step, weights = max(1, batch_size // len(templates)), []
    for i in range(0, len(classnames), step):
        names = classnames[i:i + step]
        features = text_features(model, tokenizer, [t.replace("{}", c) for c in names for t in templates], device)
        weights.append(F.normalize(features.view(len(names), len(templates), -1).mean(dim=1), dim=-1))  # [classes, D]
    return torch.cat(weights).T.to(device)


@torch.no_grad()
def evaluate(model, tokenizer, tasks, batches, device="cpu", total=None, batch_size=256):
    """Zero-shot classification. tasks: {name: (classnames, templates)}; batches: iterable of (images [B, 3, R, R],
    captions (unused), {name: labels [B]}, Counter of unusable images left out), e.g. loader() or
    benchmark(). Under torch.distributed each rank passes its own share of the images and all get the
    totals. With `total` images, a progress line (images/s, ETA) goes to stderr every 10 s.
    -> {name: {"top1", "top5", "per_class": {class: top1}, "n", "skipped"}}, accuracies as fractions."""
    weights = {name: classifier(model, tokenizer, *task, device, batch_size) for name, task in tasks.items()}
    counts = {name: torch.zeros(3, len(task[0])) for name, task in tasks.items()}  # top-1 hits, top-5 hits, images
    skipped, done, start, shown = 0, 0, time.time(), 0.0  # shown: seconds from the start to the last progress line
    for images, _, labels, batch_skipped in batches:
        skipped += sum(batch_skipped.values())
        done, elapsed = done + len(images) + sum(batch_skipped.values()), time.time() - start
        if total and elapsed - shown > 10 and done < total:
            shown, rate = elapsed, done / elapsed
            print(f"  {done}/{total} images, {rate:.0f} images/s, eta {(total - done) / rate:.0f} s", file=sys.stderr)
        if not len(images):
            continue
        features = image_features(model, images, device)  # [B, D]
        for name, w in weights.items():
            y, scores = labels[name], (features @ w).cpu()  # [B], [B, C]
            rank = (scores > scores.gather(1, y[:, None])).sum(dim=1)  # classes scoring above the true one
            counts[name].index_add_(1, y, torch.stack([rank < 1, rank < 5, torch.ones_like(y, dtype=bool)]).float())
    parts = _all_ranks((counts, skipped))  # every rank's counts, summed
    results = {}
    for name, (classnames, _) in tasks.items():
        top1, top5, seen = sum(part[name] for part, _ in parts)  # [C] each
        per_class = {c: (top1[i] / seen[i]).item() if seen[i] else None for i, c in enumerate(classnames)}
        n = int(seen.sum())
        results[name] = dict(top1=top1.sum().item() / max(n, 1), top5=top5.sum().item() / max(n, 1), n=n,
                             skipped=sum(s for _, s in parts), per_class=per_class)
    return results

# ---------------------------------------------------------------------------------------------------- data


def _shard(n):
    """This rank's share of n items, a contiguous block: evaluation is split over ranks, never done by one while
    others wait, and the shares of all ranks in rank order are the n items in order."""
    if not cloob._distributed():
        return slice(0, n)
    size = math.ceil(n / dist.get_world_size())
    return slice(dist.get_rank() * size, (dist.get_rank() + 1) * size)


def _all_ranks(part):
    """Every rank's `part` (anything picklable, on the CPU), in rank order; [part] in one process."""
    if not cloob._distributed():
        return [part]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return parts


def benchmark(where, resolution, batch_size=256, workers=2, classnames=None, templates=None, seed=0):
    """-> (tasks, this rank's batches of their images, all ranks' number of images), for evaluate(). `where`: an
    image folder (one task, named after the folder: its classes, as class_task says), or "synthetic": the built-in
    benchmark, 500 images of the held-out shape/colour/position triples with their shape and colour tasks."""
    if where != "synthetic":
        folder = data.ImageFolder(where)
        tasks = {folder.task: class_task(folder, classnames, templates)}
        return tasks, loader(folder, resolution, batch_size, workers), len(folder)
    if classnames or templates:
        raise ValueError("--data synthetic has its own class names and templates")
    pixels, _, labels = data.Synthetic(500, resolution, split="heldout", seed=seed).render(range(500))
    part = _shard(500)
    images = data.normalize(data.channels_first(pixels[part]))  # [n, 3, R, R]
    labels = {k: torch.from_numpy(v[part]) for k, v in labels.items()}
    batches = [(images[i:i + batch_size], None, {k: v[i:i + batch_size] for k, v in labels.items()}, Counter())
               for i in range(0, len(images), batch_size)]
    return dict(data.ZEROSHOT_TASKS), batches, 500


def _load_batch(resolution, items):
    """(image path, caption, labels) items -> (preprocessed images [B, 3, R, R], captions, labels {name: [B]}, Counter
    of the unusable items left out), in a loader worker."""
    images, captions, labels, skipped = [], [], [], Counter()
    for item in items:
        try:
            image, caption = data.load_sample(item, partial(data.preprocess, resolution=resolution))
        except ValueError as e:
            skipped[str(e)] += 1
            continue
        images.append(image)
        captions.append(caption)
        labels.append(item[2])
    images = torch.stack(images) if images else torch.empty(0, 3, resolution, resolution)
    return images, captions, {k: torch.tensor([x[k] for x in labels]) for k in items[0][2]}, skipped


def loader(dataset, resolution, batch_size=256, workers=2):
    """Batches of a folder or CSV dataset (this rank's share), as _load_batch makes them, read by `workers`
    processes."""
    part = Subset(dataset, range(len(dataset))[_shard(len(dataset))])
    return DataLoader(part, batch_size=batch_size, num_workers=workers,
                                       collate_fn=partial(_load_batch, resolution), pin_memory=torch.cuda.is_available())

# ---------------------------------------------------------------------------------------------------- retrieval


def retrieval_recall(image_features, text_features, text_image, ks=(1, 5, 10), chunk=4096):
    """The standard (COCO, Flickr30k) protocol. image_features [M, D]; text_features [N, D], caption j describing
    image text_image[j]. Image->text: an image is a hit at k when one of its captions is among its k best; text->image:
    when its image is among the k best of the M."""
    hits = {"image_to_text": [], "text_to_image": []}  # [rows, k]: whether the i-th best is right
    for i in range(0, len(image_features), chunk):
        best = (image_features[i:i + chunk] @ text_features.T).topk(min(max(ks), len(text_features))).indices
        hits["image_to_text"].append(text_image[best] == torch.arange(i, i + len(best))[:, None])
    for j in range(0, len(text_features), chunk):
        best = (text_features[j:j + chunk] @ image_features.T).topk(min(max(ks), len(image_features))).indices
        hits["text_to_image"].append(best == text_image[j:j + chunk, None])
    out = dict(images=len(image_features), captions=len(text_features))
    for direction, h in hits.items():
        out.update({f"{direction}_R@{k}": torch.cat(h)[:, :k].any(dim=-1).float().mean().item() for k in ks})
    return out


def retrieval(args, model, tokenizer, device):
    """--retrieval: each image of a CSV read and encoded once (rows naming one file share it), each caption of a usable
    image encoded, then recall@k both ways. Under torch.distributed images and captions are split over the ranks."""
    dataset = data.CsvCaptions(args.retrieval, args.csv_img_key, args.csv_caption_key, args.csv_separator)
    captioned = [i for i, (_, caption) in enumerate(dataset.rows) if (caption or "").strip()]
    images = {dataset.image_ids[i]: dataset[i] for i in captioned}  # one row of each captioned image file
    features, skipped = {}, Counter()  # image id -> [D]
    for batch, _, labels, batch_skipped in loader(list(images.values()), model.config.image_resolution,
                                                  args.batch_size, args.workers):
        features.update(zip(labels["image"].tolist(), image_features(model, batch, device).cpu()))
        skipped += batch_skipped
    parts = _all_ranks((features, skipped))
    features = {image: x for part, _ in parts for image, x in part.items()}
    skipped = sum((part for _, part in parts), Counter("missing caption" if c is None else "empty caption"
                                                       for _, c in dataset.rows if not (c or "").strip()))
    note = f"; skipped {dict(skipped)}" if skipped else ""
    if not features:
        raise ValueError(f"{args.retrieval}: no usable image{note}")
    column = {image: n for n, image in enumerate(features)}  # image id -> row of x
    rows = [i for i in captioned if dataset.image_ids[i] in column]  # the captions of usable images
    mine = [dataset.rows[i][1] for i in rows][_shard(len(rows))]
    y = torch.cat(_all_ranks(text_features(model, tokenizer, mine, device)))  # [N, D]
    text_image = torch.tensor([column[dataset.image_ids[i]] for i in rows])
    r = dict(retrieval_recall(torch.stack(list(features.values())), y, text_image), skipped=dict(skipped))
    print(f"{r['images']} images, {r['captions']} captions: " +
          "  ".join(f"{k} {v:.2%}" for k, v in r.items() if "R@" in k) + note)
    return r

# ---------------------------------------------------------------------------------------------------- CLI


def read_lines(path):
    """A UTF-8 text file's lines, stripped, the empty ones left out."""
    return [line.strip() for line in pathlib.Path(path).read_text("utf-8").splitlines() if line.strip()]


def read_templates(spec):
    """--templates: ensemble | single | FILE with one template containing {} per line."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"--templates: not a built-in set ({', '.join(TEMPLATES)}) nor a file: {spec}")
    templates = read_lines(spec)
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(f"{spec}: every template needs a {{}} for the class name (bad: {bad[:1] or 'file is empty'})")
    return templates


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", required=True, help="any checkpoint file or folder load_model reads, or a train.py run directory")
    a("--gelu", action="store_true", help="--model is a bare OpenCLIP state dict of a GELU model (not -quickgelu)")
    mode = p.add_mutually_exclusive_group(required=True).add_argument
    mode("--data", help="image folder with one sub-folder per class, or 'synthetic' (the built-in held-out benchmark)")
    mode("--image", nargs="+", help="classify these images against --labels")
    mode("--retrieval", help="CSV/TSV of images and captions: image<->text recall@1/5/10")
    a("--labels", help="labels for --image: comma-separated, or a FILE with one label a line")
    data.csv_arguments(p)
    a("--classnames", help="FILE: one class name per line, in sorted-folder order")
    a("--templates", help="ensemble (CLIP's 7 ImageNet prompts; the folder default) | single | FILE")
    a("--batch-size", type=int, default=256)
    a("--workers", type=int, default=2)
    a("--output", help="write the results as JSON to this file")
    args = p.parse_args(argv)
    if args.image and not args.labels:
        p.error("--image needs --labels")
    if args.batch_size < 1 or args.workers < 0:
        p.error("--batch-size must be >= 1 and --workers >= 0")
    return args


def classify_images(args, model, tokenizer, device):
    """The classic CLIP demo: softmax over the labels of logit_scale x cosine, per image."""
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if os.path.isfile(args.labels):  # one label a line (labels may hold commas)
        labels = read_lines(args.labels)
    if not labels:
        raise ValueError(f"--labels {args.labels!r} names no label")
    if len(set(labels)) < len(labels):
        raise ValueError(f"--labels: {sorted({x for x in labels if labels.count(x) > 1})} given more than once")
    w = classifier(model, tokenizer, labels, read_templates(args.templates) if args.templates else ("{}",), device)
    results = {}
    for path in args.image:
        try:  # missing, corrupt, too large, a directory
            image, _ = data.load_sample((path, "-", {}), partial(data.preprocess, resolution=model.config.image_resolution))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        probs = (model.logit_scale.exp() * image_features(model, image[None], device) @ w).softmax(dim=-1)[0]
        results[path] = dict(sorted(zip(labels, probs.tolist()), key=lambda kv: -kv[1]))
        print(path + "".join(f"\n  {prob:7.2%}  {label}" for label, prob in results[path].items()))
    return results


def classify_folder(args, model, tokenizer, device):
    tasks, batches, n = benchmark(args.data, model.config.image_resolution, args.batch_size, args.workers,
                                  args.classnames, args.templates)
    t0 = time.time()
    results = evaluate(model, tokenizer, tasks, batches, device, n, args.batch_size)
    for name, r in results.items():
        top5 = f"  top-5 {r['top5']:.2%}" if len(r["per_class"]) > 5 else ""  # else trivially 100%
        print(f"{name}: top-1 {r['top1']:.2%}{top5}  ({r['n']} images, {r['n'] / (time.time() - t0):.0f} "
              f"images/s" + (f"; {r['skipped']} unreadable, skipped)" if r["skipped"] else ")"))
        worst = sorted((v, c) for c, v in r["per_class"].items() if v is not None)
        print("  per-class top-1, worst first: " + ", ".join(f"{c} {v:.0%}" for v, c in worst[:20]))
    return results


def class_task(folder, classnames=None, templates=None):
    """(class names, templates) of an image folder: folder names with _ -> space, or --classnames FILE (one name per
    line, in sorted-folder order); CLIP's 7-template ensemble unless --templates says otherwise."""
    names = [c.replace("_", " ") for c in folder.classes]
    if classnames:
        names = read_lines(classnames)
    if len(names) != len(folder.classes):
        raise ValueError(f"{classnames} has {len(names)} class names for {len(folder.classes)} class folders")
    return names, read_templates(templates or "ensemble")


@torch.no_grad()
def main(argv=None):
    """Under torchrun the images are split over the ranks (NCCL or gloo); rank 0 alone prints and writes --output."""
    args = parse_args(argv)
    own_group = not dist.is_initialized()  # a caller's process group is left as it is
    rank, _, device = cloob.setup_distributed()
    if rank > 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")
    try:  # bad input: one line, no traceback
        if args.output:  # before any work: a path that cannot be written is an error now, not after the run
            try:
                open(args.output, "a").close()
            except OSError as e:
                raise ValueError(f"--output {args.output}: {e.strerror}") from None
        model, info = cloob.load_model(args.model, **(dict(quick_gelu=False) if args.gelu else {}))
        tokenizer = cloob.tokenizer_for(model.config, info["tokenizer"])
        print(f"{args.model}: {info['format']} checkpoint, {info['method']}, {info['tokenizer']} tokenizer, "
              f"{model.config.image_resolution}px", file=sys.stderr)
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
    except (FileNotFoundError, ValueError) as e:  # a rank other than 0 says it too, on its own stderr
        print(f"zeroshot.py: error: {str(e).strip().splitlines()[-1]}", file=sys.__stderr__ if rank else sys.stderr)
        sys.exit(1)
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
