"""Zero-shot evaluation: classifiers from class names x prompt templates, top-1 on images, retrieval recall.
train.py calls the same functions for its periodic evaluation. (The command-line tool comes with issue 4.)"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

import data


@torch.no_grad()
def classifier(model, tokenizer, classnames, templates, device="cpu"):
    """[D, C] weights: for each class, encode every template filled with its name, L2-normalise, average,
    renormalise (CLIP's prompt ensembling)."""
    tokens = tokenizer([t.format(c) for c in classnames for t in templates]).to(device)
    features = F.normalize(model.encode_text(tokens).float(), dim=-1).view(len(classnames), len(templates), -1)
    return F.normalize(features.mean(dim=1), dim=-1).T


@torch.no_grad()
def image_features(model, images, device="cpu", batch_size=256):
    """[N, 3, R, R] -> L2-normalised [N, D], in batches."""
    return torch.cat([F.normalize(model.encode_image(images[i:i + batch_size].to(device)).float(), dim=-1)
                      for i in range(0, len(images), batch_size)])


def _shard(n):
    """This rank's share of n items: evaluation is split over ranks, never done by one while others wait."""
    if dist.is_available() and dist.is_initialized():
        return slice(dist.get_rank(), n, dist.get_world_size())
    return slice(0, n)


def _sum_over_ranks(t):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


@torch.no_grad()
def evaluate(model, tokenizer, images, tasks, device="cpu", batch_size=256):
    """Top-1 of each task on the same images. tasks: {name: (labels [N], classnames, templates)}.
    -> {name: top1 in [0, 1]}. Under torch.distributed each rank takes every W-th image; counts are summed."""
    part = _shard(len(images))
    features = image_features(model, images[part], device, batch_size)  # [n, D]
    results = {}
    for name, (labels, classnames, templates) in tasks.items():
        predictions = (features @ classifier(model, tokenizer, classnames, templates, device)).argmax(dim=-1)
        counts = torch.tensor([(predictions.cpu() == labels[part]).sum().item(), len(predictions)], dtype=torch.float64)
        correct, total = _sum_over_ranks(counts.to(device)).tolist()
        results[name] = correct / total
    return results


def synthetic_tasks(resolution, n=250, seed=0):
    """The built-in benchmark: n images of the held-out shape/colour pairs and its zero-shot tasks."""
    heldout = data.Synthetic(n, resolution, split="heldout", seed=seed)
    items = [heldout[i] for i in range(n)]
    images = torch.stack([data.preprocess(image, resolution) for image, _, _ in items])
    tasks = {name: (torch.tensor([labels[name] for _, _, labels in items]), classnames, templates)
             for name, (classnames, templates) in data.ZEROSHOT_TASKS.items()}
    return images, tasks


def retrieval_recall(image_features, text_features, ks=(1, 5)):
    """Image->text and text->image recall@k for matched rows of two normalised [N, D] feature sets."""
    sims = image_features @ text_features.T  # [N, N]
    target = torch.arange(len(sims), device=sims.device)[:, None]
    out = {}
    for direction, s in (("image_to_text", sims), ("text_to_image", sims.T)):
        rank = (s.argsort(dim=-1, descending=True) == target).float().argmax(dim=-1)  # position of the match
        out.update({f"{direction}_R@{k}": (rank < k).float().mean().item() for k in ks})
    return out
