"""Train CLOOB (default) or CLIP, or time its training step.
  python train.py                                    # tiny CLOOB on built-in synthetic data, CPU, ~2 minutes
  torchrun --nproc_per_node=8 train.py --train-data 'cc3m/{00000..00331}.tar' --train-num-samples 2800000
  python train.py --bench --model ViT-B-16 --batch-size 256 --compile     # step time, samples/s, memory, MFU
--batch-size is per rank. The loss is the exact distributed form: the gradient is that of the global batch.
SIGTERM, SIGUSR1 (cluster preemption) or SIGINT at any moment: every rank finishes its step, a checkpoint is saved, the
run stops (torchrun forwards SIGUSR1 only when told: --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1).

Flags. Defaults differ on synthetic data (the demo: tiny-vit, batch 128, lr 5e-4, 500 warm-up steps, 1 cosine cycle,
1000 steps, 0 workers) and on real data (the official CLOOB recipe: RN50, 64 per rank (8 GPUs x 64), lr 1e-3,
20000 warm-up steps, 10 cosine cycles, 70 epochs, 2 workers):
  --pretrained PATH      start from any checkpoint cloob.load_model reads (OpenAI, OpenCLIP, HF, CLOOB, ours)
  --gelu                 --pretrained is a bare OpenCLIP state dict of a GELU model (not -quickgelu)
  --tokenizer            default: the checkpoint's; bytes on synthetic data, else clip
  --init-inv-tau         CLOOB's inverse temperature (fixed unless --learn-inv-tau)
  --train-data           synthetic | FILE.csv/.tsv | 'DIR/{00000..00331}.tar' (or .tar.gz)
  --train-num-samples    samples in an epoch of tar shards (which need it)
  --workers              data-loading processes per rank
  --zeroshot-data DIR    image folder (one sub-folder per class); default on synthetic data: the held-out set
  --zeroshot-every N     steps between zero-shot evaluations (default: at the end)
  --beta2, --eps         AdamW's; default 0.98 for ViTs, 0.999 for ResNets; eps 1e-8 (1e-6 for CLIP on ViTs, as OpenAI)
  --restart-cycles       cosine cycles after the warm-up (each restarts at the full rate)
  --accum-steps K        exact gradient caching over K micro-batches: less memory
  --grad-checkpointing   recompute block activations in the backward: less memory
  --sync-bn              ResNets: BatchNorm over the global batch (world-size invariance)
  --compile              torch.compile the model (default: on with CUDA)
  --steps                optimizer steps (default: from --epochs; 20 with --bench)
  --precision            default bf16 on GPU, fp32 on CPU
  --logs-dir, --name     runs go to LOGS_DIR/NAME (default name: method-model-time; not --logs: torchrun's)
  --save-every N         steps between checkpoints (and one at the end)
  --resume               latest (needs --name: the run's newest readable checkpoint; a new run if it has none) | PATH
  --bench                time the training step on tensors already on the device instead"""
import argparse
import gc
import json
import math
import os
import pathlib
import shlex
import signal
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, replace
from functools import partial

import torch
import torch.distributed as dist
import torch.utils.benchmark
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.data import DataLoader

import cloob
import data
import zeroshot


def checked(kind, ok, rule):
    """An argparse type: a `kind` value for which ok(value) holds, else a usage error saying `rule`."""
    def number(text):  # argparse names it in "invalid number value"
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} is not {rule}")
        return value
    return number


COUNT = checked(int, lambda v: v >= 1, ">= 1")
NATURAL = checked(int, lambda v: v >= 0, ">= 0")
POSITIVE = checked(float, lambda v: 0 < v < math.inf, "> 0")
# on synthetic data, the demo: a long warm-up (half the run) keeps CLOOB from locking in on colour early (README, Train)
DEMO = dict(model="tiny-vit", batch_size=128, lr=5e-4, warmup=500, restart_cycles=1, steps=1000, workers=0,
            zeroshot_data="synthetic")
