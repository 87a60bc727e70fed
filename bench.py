"""Benchmark train.py's training step (forward, loss, backward, AdamW) on synthetic tensors already on the device.
  python bench.py --model ViT-B-16 --batch-size 256 --method cloob --precision bf16 --compile
  python bench.py --model tiny-vit --batch-size 128 --compare        # CLIP and CLOOB interleaved: CLOOB's overhead
  python bench.py --tokenizer clip                                   # captions/s of cloob.Tokenizer
Prints the median step time after warm-up, samples/s, peak memory (GPU) or peak RSS (CPU), model FLOPs per sample
(counted on the model built from the config) and MFU against the device's peak (--peak-tflops to override)."""
import argparse
import json
import resource
import statistics
import sys
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import cloob
import data
import train

# dense tensor-core peak TFLOP/s by (device name substring, precision); fp32 is plain FP32 (no TF32), as torch's default
PEAK_TFLOPS = {
    "H200": {"bf16": 989, "fp16": 989, "fp32": 67}, "H100 PCIe": {"bf16": 756, "fp16": 756, "fp32": 51},
    "H100": {"bf16": 989, "fp16": 989, "fp32": 67}, "A100": {"bf16": 312, "fp16": 312, "fp32": 19.5},
    "L40S": {"bf16": 362, "fp16": 362, "fp32": 91.6}, "L4": {"bf16": 121, "fp16": 121, "fp32": 30.3},
    "A10": {"bf16": 125, "fp16": 125, "fp32": 31.2}, "V100": {"fp16": 125, "fp32": 15.7},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default="tiny-vit", choices=sorted(cloob.CONFIGS))
    a("--method", choices=["cloob", "clip"], default="cloob")
    a("--batch-size", type=int, default=128)
    a("--precision", choices=["fp32", "bf16", "fp16"], help="default bf16 on GPU, fp32 on CPU")
    a("--compile", action="store_true")
    a("--grad-checkpointing", action="store_true")
    a("--accum-steps", type=int, default=1, help="gradient caching over K micro-batches, as train.py")
    a("--steps", type=int, default=20, help="timed steps")
    a("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator, kernels)")
    a("--compare", action="store_true", help="CLIP and CLOOB steps interleaved on one model: CLOOB's overhead")
    a("--tokenizer", help="instead: captions/s of cloob.Tokenizer(NAME) on synthetic captions")
    a("--peak-tflops", type=float, help="the device's peak for MFU (default: a table of common GPUs)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--json", action="store_true", help="print one JSON object instead of text")
    return p.parse_args(argv)


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


def peak_tflops(args, device):
    if args.peak_tflops:
        return args.peak_tflops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, table in PEAK_TFLOPS.items():  # in order: "H100 PCIe" before "H100"
            if key in name:
                return table.get(args.precision)
    return None


def synthetic_batch(config, n, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, config.image_resolution, config.image_resolution, generator=g)
    tokens = torch.randint(1, config.vocab_size - 2, (n, config.context_length), generator=g)
    tokens[:, 0] = config.vocab_size - 2  # start
    tokens[torch.arange(n), torch.randint(4, config.context_length, (n,), generator=g)] = config.vocab_size - 1  # end
    return images.to(device), tokens.to(device)


