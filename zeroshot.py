"""Zero-shot checks on any checkpoint cloob.load_model reads (ours or a train.py run directory, OpenAI
TorchScript, OpenCLIP state dict, official CLOOB):
  python zeroshot.py --model logs/RUN --data synthetic              # the built-in held-out benchmark
  python zeroshot.py --model ViT-B-32.pt --data imagenet/val        # one sub-folder per class
  python zeroshot.py --model ViT-B-32.pt --image cat.jpg --labels "a cat,a dog,a diagram"
  python zeroshot.py --model ViT-B-32.pt --retrieval coco.csv       # image<->text recall@1/5/10
  python zeroshot.py --model ViT-B-32.pt --analyze --data DIR       # (or --retrieval FILE) embedding structure
train.py's periodic zero-shot evaluation calls evaluate() below."""
import argparse
import collections
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import cloob
import data

TEMPLATES = {  # CLIP's 7-template ImageNet ensemble, and its single prompt
    "ensemble": ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                 "a {} in a video game.", "art of the {}.", "a photo of the small {}."),
    "single": ("a photo of a {}.",),
}


@torch.no_grad()
def classifier(model, tokenizer, classnames, templates, device="cpu"):
    """[D, C] weights: for each class, encode every template filled with its name, L2-normalise, average,
    renormalise (CLIP's prompt ensembling)."""
    tokens = tokenizer([t.replace("{}", c) for c in classnames for t in templates]).to(device)
    features = F.normalize(model.encode_text(tokens).float(), dim=-1).view(len(classnames), len(templates), -1)
    return F.normalize(features.mean(dim=1), dim=-1).T


@torch.no_grad()
def text_features(model, tokenizer, texts, device="cpu", batch_size=256):
    """Captions -> L2-normalised [N, D], in batches."""
    return torch.cat([F.normalize(model.encode_text(tokenizer(texts[i:i + batch_size]).to(device)).float(), dim=-1)
                      for i in range(0, len(texts), batch_size)])


def _distributed():
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def evaluate(model, tokenizer, tasks, batches, device="cpu", progress=None):
    """Zero-shot classification. tasks: {name: (classnames, templates)}; batches: iterable of (images [B, 3, R, R],
    captions (unused), {name: labels [B]}, Counter of unusable images left out), e.g. loader() or
    tensor_batches(). Under torch.distributed each rank passes its own share of the images and all get the
    totals. -> {name: {"top1", "top5", "per_class": {class: top1}, "n", "skipped"}}, accuracies as fractions."""
    weights = {name: classifier(model, tokenizer, classnames, templates, device) for name, (classnames, templates) in tasks.items()}
    counts = {name: torch.zeros(3, len(classnames), dtype=torch.float64, device=device)  # top-1, top-5, total per class
              for name, (classnames, _) in tasks.items()}
    skipped = torch.zeros((), dtype=torch.float64, device=device)
    for images, _, labels, batch_skipped in batches:
        skipped += sum(batch_skipped.values())
        if not len(images):
            continue
        features = F.normalize(model.encode_image(images.to(device, non_blocking=True)).float(), dim=-1)  # [B, D]
        for name, w in weights.items():
            y = labels[name].to(device)
            top5 = (features @ w).topk(min(5, w.shape[1]), dim=-1).indices  # [B, k], best first
            counts[name][0].index_add_(0, y, (top5[:, 0] == y).double())
            counts[name][1].index_add_(0, y, (top5 == y[:, None]).any(dim=-1).double())
            counts[name][2].index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        if progress:
            progress(len(images) + sum(batch_skipped.values()))
    results = {}
    if _distributed():
        dist.all_reduce(skipped)
    for name, (classnames, _) in tasks.items():
        if _distributed():
            dist.all_reduce(counts[name])
        top1, top5, total = counts[name].cpu()
        n = int(total.sum())
        results[name] = {"top1": top1.sum().item() / max(n, 1), "top5": top5.sum().item() / max(n, 1), "n": n,
                         "skipped": int(skipped), "per_class": {c: (top1[i] / total[i]).item() if total[i] else None
                                                                for i, c in enumerate(classnames)}}
    return results

# ---------------------------------------------------------------------------------------------------- data


def _shard(n):
    """This rank's share of n items: evaluation is split over ranks, never done by one while others wait."""
    return slice(dist.get_rank(), n, dist.get_world_size()) if _distributed() else slice(0, n)