# on real data, the official CLOOB recipe (Conceptual Captions: 8 GPUs x 64)
RECIPE = dict(model="RN50", batch_size=64, lr=1e-3, warmup=20000, restart_cycles=10, epochs=70, workers=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--method", choices=["cloob", "clip"], default="cloob")
    a("--model", choices=sorted(cloob.CONFIGS))
    a("--pretrained")
    a("--gelu", action="store_true")
    a("--tokenizer", choices=["clip", "bytes"])
    a("--init-inv-tau", type=POSITIVE, default=30.0)
    a("--learn-inv-tau", action="store_true")
    a("--hopfield-beta", type=POSITIVE, default=8.0)
    a("--train-data", default="synthetic")
    a("--train-num-samples", type=COUNT)
    data.csv_arguments(p)
    a("--workers", type=NATURAL)
    a("--zeroshot-data")
    a("--zeroshot-every", type=COUNT)
    a("--batch-size", type=COUNT)
    a("--lr", type=POSITIVE)
    a("--wd", type=checked(float, lambda v: 0 <= v < math.inf, ">= 0"), default=0.1)
    a("--beta2", type=checked(float, lambda v: 0 <= v < 1, "in [0, 1)"))
    a("--eps", type=POSITIVE)
    a("--warmup", type=NATURAL)
    a("--restart-cycles", type=COUNT)
    a("--accum-steps", type=COUNT, default=1)
    a("--grad-checkpointing", action="store_true")
    a("--sync-bn", action="store_true")
    a("--compile", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available())
    a("--steps", type=COUNT)
    a("--epochs", type=COUNT)
    a("--seed", type=NATURAL, default=0)
    a("--precision", choices=["fp32", "bf16", "fp16"], default="bf16" if torch.cuda.is_available() else "fp32")
    a("--logs-dir", default="logs")
    a("--name")
    a("--save-every", type=COUNT, default=1000)
    a("--resume")
    a("--log-every", type=COUNT, default=10)
    a("--bench", action="store_true")
    args = p.parse_args(argv)
    if args.resume == "latest" and not args.name:  # else each start would name a new run directory
        p.error("--resume latest needs --name (a run without one is named after its start time)")
    synthetic, tar = args.train_data == "synthetic", args.train_data.endswith(data.TAR_EXTS)
    if args.pretrained:  # the architecture is the checkpoint's; the run is named after it
        args.model = os.path.basename(os.path.normpath(args.pretrained)).split(".")[0]
    if args.bench:
        args.steps = args.steps or 20
    if args.epochs and args.steps is None:  # the length in epochs, not the demo's steps
        args.steps = 0
    # the data's defaults for what the command leaves out, named in the start line
    args.defaults = {k: v for k, v in (DEMO if synthetic else RECIPE).items() if getattr(args, k) is None}
    vars(args).update(args.defaults)
    args.name = args.name or f"{args.method}-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not (synthetic or tar or args.train_data.endswith((".csv", ".tsv"))):
        p.error(f"--train-data {args.train_data!r}: expected synthetic, a .csv/.tsv file or .tar/.tar.gz shards")
    if args.batch_size % args.accum_steps:
        p.error(f"--accum-steps {args.accum_steps} must divide --batch-size {args.batch_size}")
    if tar != bool(args.train_num_samples) and not synthetic:
        p.error("--train-num-samples is for tar shards, and they need it (a CSV's epoch: its rows)")
    return args


def get_lr(step, args, total):
    """Linear warmup, then cosine to 0, in `restart_cycles` cycles (each restarts at the full rate)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, total - args.warmup) * args.restart_cycles % 1.0
    return 0.5 * args.lr * (1 + math.cos(math.pi * progress))


def build_model(args, device):
    """-> (model, tokenizer) from a preset or --pretrained, temperature set for the method."""
    if args.pretrained:
        model, info = cloob.load_model(args.pretrained, **(dict(quick_gelu=False) if args.gelu else {}))
        tokenizer = cloob.tokenizer_for(model.config, args.tokenizer or info["tokenizer"])
    else:
        config, tokenizer = cloob.CONFIGS[args.model], None
        # a new model takes its tokenizer's vocabulary (--bench's tokens are random)
        if not args.bench:
            tokenizer = cloob.Tokenizer(args.tokenizer or ("bytes" if args.train_data == "synthetic" else "clip"),
                                        config.context_length)
            config = replace(config, vocab_size=tokenizer.vocab_size)
        torch.manual_seed(args.seed)
        model = cloob.CLIP(config)
    if args.method == "cloob":  # CLIP's: a new model's (1/0.07, learnable), or the loaded one's
        model.set_temperature(args.init_inv_tau, learnable=args.learn_inv_tau)
    return model.to(device).train(), tokenizer  # load_model gives eval mode


def settings(args, model, tokenizer, world):
    """The run's settings, resolved once the model is known: the command's (with the data's defaults), AdamW's beta2
    and eps for the model trained (preset or loaded), and what a resume must match (tokenizer, ranks, global batch,
    loader slots).
    Every step after this reads them; config.json and each checkpoint record them; a resume compares them."""
    vit = isinstance(model.config.vision_layers, int)
    # CLOOB's loss carries a factor 1/inv_tau: its gradients are ~100x smaller than CLIP's, and an epsilon of 1e-6
    # (OpenAI's for ViTs) would damp its Adam steps
    eps = 1e-6 if vit and args.method == "clip" else 1e-8
    # loader_slots: the streams a rank reads tar shards in (--workers 0 and 1: one)
    resolved = dict(beta2=args.beta2 or (0.98 if vit else 0.999), eps=args.eps or eps, tokenizer=tokenizer,
                    world_size=world, global_batch=world * args.batch_size, loader_slots=max(1, args.workers))
    return argparse.Namespace(**vars(args) | resolved)


def open_data(args, rank, world):
    """The training dataset, opened before the model so that a bad path or an empty file fails at once."""
    if args.train_data.endswith(data.TAR_EXTS):
        return data.TarShards(args.train_data, args.batch_size, rank=rank, world=world, seed=args.seed,
                              workers=args.workers)
    if args.train_data == "synthetic":
        return data.Synthetic(args.train_num_samples or 10 ** 6, seed=args.seed)
    return data.CsvCaptions(args.train_data, args.csv_img_key, args.csv_caption_key, args.csv_separator)


def build_loader(args, dataset, tokenizer, resolution, rank, world, start, positions):
    """-> (iterator of this rank's (images, tokens, skipped, stream position) from step `start` on, steps per epoch).
    Every item of the dataset is one batch: tar shards stream them from `positions` (their loader slots', as
    data.TarShards says), the others are indexed by data.global_batches. The loader is iterated once, forever."""
    kw = dict(batch_size=None, num_workers=args.workers, collate_fn=partial(_tokenize, tokenizer),
              worker_init_fn=data.worker_signals, pin_memory=torch.cuda.is_available())
    dataset.resolution = resolution  # images are made at the model's resolution
    epoch = data.steps_per_epoch(args.train_num_samples or len(dataset), args.batch_size * world)
    if isinstance(dataset, data.TarShards):
        dataset.start, dataset.positions = start, positions
        return iter(DataLoader(dataset, **kw)), epoch
    batches = dataset if isinstance(dataset, data.Synthetic) else data.TrainSet(dataset, resolution, args.seed)
    sampler = data.global_batches(len(dataset), args.batch_size, rank, world, args.seed, start, args.accum_steps)
    return iter(DataLoader(batches, sampler=sampler, **kw)), epoch


def _tokenize(tokenizer, batch):  # in the loader workers
    images, captions, skipped, position = batch
    return images, tokenizer(captions), skipped, position


# ---------------------------------------------------------------------------------------------------- checkpoints


def save(args, run_dir, model, tokenizer, optimizer, scaler, step, positions):
    """Rank 0 writes the checkpoint of step `step`, with every rank's loader slots' stream positions (tar shards).
    No RNG state: nothing draws from torch's generators while training (data randomness is numpy's, a function of
    seed, step and index). -> its path."""
    path = run_dir / "checkpoints" / f"step_{step:07d}.pt"
    stream = zeroshot._all_ranks(positions)
    if cloob.rank0():
        cloob.save_checkpoint(path, model, tokenizer.name, args.method, inv_tau=model.logit_scale.exp().item(),
                              beta=args.hopfield_beta if args.method == "cloob" else None, step=step, stream=stream,
                              optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), args=vars(args))
        # keep the newest two (the run directory holds only this run)
        for old in cloob.checkpoints(run_dir)[:-2]:
            os.remove(old)
    return path


# with the model config: what the continuation depends on (CLOOB's temperatures for CLOOB runs only)
RESUME_KEYS = ("method", "tokenizer", "global_batch", "seed", "train_data", "train_num_samples")
CLOOB_KEYS = ("hopfield_beta", "init_inv_tau", "learn_inv_tau")


def resume(args, run_dir, model, optimizer, scaler):
    """-> (the step to continue from, the checkpoint, every rank's loader positions), (0, None, None) for a new run.
    --resume latest takes the newest checkpoint that can be read (saying which it skipped); a run directory with
    checkpoints needs --resume. This run's --lr, --wd, --beta2 and --eps apply from here on (the resume line names
    those that changed)."""
    found = cloob.checkpoints(run_dir)
    if not args.resume:
        if found:
            raise ValueError(f"{run_dir} has checkpoints: continue with --resume latest or pick another --name")
        return 0, None, None
    for path in found[::-1] if args.resume == "latest" else [args.resume]:
        try:
            ckpt = cloob.read_file(path)
        except ValueError as e:
            if args.resume != "latest":
                raise ValueError(f"--resume: {e}") from None
            print0(f"--resume latest: skipping {e}")
            continue
        if not isinstance(ckpt, dict) or not {"args", "optimizer", "stream"} <= ckpt.keys():
            raise ValueError(f"--resume: {path} is not a train.py checkpoint (start from its weights: --pretrained)")
        ours = dict(vars(args), **asdict(model.config))
        theirs = dict(ckpt["args"], **ckpt["config"])
        keys = [*ckpt["config"], *RESUME_KEYS, *(CLOOB_KEYS if args.method == "cloob" else [])]
        if args.train_data.endswith(data.TAR_EXTS):  # which shards feed which batch
            keys += ["loader_slots", "world_size"]
        differ = [f"{k} {theirs[k]!r} -> {ours[k]!r}" for k in keys if theirs[k] != ours[k]]
        if differ:
            raise ValueError(f"--resume: this run differs from {path} in {'; '.join(differ)} (a new run: --pretrained)")
        model.load_state_dict(ckpt["state_dict"])
        # AdamW's moments and step counts; its settings (the groups) are this run's, as prepare made them
        optimizer.load_state_dict(dict(ckpt["optimizer"], param_groups=optimizer.state_dict()["param_groups"]))
        if ckpt["scaler"]:  # an fp16 run's; a run switched to fp16 starts a new scale
            scaler.load_state_dict(ckpt["scaler"])
        changed = [f"; {k} {theirs[k]:g} -> {ours[k]:g}" for k in ("lr", "wd", "beta2", "eps") if theirs[k] != ours[k]]
        print0(f"resuming from {path} (step {ckpt['step']}{''.join(changed)})")
        return ckpt["step"], path, ckpt["stream"]
    if found:
        raise ValueError(f"--resume latest: no readable checkpoint in {run_dir}/checkpoints")
    print0(f"--resume latest: no checkpoint in {run_dir} yet: starting a new run")
    return 0, None, None


def open_run_dir(args, run_dir, start, total):
    """Rank 0: the run directory with this run's config.json; leftovers of a save that was killed removed; after a
    resume, metrics.jsonl keeps only the steps up to the checkpoint (the run logs the later ones again), and
    checkpoints after it (a rollback with --resume PATH) are moved aside: --resume latest continues this line."""
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    for tmp in (run_dir / "checkpoints").glob("*.tmp"):
        tmp.unlink()
    aside = run_dir / f"rolled_back_{time.strftime('%Y%m%d-%H%M%S')}"
    for path in map(pathlib.Path, cloob.checkpoints(run_dir)):
        if int(path.stem.removeprefix("step_")) > start:  # step_0000040.pt
            print(f"--resume {args.resume}: a later checkpoint, {path.name}, is moved to {aside}")
            os.renames(path, aside / path.name)  # makes the folder
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        lines = metrics.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.endswith("}\n") and json.loads(line)["step"] <= start]
        (run_dir / "metrics.tmp").write_text("".join(kept))
        os.replace(run_dir / "metrics.tmp", metrics)
    (run_dir / "config.json").write_text(json.dumps(dict(vars(args), total_steps=total), indent=1))


def print0(line, run_dir=None, event=None):
    """Rank 0 prints the line and appends the event to the run's metrics.jsonl."""
    if cloob.rank0():
        print(line, flush=True)
        if event:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(event) + "\n")

# ---------------------------------------------------------------------------------------------------- the step


def prepare(args, model, device, world):
    """What a training step needs -> (net: the model to call, possibly in DDP and/or torch.compile; AdamW with weight
    decay on tensors of >= 2 dims only, fused: one kernel, and it can skip a step on the device; GradScaler, active
    for fp16 only; the autocast context, or none for fp32)."""
    model.set_grad_checkpointing(args.grad_checkpointing)
    if args.sync_bn:  # statistics of the global batch
        cloob.convert_sync_batchnorm(model)
    if device.type == "cuda" and not isinstance(model.config.vision_layers, int):
        # faster convolutions on tensor cores; the NCHW images follow (cuDNN's layout is channels_last if the weights')
        model.visual.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.wd},
              # not gains, biases, temperature
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2), eps=args.eps, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    # DDP, then compile (so DDP's buckets become graph breaks); gradient caching does its own all-reduce
    net = model
    if world > 1 and args.accum_steps == 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
    net = torch.compile(net) if args.compile else net
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    return net, optimizer, scaler, torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def compute_loss(args, model, x, y):
    scale = model.logit_scale.exp()
    if args.method == "cloob":
        return cloob.cloob_loss(x, y, scale, args.hopfield_beta)
    return cloob.clip_loss(x, y, scale)