def bench_steps(args, device):
    """-> {method: [seconds per step]}: one model and optimizer; methods alternate step by step (--compare)."""
    methods = ["clip", "cloob"] if args.compare else [args.method]
    flags = ["--model", args.model, "--batch-size", str(args.batch_size), "--accum-steps", str(args.accum_steps),
             "--precision", args.precision] + ["--compile"] * args.compile + ["--grad-checkpointing"] * args.grad_checkpointing
    targs = {m: train.parse_args(["--method", m, *flags]) for m in methods}  # train.py's own settings
    torch.manual_seed(0)
    model = cloob.CLIP(cloob.CONFIGS[args.model]).to(device)
    model.set_temperature(30.0, learnable=False)  # as CLOOB; CLIP's learnable temperature does not change the cost
    net, optimizer, scaler, ctx = train.prepare(targs[methods[0]], model, device, world=1)
    images, tokens = synthetic_batch(model.config, args.batch_size, device)
    times = {m: [] for m in methods}
    for i in range(args.warmup + args.steps):
        for m in methods:
            sync(device)
            t0 = time.perf_counter()
            train.train_step(targs[m], model, net, optimizer, scaler, ctx, images, tokens, 1)
            sync(device)
            if i >= args.warmup:
                times[m].append(time.perf_counter() - t0)
    return times


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_tokenizer(name, n=20000):
    ds = data.Synthetic(n)
    rng = np.random.default_rng(0)
    captions = [ds.caption(rng, *(rng.choice(x) for x in (data.SHAPES, list(data.COLOURS), list(data.SIZES), list(data.POSITIONS))))
                for _ in range(n)]
    tokenizer = cloob.Tokenizer(name)
    tokenizer(captions[:100])  # warm
    t0 = time.perf_counter()
    tokenizer(captions)
    return {"tokenizer": name, "captions": n, "captions_per_s": n / (time.perf_counter() - t0)}


def main(argv=None):
    args = parse_args(argv)
    if args.tokenizer:
        result = bench_tokenizer(args.tokenizer)
        print(json.dumps(result) if args.json else f"{result['tokenizer']} tokenizer: {result['captions_per_s']:,.0f} captions/s "
              f"({result['captions']} synthetic captions, context 77)")
        return result
    device = torch.device(args.device)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if args.batch_size % args.accum_steps:
        sys.exit(f"bench.py: error: --accum-steps {args.accum_steps} must divide --batch-size {args.batch_size}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = bench_steps(args, device)
    flops, peak = flops_per_sample(cloob.CONFIGS[args.model]), peak_tflops(args, device)
    result = {"model": args.model, "batch_size": args.batch_size, "precision": args.precision, "compile": args.compile,
              "grad_checkpointing": args.grad_checkpointing, "accum_steps": args.accum_steps, "device": device_name(device),
              "gflops_per_sample": flops / 1e9, "peak_tflops": peak, "methods": {}}
    for method, t in times.items():
        step = statistics.median(t)
        tflops = flops * args.batch_size / step / 1e12
        result["methods"][method] = {"step_ms": step * 1e3, "samples_per_s": args.batch_size / step,
                                     "model_tflops": tflops, "mfu": tflops / peak if peak else None}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    else:  # the whole process's high-water mark (Linux: KiB)
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    if args.compare:
        m = result["methods"]
        result["cloob_overhead"] = m["cloob"]["step_ms"] / m["clip"]["step_ms"] - 1
    print(json.dumps(result) if args.json else report(result))
    return result


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def report(r):
    lines = [f"{r['model']}, batch {r['batch_size']}, {r['precision']}{', compiled' if r['compile'] else ''}"
             f"{', grad checkpointing' if r['grad_checkpointing'] else ''}"
             f"{', %d micro-batches' % r['accum_steps'] if r['accum_steps'] > 1 else ''} on {r['device']}: "
             f"{r['gflops_per_sample']:.2f} GFLOPs per sample (train)"]
    for method, m in r["methods"].items():
        mfu = f", MFU {m['mfu']:.1%} of {r['peak_tflops']:g} TFLOP/s" if m["mfu"] is not None else ""
        lines.append(f"  {method}: {m['step_ms']:.1f} ms/step (median), {m['samples_per_s']:,.0f} samples/s, "
                     f"{m['model_tflops']:.2f} TFLOP/s{mfu}")
    lines.append(f"  peak memory {r['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in r else
                 f"  peak RSS {r['peak_rss_gib']:.2f} GiB (whole process)")
    if "cloob_overhead" in r:
        lines.append(f"  CLOOB's step overhead over CLIP: {r['cloob_overhead']:+.1%}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