def tensor_batches(images, labels, batch_size=256):
    """This rank's batches of preprocessed images [N, 3, R, R] with labels {name: [N]}, for evaluate()."""
    part = _shard(len(images))
    images, labels = images[part], {k: v[part] for k, v in labels.items()}
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size], None, {k: v[i:i + batch_size] for k, v in labels.items()}, collections.Counter()


def synthetic_benchmark(resolution, n=500, seed=0):
    """The built-in benchmark: n images of the held-out shape/colour/position triples and its zero-shot tasks.
    -> (tasks, images [n, 3, R, R], labels {task: [n]})."""
    pixels, _, labels = data.Synthetic(n, resolution, split="heldout", seed=seed).render(range(n))
    return dict(data.ZEROSHOT_TASKS), data.to_tensor(pixels), {k: torch.from_numpy(v) for k, v in labels.items()}


class Samples(torch.utils.data.Dataset):
    """A dataset of (image path, caption, labels) items (data.ImageFolder, data.CsvCaptions) -> (preprocessed
    image, caption, labels, None), or (None, None, labels, why) when the item is unusable."""

    def __init__(self, dataset, resolution):
        self.dataset, self.resolution = dataset, resolution

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx):
        item = self.dataset[idx]
        try:
            image, caption = data.load_sample(item, lambda im: data.preprocess(im, self.resolution))
            return image, caption, item[2], None
        except ValueError as e:
            return None, None, item[2], str(e)


def _collate(batch):
    ok = [b for b in batch if b[0] is not None]
    images = torch.stack([b[0] for b in ok]) if ok else torch.empty(0)
    labels = {k: torch.tensor([b[2][k] for b in ok], dtype=torch.long) for k in batch[0][2]}
    return images, [b[1] for b in ok], labels, collections.Counter(b[3] for b in batch if b[0] is None)


def loader(dataset, resolution, batch_size=256, workers=2):
    """This rank's batches (images [B, 3, R, R], captions, labels {name: [B]}, skipped Counter) of a folder or
    CSV dataset, read by `workers` processes; unusable items are left out and counted."""
    part = torch.utils.data.Subset(Samples(dataset, resolution), range(len(dataset))[_shard(len(dataset))])
    return torch.utils.data.DataLoader(part, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                                       pin_memory=torch.cuda.is_available())


def read_classnames(path, folders):
    """--classnames FILE: one name per line in sorted-folder order, or `folder<TAB>name` lines."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--classnames file not found: {path}")
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    if lines and all("\t" in line for line in lines):
        names = dict(line.split("\t", 1) for line in lines)
        missing = [d for d in folders if d not in names]
        if missing:
            raise ValueError(f"{path}: no name for folder {missing[0]!r} ({len(missing)} of {len(folders)} missing)")
        return [names[d] for d in folders]
    if len(lines) != len(folders):
        raise ValueError(f"{path} has {len(lines)} class names but the data has {len(folders)} class folders")
    return lines


def read_templates(spec):
    """--templates: ensemble | single | FILE with one template containing {} per line."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"--templates: not a built-in set ({', '.join(TEMPLATES)}) nor a file: {spec}")
    with open(spec, encoding="utf-8") as f:
        templates = tuple(line.strip() for line in f if line.strip())
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(f"{spec}: every template needs a {{}} for the class name (bad: {bad[:1] or 'file is empty'})")
    return templates

# ---------------------------------------------------------------------------------------------------- retrieval, analysis


def retrieval_recall(image_features, text_features, ks=(1, 5, 10), chunk=4096):
    """Image->text and text->image recall@k for matched rows of two normalised [N, D] feature sets. The rank of
    a match is the number of candidates scoring strictly higher; rows are scored in chunks (memory chunk x N)."""
    out = {}
    for direction, (queries, keys) in (("image_to_text", (image_features, text_features)),
                                       ("text_to_image", (text_features, image_features))):
        ranks = []
        for i in range(0, len(queries), chunk):
            scores = queries[i:i + chunk] @ keys.T  # [c, N]
            matched = scores.diagonal(offset=i)[:, None]  # row j's match is column i + j
            ranks.append((scores > matched).sum(-1))
        ranks = torch.cat(ranks)
        out.update({f"{direction}_R@{k}": (ranks < k).float().mean().item() for k in ks})
    return out