def grad_cache_backward(args, model, net, images, tokens, ctx, scaler, world):
    """Exact gradient caching (Gao et al., 2021) over K = --accum-steps micro-batches of this rank's batch:
    1. encode every micro-batch without autograd: the features of the whole batch;
    2. the loss on them (negatives from all micro-batches, and from all ranks), back-propagated to the features
       and to the temperature (its gradient is counted once, here);
    3. re-encode each micro-batch with autograd and back-propagate its slice of the feature gradient.
    By the chain rule the parameter gradient is the whole batch's; activations are those of one micro-batch.
    DDP is bypassed: the gradients are averaged over ranks once, at the end, as DDP would. -> (the loss, the buffers
    after the first micro-batch's forward: BatchNorm's running statistics advance once per step)."""
    chunks = list(zip(images.chunk(args.accum_steps), tokens.chunk(args.accum_steps)))
    with torch.no_grad(), ctx:
        features = [net(*chunks[0])]
        saved = [b.clone() for b in model.buffers()]
        features += [net(i, t) for i, t in chunks[1:]]
    # [B, D]; the loss computes in float32 (or float64)
    x = torch.cat([f[0] for f in features]).requires_grad_()
    y = torch.cat([f[1] for f in features]).requires_grad_()
    loss = compute_loss(args, model, x, y)
    scaler.scale(loss).backward()  # -> x.grad, y.grad [B, D] (scaled like the loss under fp16)
    for (i, t), gx, gy in zip(chunks, x.grad.chunk(args.accum_steps), y.grad.chunk(args.accum_steps)):
        with ctx:
            xk, yk = net(i, t)
        torch.autograd.backward([xk, yk], [gx.to(xk.dtype), gy.to(yk.dtype)])
    if world > 1:  # one flat all-reduce (gloo has no AVG)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.nn.utils.parameters_to_vector(grads)
        dist.all_reduce(flat)
        # each gradient becomes a view of `flat`
        torch.nn.utils.vector_to_parameters(flat.div_(world), grads)
    return loss, saved


def train_step(args, model, net, optimizer, scaler, ctx, images, tokens, world):
    """One optimizer step on this rank's batch. model: the plain CLIP; net: what to call, the model possibly
    wrapped in DDP and/or torch.compile. A step whose loss or gradients are not finite, on any rank, is skipped:
    weights, optimizer state and buffers (BatchNorm's running statistics) stay as they were.
    -> (loss, [1.0 if the loss is finite on every rank, 1.0 if the gradients are]), device tensors: no host sync."""
    device = model.logit_scale.device
    # pixels in 0..255 -> CLIP's input
    images = data.normalize(images.to(device, non_blocking=True))
    tokens = tokens.to(device, non_blocking=True)
    before = [b.clone() for b in model.buffers()]
    if args.accum_steps > 1:
        loss, after = grad_cache_backward(args, model, net, images, tokens, ctx, scaler, world)
    else:
        with ctx:
            x, y = net(images, tokens)
        # checkpointing's recompute in the backward changes them again
        after = [b.clone() for b in model.buffers()]
        loss = compute_loss(args, model, x, y)
        scaler.scale(loss).backward()
    # fp16: the gradients' true values, inf where they overflowed (else nothing to do)
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    finite = torch.stack([loss.detach(), grad_norm]).isfinite().float()
    if world > 1:  # not finite on any rank: the step is skipped everywhere
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    taken = finite.min()
    # fused AdamW leaves weights and moments untouched when this is 1
    optimizer.found_inf = 1 - taken
    optimizer.step()
    scaler.update()  # fp16: a smaller loss scale after an overflow
    # statistics advance once a step, or not at all
    for buffer, old, new in zip(model.buffers(), before, after):
        buffer.copy_(torch.where(taken.bool(), new, old))
    if model.logit_scale.requires_grad:  # CLIP's and CLOOB's (official code) clamp: 1/T in [1, 100]
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), finite