def effective_rank(features, explained=0.99):
    """The CLOOB paper's covariance measure: how many eigenvalues of the embeddings' covariance explain
    `explained` of its trace. Higher: a richer covariance structure (less collapse onto few directions)."""
    eig = torch.linalg.eigvalsh(torch.cov(features.double().T)).flip(0).clamp(min=0)  # descending
    return int((eig.cumsum(0) / eig.sum() < explained).sum().item()) + 1


def analyze(image_features, text_features):
    """Embedding structure of matched pairs (row i of each): effective ranks and matched/unmatched cosines."""
    cos = image_features.double() @ text_features.double().T  # [N, N]
    n = len(cos)
    return {"image_eigenvalues_99": effective_rank(image_features), "text_eigenvalues_99": effective_rank(text_features),
            "dim": image_features.shape[1], "n": n, "matched_cosine": cos.diag().mean().item(),
            "unmatched_cosine": ((cos.sum() - cos.diag().sum()) / max(n * n - n, 1)).item()}

# ---------------------------------------------------------------------------------------------------- CLI


def progress(total):
    """-> a callback taking the number of images just done; prints images/s and ETA on stderr every 10 s."""
    t0 = time.time()
    state = {"done": 0, "last": t0}

    def update(n):
        state["done"], now = state["done"] + n, time.time()
        if now - state["last"] > 10 and state["done"] < total:
            rate = state["done"] / (now - t0)
            print(f"  {state['done']}/{total} images, {rate:.0f} images/s, eta {(total - state['done']) / rate:.0f} s",
                  file=sys.stderr, flush=True)
            state["last"] = now
    return update


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", required=True, help="any checkpoint file or folder load_model reads, or a train.py run directory")
    a("--gelu", action="store_true", help="--model is a bare OpenCLIP state dict of a GELU model (not -quickgelu)")
    a("--data", help="image folder with one sub-folder per class, or 'synthetic' (the built-in held-out benchmark)")
    a("--image", nargs="+", help="classify these images against --labels")
    a("--labels", help="comma-separated labels for --image")
    a("--retrieval", help="CSV/TSV of images and captions: image<->text recall@1/5/10")
    a("--analyze", action="store_true", help="embedding analysis of --data or --retrieval")
    a("--csv-img-key", default="filepath")
    a("--csv-caption-key", default="title")
    a("--csv-separator", help="default: tab for .tsv, comma otherwise")
    a("--classnames", help="FILE: one class name per line (sorted-folder order) or folder<TAB>name lines")
    a("--templates", help="ensemble (CLIP's 7 ImageNet prompts; the folder default) | single | FILE")
    a("--batch-size", type=int, default=256)
    a("--workers", type=int, default=2)
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--output", help="write the results as JSON to this file")
    args = p.parse_args(argv)
    if sum(x is not None for x in (args.data, args.image, args.retrieval)) != 1:
        p.error("give exactly one of --data, --image, --retrieval")
    if args.image and not args.labels:
        p.error("--image needs --labels")
    if args.analyze and args.image:
        p.error("--analyze works on --data or --retrieval")
    return args


def load(args):
    path = args.model
    model, info = cloob.load_model(path, **(dict(quick_gelu=False) if args.gelu else {}))
    tokenizer = cloob.Tokenizer(info["tokenizer"], model.config.context_length)
    print(f"{path}: {info['format']} checkpoint, {info['method']}, {info['tokenizer']} tokenizer, "
          f"{model.config.image_resolution}px", file=sys.stderr)
    return model.to(args.device), tokenizer, path


def classify_images(args, model, tokenizer):
    """The classic CLIP demo: softmax over the labels of logit_scale x cosine, per image."""
    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    if not labels:
        raise ValueError(f"--labels {args.labels!r} names no label")
    w = classifier(model, tokenizer, labels, read_templates(args.templates) if args.templates else ("{}",), args.device)
    results = {}
    for path in args.image:
        try:  # "missing image" or "corrupt image"
            image, _ = data.load_sample((path, "-", {}), lambda im: data.preprocess(im, model.config.image_resolution))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        x = F.normalize(model.encode_image(image[None].to(args.device)).float(), dim=-1)  # [1, D]
        probs = (model.logit_scale.exp() * x @ w).softmax(dim=-1)[0]
        results[path] = dict(sorted(zip(labels, probs.tolist()), key=lambda kv: -kv[1]))
        print(path)
        for label, prob in results[path].items():
            print(f"  {prob:7.2%}  {label}")
    return results


def class_names(args, folder):
    return read_classnames(args.classnames, folder.classes) if args.classnames else [c.replace("_", " ") for c in folder.classes]


def classify_folder(args, model, tokenizer):
    resolution = model.config.image_resolution
    if args.data == "synthetic":
        if args.templates or args.classnames:
            raise ValueError("--data synthetic has its own class names and templates")
        tasks, images, labels = synthetic_benchmark(resolution)
        batches, n = tensor_batches(images, labels, args.batch_size), len(images)
    else:
        folder = data.ImageFolder(args.data)
        tasks = {"label": (class_names(args, folder), read_templates(args.templates or "ensemble"))}
        batches, n = loader(folder, resolution, args.batch_size, args.workers), len(folder)
    t0 = time.time()
    results = evaluate(model, tokenizer, tasks, batches, args.device, progress(n))
    for name, r in results.items():
        top5 = f"  top-5 {r['top5']:.2%}" if len(r["per_class"]) > 5 else ""  # else trivially 100%
        print(f"{name}: top-1 {r['top1']:.2%}{top5}  ({r['n']} images, {r['n'] / (time.time() - t0):.0f} "
              f"images/s" + (f"; {r['skipped']} unreadable, skipped)" if r["skipped"] else ")"))
        worst = sorted((v, c) for c, v in r["per_class"].items() if v is not None)
        print("  per-class top-1, worst first: " + ", ".join(f"{c} {v:.0%}" for v, c in worst[:20]) +
              (f", ... ({len(worst) - 20} more)" if len(worst) > 20 else ""))
    return results["label"] if list(results) == ["label"] else results


def pair_features(args, model, tokenizer):
    """-> (image features [N, D], text features [N, D], skipped) of the --retrieval CSV's image/caption pairs, or
    of the --data folder's images each paired with its class's (template-averaged) text feature."""
    if args.retrieval:
        dataset = data.CsvCaptions(args.retrieval, args.csv_img_key, args.csv_caption_key, args.csv_separator)
    else:
        dataset = data.ImageFolder(args.data)
        w = classifier(model, tokenizer, class_names(args, dataset), read_templates(args.templates or "ensemble"), args.device)
    xs, ys, skipped = [], [], collections.Counter()
    for images, captions, labels, batch_skipped in loader(dataset, model.config.image_resolution, args.batch_size, args.workers):
        skipped += batch_skipped
        if len(images):
            xs.append(F.normalize(model.encode_image(images.to(args.device)).float(), dim=-1))
            ys.append(text_features(model, tokenizer, captions, args.device) if args.retrieval else w.T[labels["label"].to(args.device)])
    if sum(map(len, xs)) < 2:
        raise ValueError(f"{args.retrieval or args.data}: {sum(map(len, xs))} usable images; need at least 2 ({dict(skipped)})")
    return torch.cat(xs).cpu(), torch.cat(ys).cpu(), dict(skipped)


@torch.no_grad()
def run(args):
    model, tokenizer, path = load(args)
    if args.image:
        results = classify_images(args, model, tokenizer)
    elif args.analyze:
        x, y, skipped = pair_features(args, model, tokenizer)
        results = dict(analyze(x, y), skipped=skipped)
        print(f"{results['n']} pairs, embedding dim {results['dim']}: eigenvalues explaining 99% of the covariance: "
              f"images {results['image_eigenvalues_99']}, texts {results['text_eigenvalues_99']}; mean cosine matched "
              f"{results['matched_cosine']:.3f}, unmatched {results['unmatched_cosine']:.3f}" +
              (f"; skipped {skipped}" if skipped else ""))
    elif args.retrieval:
        x, y, skipped = pair_features(args, model, tokenizer)
        results = dict(retrieval_recall(x, y), n=len(x), skipped=skipped)
        print(f"{len(x)} pairs: " + "  ".join(f"{k} {v:.2%}" for k, v in results.items() if "R@" in k) +
              (f"  (skipped {skipped})" if skipped else ""))
    else:
        results = classify_folder(args, model, tokenizer)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(results, model=path) if isinstance(results, dict) else results, f, indent=1)
    return results


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as e:  # bad input: one line, no traceback
        print(f"zeroshot.py: error: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