# ---------------------------------------------------------------------------------------------------- speed


# dense bf16/fp16 tensor-core peaks in TFLOP/s, by device-name substring (first match); MFU is left out for fp32
PEAK_TFLOPS = {"H100 PCIe": 756, "H100": 989, "H200": 989, "A100": 312, "L40S": 362, "L4": 121, "A10": 125}


def flops_per_sample(config):
    """Training FLOPs (forward + backward) of both towers for one image-caption pair, counted by torch's
    FlopCounterMode on the model built on the meta device (no memory, no compute). The loss (O(batch) per
    sample) and the optimizer are left out, as is usual for MFU."""
    with torch.device("meta"):
        model = cloob.CLIP(config)
        images = torch.zeros(2, 3, config.image_resolution, config.image_resolution)
        tokens = torch.zeros(2, config.context_length, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        x, y = model(images, tokens)
        (x.sum() + y.sum()).backward()
    return counter.get_total_flops() / 2


def bench(args, model, device, world):
    """Time train_step on a batch already on the device: the mean of --steps steps after 5 warm-up steps (compilation,
    the allocator, kernel choice), the device synchronised. -> a dict, printed as one JSON object."""
    args = settings(args, model, None, world)
    net, optimizer, scaler, ctx = prepare(args, model, device, world)
    c = model.config
    images = torch.zeros(args.batch_size, 3, c.image_resolution, c.image_resolution, dtype=torch.uint8, device=device)
    # every position used
    tokens = torch.full((args.batch_size, c.context_length), c.vocab_size - 1, device=device)
    step = partial(train_step, args, model, net, optimizer, scaler, ctx, images, tokens, world)
    for _ in range(5):
        step()
    timer = torch.utils.benchmark.Timer("step()", globals=dict(step=step), num_threads=torch.get_num_threads())
    seconds, flops = timer.timeit(args.steps).mean, flops_per_sample(c)
    name, peak, memory = "cpu", None, None
    if device.type == "cuda":
        name, memory = torch.cuda.get_device_name(device), torch.cuda.max_memory_allocated(device) / 2 ** 30
    if args.precision != "fp32":  # bf16/fp16 tensor-core peaks
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    result = dict(vars(args), step_ms=seconds * 1e3, samples_per_s=args.batch_size / seconds, device=name,
                  flops_per_sample=flops, peak_memory_gib=memory,
                  mfu=flops * args.batch_size / seconds / (peak * 1e12) if peak else None)
    print(json.dumps(result))
    return result

# ---------------------------------------------------------------------------------------------------- the loop


RECEIVED = []  # stop signals this process got


def train(args, rank, world, device):
    """-> 0 when the run finished, 128 + the signal's number when a stop signal ended it early (after a checkpoint)."""
    run_dir = pathlib.Path(args.logs_dir, args.name)
    dataset = open_data(args, rank, world)
    model, tokenizer = build_model(args, device)
    args = settings(args, model, tokenizer.name, world)
    net, optimizer, scaler, ctx = prepare(args, model, device, world)
    start, last_good, stream = resume(args, run_dir, model, optimizer, scaler)
    # this rank's loader slots' stream positions (tar shards; none: from the start)
    positions = stream[rank] if stream else {}
    resolution = model.config.image_resolution
    batches, steps_per_epoch = build_loader(args, dataset, tokenizer, resolution, rank, world, start, positions)
    total = args.steps or args.epochs * steps_per_epoch
    if start >= total:  # a requeued job whose run has finished is not a failure
        print0(f"{run_dir} has finished: step {start} of {total}; nothing to do (raise --steps to go on)")
        return 0
    tasks = None  # at zeroshot.py's batch size
    if args.zeroshot_data:
        tasks = zeroshot.benchmark(args.zeroshot_data, resolution, workers=args.workers)
    if rank == 0:
        open_run_dir(args, run_dir, start, total)
    print0(f"{args.method} {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
           f"{world} x {args.batch_size} per step, {total} steps, {args.precision} on {device.type} -> {run_dir}")
    recipe = "the demo's" if args.train_data == "synthetic" else "the official CLOOB recipe's (real data)"
    print0(f"defaults, {recipe}: {args.defaults}")
    if args.warmup >= total:
        print0(f"warning: the warm-up ({args.warmup} steps) is the whole run: the rate stays below --lr")
    skipped = Counter()  # unusable samples, by reason
    t0 = time.time()
    waiting = 0.0  # for the next batch, in seconds
    streak = nonfinite = overflows = 0  # steps skipped: not finite in a row, not finite in all, fp16 overflows
    for step in range(start, total):
        lr = get_lr(step, args, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        wait = time.time()
        images, tokens, batch_skipped, positions[step % args.loader_slots] = next(batches)  # its loader slot's position
        waiting += time.time() - wait
        skipped += batch_skipped
        loss, finite = train_step(args, model, net, optimizer, scaler, ctx, images, tokens, world)
        loss_finite, grads_finite = finite.tolist()  # the step's one wait for the device
        if loss_finite and grads_finite:
            streak = 0
        elif loss_finite and args.precision == "fp16":  # GradScaler's calibration: the loss scale halves
            overflows += 1
        else:
            streak += 1
            nonfinite += 1
        done = step + 1
        if streak == 5:  # the weights are those before the first of these steps
            raise FloatingPointError(f"the loss or its gradients were not finite for 5 steps in a row (by step "
                                     f"{done}); last checkpoint: {last_good}; try a lower --lr")
        if done % args.log_every == 0 or done == total:
            # the loss averaged and unusable samples summed over ranks (CPU tensors: gloo, no device sync)
            stats = torch.tensor([loss.item(), sum(skipped.values())], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(stats)
            elapsed = time.time() - t0
            event = dict(step=done, epoch=done / steps_per_epoch, loss=stats[0].item() / world, lr=lr,
                         inv_temperature=model.logit_scale.exp().item(), data_wait=waiting / elapsed,
                         samples_per_s=(done - start) * args.global_batch / elapsed, skipped=int(stats[1]),
                         nonfinite_steps=nonfinite, fp16_overflows=overflows)
            line = (f"step {done}/{total} epoch {event['epoch']:.2f} loss {event['loss']:.4f} lr {lr:.2e} 1/T "
                    f"{event['inv_temperature']:.1f} {event['samples_per_s']:.0f} samples/s data "
                    f"{event['data_wait']:.0%} eta {(total - done) / (done - start) * elapsed / 60:.1f} min")
            line += f" skipped {dict(skipped)}" if skipped else ""
            line += f" non-finite: {nonfinite} steps skipped" if nonfinite else ""
            if overflows:
                line += f" fp16 overflows: {overflows} (loss scale now 2^{math.log2(scaler.get_scale()):g})"
            print0(line, run_dir, event)
        stop = torch.tensor(RECEIVED[0] if RECEIVED else 0)  # a stop signal's number, or 0
        if world > 1:  # a rank may get the signal a step after another: the MAX makes them agree
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        stop = int(stop)
        save_now = done % args.save_every == 0 or done == total or stop
        evaluate_now = (args.zeroshot_every and done % args.zeroshot_every == 0) or done == total
        if world > 1 and (save_now or evaluate_now):  # without --sync-bn, each rank's BatchNorm statistics drift
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)
        if save_now:
            last_good = save(args, run_dir, model, tokenizer, optimizer, scaler, done, positions)
        if evaluate_now and tasks:  # also at a stop: the resumed run starts after this step
            # every rank evaluates its share of the images and gets the same results
            results = zeroshot.evaluate(model.eval(), tokenizer, *tasks, device)
            model.train()
            top1 = {f"zeroshot/{task}/top1": r["top1"] for task, r in results.items()}
            line = "  ".join(f"{k} {v:.4f}" for k, v in top1.items())
            print0(f"step {done}: {line}", run_dir, dict(step=done, **top1))
        if stop and done < total:
            print0(f"stopped by {signal.Signals(stop).name} after step {done}: saved {last_good}; continue with the "
                   f"same command and --name {shlex.quote(args.name)} --resume latest")
            if world > 1:
                dist.barrier()  # every rank exits after rank 0 has saved
            return 128 + stop
    print0(f"done: checkpoints and metrics.jsonl in {run_dir}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = cloob.setup_distributed()
    try:
        if args.bench:
            return bench(args, build_model(args, device)[0], device, world)
        code = train(args, rank, world, device)
    except (OSError, ValueError, FloatingPointError, RuntimeError) as e:  # ours; a loader worker's: its last line
        if isinstance(e, RuntimeError) and world == 1:  # a bug: its traceback
            raise
        # under torchrun also a collective that failed when another rank stopped (its own line says why)
        print(f"train.py: error: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        traceback.clear_frames(e.__traceback__)  # frees the loader's workers now (at exit they would wait 5 s)
        gc.collect()
        code = 1
    finally:
        if dist.is_initialized():
            gc.collect()  # the DDP wrapper lives in reference cycles: free it while its process group is still alive
            dist.destroy_process_group()
    if code:
        sys.exit(code)


if __name__ == "__main__":
    # from here on a stop signal is a request: the loop saves after its step and returns
    for s in data.STOP_SIGNALS:
        signal.signal(s, lambda number, frame: RECEIVED.append(number))
    main()
