"""Tests: CPU, offline, about a minute on 2 cores. Reference outputs made by the peers' own code (OpenAI's CLIP, the
official CLOOB loss, OpenCLIP, Hugging Face transformers, ftfy) are read from reference/, which holds the script that
remade them. Each mechanism a researcher may edit has a test that fails when one line of it is wrong."""
import collections
import contextlib
import dataclasses
import gc
import glob
import io
import json
import math
import os
import pathlib
import re
import shlex
import signal
import struct
import subprocess
import sys
import tarfile
import time
import traceback
import zlib
from functools import partial

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

import cloob
import data
import train
import zeroshot

HERE = os.path.dirname(os.path.abspath(__file__))
REF = os.path.join(HERE, "reference")
# a few-thousand-parameter ViT for tests that only need some model
MICRO = cloob.ModelConfig(embed_dim=16, image_resolution=16, vision_layers=1, vision_width=64, vision_patch_size=8,
                          context_length=8, vocab_size=32, transformer_width=32, transformer_heads=2,
                          transformer_layers=1)
# train.py flags for short runs of the tiny ViT on synthetic data
FAST = ["--model", "tiny-vit", "--workers", "0", "--log-every", "1", "--warmup", "2", "--lr", "1e-3"]
CPU = torch.device("cpu")
BENCHMARKS = {}  # arguments -> the synthetic held-out benchmark


@pytest.fixture(autouse=True)
def collect_only_this_tests_garbage():
    """What exists when a test starts is left out of the collections in it (train.py's error path runs one, to end
    loader workers at once): a collection then takes milliseconds, not a quarter of a second."""
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(autouse=True)
def synthetic_benchmark_made_once(monkeypatch):
    """Every synthetic run ends with a zero-shot evaluation on the 500 held-out images: in the tests, on their first
    100 (the learning test's colour accuracy holds there too), rendered once per set of arguments for the whole suite.
    Together a few seconds less. evaluate() only reads the batches."""
    benchmark = zeroshot.benchmark

    def made_once(where, *args, **kwargs):
        key = (where, *args, *sorted(kwargs.items()))
        if where != "synthetic" or dist.is_initialized():
            return benchmark(where, *args, **kwargs)
        if key not in BENCHMARKS:
            tasks, [(images, labels, skipped)] = benchmark(where, *args, **kwargs)
            BENCHMARKS[key] = tasks, [(images[:100], {k: v[:100] for k, v in labels.items()}, skipped)]
        return BENCHMARKS[key]
    monkeypatch.setattr(zeroshot, "benchmark", made_once)


def ref(name):
    return os.path.join(REF, name)


def load_ref(name):
    return torch.load(ref(name), weights_only=True)


def rel_err(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


def outputs(model, image, text):
    with torch.no_grad():
        x, y = model(image, text)
        return model.encode_image(image), model.encode_text(text), model.logit_scale.exp() * x @ y.T


def micro_batch(n, seed=0):
    """n random images and token rows for MICRO, each row with its end token somewhere after the first position."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, MICRO.vocab_size - 1, (n, MICRO.context_length), generator=g)
    tokens[torch.arange(n), torch.randint(1, MICRO.context_length, (n,), generator=g)] = MICRO.vocab_size - 1
    return torch.randn(n, 3, 16, 16, generator=g), tokens


def one_line_error(fn, *args, **kwargs):
    with pytest.raises(ValueError) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def train_error(capsys, *argv):
    """The one line train.py prints when it refuses argv (exit status 1)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(list(argv))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1 and err.startswith("train.py: error: "), err
    return err


def metrics(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def losses(run_dir):
    return [e["loss"] for e in metrics(run_dir) if "loss" in e]


def final_weights(run_dir):
    return torch.load(cloob.checkpoints(str(run_dir))[-1], weights_only=True)


def same_weights(a, b, atol=1e-6):
    return a.keys() == b.keys() and all(torch.allclose(a[k].double(), b[k].double(), atol=atol) for k in a)


def png(pixels):
    return Image.fromarray(pixels.round().astype(np.uint8))


def write_images(folder, n, resolution=32, seed=0):
    """n synthetic images saved as PNG files; -> [(file name, caption, labels)]."""
    os.makedirs(folder, exist_ok=True)
    pixels, captions, labels = data.Synthetic(n, resolution, seed=seed).render(range(n))
    for i in range(n):
        png(pixels[i]).save(os.path.join(folder, f"{i:04d}.png"))
    return [(f"{i:04d}.png", captions[i], {k: v[i] for k, v in labels.items()}) for i in range(n)]


def write_tar(path, members):
    with tarfile.open(path, "w:gz" if str(path).endswith(".gz") else "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def write_shards(folder, n_shards, per_shard, ext=".tar"):
    """Webdataset shards of synthetic JPEGs with unique captions; -> the brace pattern naming them."""
    os.makedirs(folder, exist_ok=True)
    pixels, captions, _ = data.Synthetic(n_shards * per_shard, 32).render(range(n_shards * per_shard))
    for s in range(n_shards):
        members = []
        for i in range(s * per_shard, (s + 1) * per_shard):
            buf = io.BytesIO()
            png(pixels[i]).save(buf, format="JPEG")
            members += [(f"{i:06d}.jpg", buf.getvalue()), (f"{i:06d}.txt", f"{captions[i]} #{i}".encode())]
        write_tar(os.path.join(folder, f"{s:05d}{ext}"), members)
    return os.path.join(folder, "{00000..%05d}%s" % (n_shards - 1, ext))


@pytest.fixture(scope="module")
def eval_folder(tmp_path_factory):
    """A class-per-folder image set from the synthetic generator (3 shapes, 7 images each, one corrupt file), a saved
    MICRO-sized model with the bytes tokenizer, and a CSV of those images with two captions each, the image paths
    spelled in several ways."""
    root = tmp_path_factory.mktemp("zs")
    pixels, _, labels = data.Synthetic(60, 24, split="heldout").render(range(60))
    counts = collections.Counter()
    for i in range(60):
        shape = data.SHAPES[labels["shape"][i]]
        if shape != "triangle" and counts[shape] < 7:
            counts[shape] += 1
            os.makedirs(root / "images" / shape.replace("circle", "round_disc"), exist_ok=True)
            png(pixels[i]).save(root / "images" / shape.replace("circle", "round_disc") / f"{i}.png")
    (root / "images" / "square" / "broken.jpg").write_bytes(b"not a jpeg")
    torch.manual_seed(0)
    model = cloob.CLIP(dataclasses.replace(MICRO, vocab_size=258, context_length=24))
    model.set_temperature(30.0, learnable=False)
    cloob.save_checkpoint(str(root / "run" / "checkpoints" / "step_0000005.pt"), model, "bytes", "cloob", inv_tau=30.0)
    rows = ["filepath,title"]
    for d in ("diamond", "square"):
        for j, f in enumerate(sorted(os.listdir(root / "images" / d))):
            spellings = [f"images/{d}/{f}", f"./images/{d}//{f}", str(root / "images" / d / f)]
            rows += [f"{spellings[j % 3]},a {d}", f"{spellings[(j + 1) % 3]},one {d} number {j}"]
    (root / "pairs.csv").write_text("\n".join(rows + ["missing.png,a ghost", "images/diamond/x.png,"]) + "\n")
    return root


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory):
    """A micro model with CLIP's vocabulary and context, saved as train.py does."""
    torch.manual_seed(0)
    model = cloob.CLIP(dataclasses.replace(MICRO, vocab_size=49408, context_length=77))
    path = str(tmp_path_factory.mktemp("clip") / "micro.pt")
    cloob.save_checkpoint(path, model, "clip", "clip")
    return path

# ---------------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_rn"])
def test_matches_openai_outputs(name, tmp_path):
    d = load_ref(f"{name}.pt")
    # saved as OpenCLIP does: under "state_dict", with DDP's "module." prefix
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in d["state_dict"].items()}}, tmp_path / "oc.pt")
    model, info = cloob.load_model(str(tmp_path / "oc.pt"), quick_gelu=True, **d["args"])
    assert info["format"] == "openai-state-dict" and not model.training
    image_features, text_features, logits = outputs(model, d["image"], d["text"])
    # the measured error is 7e-7 of values up to 3 (float32 rounding)
    assert rel_err(image_features, d["image_features"]) <= 1e-6
    assert rel_err(text_features, d["text_features"]) <= 1e-6
    assert rel_err(logits, d["logits_per_image"]) <= 1e-6
    # everything but the text heads (not in the weights; OpenAI assumes width/64) is inferred from shapes
    inferred = cloob.infer_config(d["state_dict"])
    assert dataclasses.replace(inferred, transformer_heads=d["args"]["transformer_heads"]) == cloob.ModelConfig(
        **d["args"]
    )


def test_openai_torchscript_archive_loads():
    d = load_ref("tiny_vit.pt")
    # every archive OpenAI released has 64-wide text heads; this tiny one has 2 heads of 16, given as for a state dict
    model, info = cloob.load_model(ref("tiny_vit_openai_jit.pt"), transformer_heads=2)
    assert info["format"] == "openai-torchscript" and info["tokenizer"] == "clip"
    assert info["config"] == dataclasses.replace(cloob.ModelConfig(**d["args"]), quick_gelu=True)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    archive = torch.jit.load(ref("tiny_vit_openai_jit.pt")).state_dict()
    assert archive["visual.conv1.weight"].dtype == torch.float16  # OpenAI's convert_weights
    rounded = cloob.CLIP(cloob.ModelConfig(**d["args"])).eval()
    rounded.load_state_dict({k: v.to(archive[k].dtype).float() for k, v in d["state_dict"].items()})
    for ours, expected in zip(outputs(model, d["image"], d["text"]), outputs(rounded, d["image"], d["text"])):
        assert torch.equal(ours, expected)
    assert rel_err(outputs(model, d["image"], d["text"])[1], d["text_features"]) < 0.01  # fp16 rounding only


def openai_layout(name):
    """{key: (shape, dtype)} of OpenAI's released model `name` (reference/NAME.state_dict.txt)."""
    layout = {}
    for line in open(ref(f"{name}.state_dict.txt")):
        key, rest = line.split(" ", 1)
        shape, dtype = rest.rsplit(" ", 1)
        layout[key] = (tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype.strip())
    return layout


@pytest.mark.parametrize("name", ["RN50", "ViT-B-32"])
def test_keys_and_shapes_match_openai(name):
    with torch.device("meta"):  # shapes only
        model = cloob.CLIP(cloob.CONFIGS[name])
    layout = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    assert layout == openai_layout(name)


@pytest.mark.parametrize("name,vision_heads", [("RN50", 32), ("ViT-B-32", 12)])
def test_a_state_dict_that_records_no_heads_gets_openais(name, vision_heads):
    """A bare state dict or TorchScript archive records no head count: the architecture read from OpenAI's full-size
    shapes alone, without overrides, is OpenAI's (8 text heads of 64; ViT-B/32: 12 vision heads; RN50's attention
    pool: 32 heads, width 64 x 32 / 64, as OpenAI's build_model sets them)."""
    sd = {k: torch.empty(shape, device="meta") for k, (shape, _) in openai_layout(name).items()}
    config = cloob.infer_config(sd)
    assert config == cloob.CONFIGS[name]
    with torch.device("meta"):
        model = cloob.CLIP(config)
    assert model.transformer.resblocks[0].attn.num_heads == 8
    if name == "RN50":
        assert model.visual.attnpool.heads == vision_heads
    else:
        assert model.visual.transformer.resblocks[0].attn.num_heads == vision_heads


def test_text_features_ignore_tokens_after_end():
    torch.manual_seed(0)
    model = cloob.CLIP(MICRO).eval()
    _, tokens = micro_batch(4)
    eot = (tokens == MICRO.vocab_size - 1).int().argmax(-1)
    changed = tokens.clone()
    for i, e in enumerate(eot.tolist()):
        changed[i, e + 1:] = torch.randint(0, MICRO.vocab_size, (MICRO.context_length - e - 1,))
    assert not torch.equal(changed, tokens)
    with torch.no_grad():
        assert torch.allclose(model.encode_text(tokens), model.encode_text(changed), atol=1e-6)
        # and they do depend on the tokens before it
        changed[:, 0] = (tokens[:, 0] + 1) % (MICRO.vocab_size - 1)
        assert not torch.allclose(model.encode_text(tokens), model.encode_text(changed), atol=1e-4)


def test_encode_text_takes_tokens_shorter_than_the_context():
    torch.manual_seed(0)
    model = cloob.CLIP(MICRO).eval()
    tokens = torch.tensor([[30, 5, 6, 31, 0, 0, 0, 0], [30, 5, 6, 7, 31, 0, 0, 0]])  # start 30, end 31, padding
    with torch.no_grad():
        assert torch.allclose(model.encode_text(tokens[:, :5]), model.encode_text(tokens), atol=1e-6)


@pytest.mark.parametrize("preset", ["tiny-vit", "tiny-rn"])
def test_grad_checkpointing_gives_same_gradients(preset):
    config = cloob.CONFIGS[preset]
    torch.manual_seed(0)
    model = cloob.CLIP(config)
    images = torch.randn(4, 3, config.image_resolution, config.image_resolution)
    tokens = torch.randint(0, config.vocab_size - 2, (4, config.context_length))
    tokens[:, 10] = config.vocab_size - 1
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        cloob.cloob_loss(*model(images, tokens), 30.0, 8.0).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 10
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_new_model_initialisation_is_openais():
    torch.manual_seed(0)
    model = cloob.CLIP(dataclasses.replace(cloob.CONFIGS["tiny-vit"], vision_layers=4, transformer_width=256))
    # OpenAI's initialize_parameters: the standard deviations, by its formulas
    expected = {"token_embedding.weight": 0.02, "positional_embedding": 0.01, "text_projection": 256 ** -0.5}
    for prefix, width, layers in (("transformer.", 256, 2), ("visual.transformer.", 128, 4)):
        for i in range(layers):
            block = f"{prefix}resblocks.{i}."
            expected.update({block + "attn.in_proj_weight": width ** -0.5,
                             block + "attn.out_proj.weight": width ** -0.5 * (2 * layers) ** -0.5,
                             block + "mlp.c_fc.weight": (2 * width) ** -0.5,
                             block + "mlp.c_proj.weight": width ** -0.5 * (2 * layers) ** -0.5})
    sd = model.state_dict()
    for key, std in expected.items():
        assert sd[key].std().item() == pytest.approx(std, rel=0.1), key
    assert sd["visual.transformer.resblocks.0.attn.in_proj_bias"].abs().max() == 0
    rn = cloob.CLIP(cloob.CONFIGS["tiny-rn"])
    assert all(torch.all(b.bn3.weight == 0) for layer in (rn.visual.layer1, rn.visual.layer4) for b in layer)
    assert rn.visual.attnpool.q_proj.weight.std().item() == pytest.approx(512 ** -0.5, rel=0.1)  # 32 x width 16
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    model.set_temperature(30.0, learnable=False)
    assert model.logit_scale.exp().item() == pytest.approx(30.0) and not model.logit_scale.requires_grad

# ---------------------------------------------------------------------------------------------------- tokenizer


def test_clip_tokenizer_matches_openai():
    """OpenAI's SimpleTokenizer (with ftfy 6) on 77 strings: captions, prompts, scripts, and ftfy's character fixes
    (half- and full-width forms, Latin ligatures, nested HTML entities, terminal escapes, C1 and other controls)."""
    tok = cloob.Tokenizer("clip", context_length=16)
    cases = [json.loads(line) for line in open(ref("tokenizer_cases.jsonl"))]
    assert len(cases) == 77
    for case in cases:
        assert tok.encode(case["text"]) == case["ids"], case["text"]
    assert tok([c["text"] for c in cases]).tolist() == [c["tokens_ctx16"] for c in cases]
    assert (tok.sot, tok.eot, tok.vocab_size) == (49406, 49407, 49408)


def test_clip_tokenizer_leaves_mojibake_alone():
    """ftfy's character fixes are in; its re-decoding of mojibake is not (README)."""
    tok = cloob.Tokenizer("clip")
    assert tok.encode("caf\u00c3\u00a9") != tok.encode("caf\u00e9")  # UTF-8 read as Latin-1: ftfy would repair it
    assert tok.encode("It\u2019s \uff41 \ufb01ne") == tok.encode("It's a fine")


def test_bytes_tokenizer_truncates_keeping_end_token():
    tok = cloob.Tokenizer("bytes", context_length=8)
    out = tok(["ab", "abcdefghijk", "é"])
    assert out.shape == (3, 8) and out.dtype == torch.long
    assert out[0].tolist() == [256, 97, 98, 257, 0, 0, 0, 0]
    assert out[1].tolist() == [256, 97, 98, 99, 100, 101, 102, 257]
    assert out[2].tolist()[:4] == [256, 0xC3, 0xA9, 257]
    assert tok.vocab_size == 258


@pytest.mark.parametrize("encoding", ["bytes", "clip"])
def test_every_token_row_holds_its_end_token(encoding):
    """Caption lengths 0 to past the context: start first, the end token right after the (cut) caption, zeros after
    it; the batch is cut after its longest row, rounded up to a multiple of 8."""
    tok = cloob.Tokenizer(encoding, context_length=48)
    for n in range(0, 60):
        captions = ["x " * n, "y"]  # clip: one token per "x"; bytes: two
        ids = [tok.encode(c)[:46] for c in captions]
        batch = tok(captions)
        assert batch.shape[1] == min(48, math.ceil((len(ids[0]) + 2) / 8) * 8), n
        for row, row_ids in zip(batch.tolist(), ids):
            assert row[:len(row_ids) + 2] == [tok.sot, *row_ids, tok.eot] and not any(row[len(row_ids) + 2:])


def test_clip_tokenizer_needs_no_download_and_names_a_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no cache anywhere: the merges file ships beside cloob.py
    assert cloob.Tokenizer("clip").encode("a diagram") == [320, 22697]
    monkeypatch.setattr(cloob, "BPE_PATH", tmp_path / "nope.txt.gz")
    with pytest.raises(FileNotFoundError, match="BPE merges file not found: .*nope.txt.gz"):
        cloob.Tokenizer("clip")
    assert "tokenizer 'cl100k_base': expected clip or bytes" in one_line_error(cloob.Tokenizer, "cl100k_base")
    assert "bytes tokenizer: 258 ids; the model has 49408" in one_line_error(
        cloob.tokenizer_for, cloob.CONFIGS["RN50"], "bytes")


def test_token_batches_are_cut_after_the_longest_caption_exactly():
    tok = cloob.Tokenizer("clip")
    captions = ["a dog", "a photo of a small brown dog running on the beach at sunset"]
    short, full = tok(captions), tok(captions + ["x " * 100])[:2]
    assert short.shape == (2, 16) and full.shape == (2, 77) and torch.equal(short, full[:, :16])
    torch.manual_seed(0)
    model = cloob.CLIP(dataclasses.replace(MICRO, vocab_size=49408, context_length=77)).eval()
    with torch.no_grad():
        assert torch.allclose(model.encode_text(short), model.encode_text(full), atol=1e-6)

# ---------------------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_losses_match_official(dtype, tol):
    d = load_ref("losses.pt")
    X, Y = d["image_features"].to(dtype), d["text_features"].to(dtype)
    for ours, key in [((X, X), "U_x"), ((Y, X), "U_y"), ((X, Y), "V_x"), ((Y, Y), "V_y")]:
        assert rel_err(cloob.hopfield(*ours, d["beta"]), d[key]) <= tol, key
    for name, loss_fn, scale in [("cloob", cloob.cloob_loss, (d["inv_tau"], d["beta"])),
                                 ("clip", cloob.clip_loss, (d["logit_scale"],))]:
        x, y = X.clone().requires_grad_(), Y.clone().requires_grad_()
        loss = loss_fn(x, y, *scale)
        loss.backward()
        assert loss.dtype == dtype
        assert rel_err(loss.detach(), d[f"{name}_loss"]) <= tol
        assert rel_err(x.grad, d[f"{name}_grad_image"]) <= tol
        assert rel_err(y.grad, d[f"{name}_grad_text"]) <= tol


def test_losses_run_in_float32_under_autocast():
    d = load_ref("losses.pt")
    x, y = d["image_features"].float(), d["text_features"].float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for loss_fn, args in [(cloob.cloob_loss, (30.0, 8.0)), (cloob.clip_loss, (100.0,))]:
            low = loss_fn(x.bfloat16(), y.bfloat16(), *args)
            assert low.dtype == torch.float32
            assert abs(low.item() - loss_fn(x, y, *args).item()) < 0.05 * abs(loss_fn(x, y, *args).item())


def test_cloob_loss_is_invariant_to_batch_order():
    torch.manual_seed(0)
    x, y = F.normalize(torch.randn(12, 8), dim=-1), F.normalize(torch.randn(12, 8), dim=-1)
    perm = torch.randperm(12)
    assert cloob.cloob_loss(x, y, 30.0, 8.0).item() == pytest.approx(
        cloob.cloob_loss(x[perm], y[perm], 30.0, 8.0).item(), rel=1e-6
    )
    # but it does see which image goes with which text
    assert cloob.cloob_loss(x, y, 30.0, 8.0).item() != pytest.approx(
        cloob.cloob_loss(x, y[perm], 30.0, 8.0).item(), rel=1e-3
    )


@pytest.mark.parametrize("loss_fn,args", [(cloob.cloob_loss, (30.0, 8.0)), (cloob.clip_loss, (100.0,))])
def test_batch_of_one_is_a_clear_error(loss_fn, args):
    x = F.normalize(torch.randn(1, 8), dim=-1)
    with pytest.raises(ValueError, match="a global batch of 2 or more samples, got 1"):
        loss_fn(x, x, *args)

# ---------------------------------------------------------------------------------------------------- two ranks


def _distributed_setup(method):
    """-> (model, images, tokens, loss function) of a micro CLIP on 8 rows; "sync-bn": a ResNet with
    cloob.SyncBatchNorm, in float64 (rounding out of the way) and with its last BatchNorm gains drawn (OpenAI's zero
    init would hide the blocks)."""
    torch.manual_seed(0)
    images, tokens = micro_batch(8)
    if method == "sync-bn":
        model = cloob.CLIP(dataclasses.replace(MICRO, vision_layers=(1, 1, 1, 1), vision_width=16, image_resolution=32))
        model.double()
        cloob.convert_sync_batchnorm(model)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                torch.nn.init.normal_(m.weight)
        images = F.interpolate(images, size=32).double()
    else:
        model = cloob.CLIP(MICRO)
    if method != "clip":  # fixed inv_tau, as in training (DDP would wait for an unused parameter's gradient)
        model.set_temperature(30.0, learnable=False)
    if method == "clip":
        return model, images, tokens, lambda x, y: cloob.clip_loss(x, y, model.logit_scale.exp())
    return model, images, tokens, lambda x, y: cloob.cloob_loss(x, y, 30.0, 8.0)


def _grad_cache(model, images, tokens, rows, world):
    """train.py's gradient caching, 2 micro-batches, on `rows` -> the loss averaged over the ranks."""
    args = train.parse_args(["--batch-size", str(len(rows)), "--accum-steps", "2"])
    off = torch.amp.GradScaler("cpu", enabled=False)
    ctx = contextlib.nullcontext()
    loss, _ = train.grad_cache_backward(args, model, model, images[rows], tokens[rows], ctx, off, world)
    if world > 1:
        dist.all_reduce(loss)
    return loss.item() / world


def _skipped_step(rank, flags):
    """One train.py step of the tiny ResNet on 2 ranks whose images are infinite on rank 1 only -> (1.0 if the step
    was taken, whether weights, buffers and optimizer state are as before)."""
    args = train.parse_args(["--model", "tiny-rn", "--batch-size", "4", *flags.split()])
    model, _ = train.build_model(args, CPU)
    args = train.settings(args, model, None, 2)
    net, optimizer, scaler, ctx = train.prepare(args, model, CPU, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(rank)) * 255
    tokens = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(rank))
    tokens[:, 20] = 257
    images = images * (math.inf if rank else 1)
    _, finite = train.train_step(args, model, net, optimizer, scaler, ctx, images, tokens, 2)
    unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    moments = [s["exp_avg"] for s in optimizer.state.values()]
    del net  # DDP's reducer lives in reference cycles: freed after its process group, gloo aborts the process
    gc.collect()
    return finite.min().item(), unchanged and all(m.abs().max() == 0 for m in moments)


def _train_on_two_ranks(rank, tmp, argv, stop_at=0):
    """train.main(argv) on this rank, in a process group of its own; with `stop_at`, rank 1 alone gets SIGTERM during
    that step. -> (exit status, what it wrote on stderr, the images of each step)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv-{argv[-1]}", rank=rank, world_size=2)
    real, calls = train.train_step, []

    def step_and_maybe_stop(args, model, net, optimizer, scaler, ctx, images, tokens, world):
        calls.append(images)
        if rank == 1 and len(calls) == stop_at:
            train.RECEIVED.append(signal.SIGTERM)
        return real(args, model, net, optimizer, scaler, ctx, images, tokens, world)
    train.train_step, train.RECEIVED[:] = step_and_maybe_stop, []
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = train.main(argv)
        except SystemExit as e:
            code = e.code
    train.train_step = real
    return code, err.getvalue(), calls


def _two_ranks(rank, tmp, eval_folder):
    """Rank `rank` of 2 gloo processes, with RANK and WORLD_SIZE set as torchrun sets them: every check that needs two
    ranks, in one spawn (each costs seconds to start). Each rank saves what the tests compare with one process."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two processes on the CPU's cores, as torchrun's OMP_NUM_THREADS=1
    mp.set_start_method("fork", force=True)  # loader workers, as under torchrun (a spawned one imports for seconds)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank, world_size=2)
    out = {}
    for method in ("clip", "cloob", "sync-bn"):  # DDP, 4 rows a rank
        model, images, tokens, loss_fn = _distributed_setup(method)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        loss = loss_fn(*ddp(images[4 * rank:4 * rank + 4], tokens[4 * rank:4 * rank + 4]))
        loss.backward()
        dist.all_reduce(loss)  # each rank's loss is the mean over its own rows
        grads = {k: p.grad for k, p in model.named_parameters()}
        out[method] = (loss.item() / 2, grads, {k: b.clone() for k, b in model.named_buffers()})
        del ddp
        gc.collect()
    model, images, tokens, _ = _distributed_setup("sync-bn")  # gradient caching, rows as train.py deals them
    rows = [i for _, i in next(iter(data.global_batches(8, 4, rank, 2, accum_steps=2)))]
    out["grad-cache"] = (_grad_cache(model, images, tokens, rows, 2), {k: p.grad for k, p in model.named_parameters()})
    out["skip"] = {flags: _skipped_step(rank, flags) for flags in ("", "--sync-bn", "--accum-steps 2 --sync-bn")}
    dist.barrier()
    dist.destroy_process_group()
    for mode in (["--data", str(eval_folder / "images")], ["--retrieval", str(eval_folder / "pairs.csv")]):
        # zeroshot.py ends the process group it runs in
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv{mode[0]}", rank=rank, world_size=2)
        zeroshot.main(["--model", str(eval_folder / "run"), *mode, "--workers", "0", "--batch-size", "4",
                       "--output", f"{tmp}/{mode[0][2:]}{rank}.json"])
    # tar shards, 2 ranks x 2 loader workers, each slot one shard of 4 samples (rank 1's second: 5), batches of 2: the
    # straight stream of this rank's batches; a run that rank 1 alone stops in its sixth step (the slots' positions
    # now differ between the ranks), then resumed
    pattern = f"{tmp}/shards/{{00000..00003}}.tar"
    shards = data.TarShards(pattern, 2, 32, rank, 2, workers=2)
    straight = iter(torch.utils.data.DataLoader(shards, batch_size=None, num_workers=2))
    tar = [*FAST, "--train-data", pattern, "--train-num-samples", "16", "--tokenizer", "bytes", "--batch-size", "2",
           "--workers", "2", "--steps", "8", "--logs-dir", tmp, "--name"]
    out["tar"] = [[next(straight)[0] for _ in range(8)], _train_on_two_ranks(rank, tmp, [*tar, "r"], 6),
                  _train_on_two_ranks(rank, tmp, [*tar, "r", "--resume", "latest"])]
    # rank 1's shard holds no usable sample
    bad = [*tar[:-1], "--workers", "0", "--train-data", f"{tmp}/shards/{{00004..00005}}.tar", "--name", "bad"]
    out["data error"] = _train_on_two_ranks(rank, tmp, bad)
    torch.save(out, f"{tmp}/out{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, eval_folder):
    """-> (the folder of the two ranks' outputs, [rank 0's results, rank 1's])."""
    tmp = tmp_path_factory.mktemp("ranks")
    write_shards(tmp / "shards", 5, 4)
    members = []
    for shard, first in (("00003", 0), ("00004", 6)):  # rank 1's second loader slot reads 5 samples a pass, not 4
        with tarfile.open(tmp / "shards" / f"{shard}.tar") as tar:
            members += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()[first:first + 8]]
    write_tar(tmp / "shards" / "00003.tar", members[:10])
    write_tar(tmp / "shards" / "00005.tar", [(f"{i}.jpg", b"not a jpeg") for i in range(4)])
    mp.spawn(_two_ranks, args=(str(tmp), eval_folder), nprocs=2)
    return tmp, [torch.load(tmp / f"out{rank}.pt", weights_only=True) for rank in range(2)]


@pytest.mark.parametrize("method", ["clip", "cloob", "sync-bn"])
def test_distributed_loss_equals_full_batch(method, two_ranks):
    """2 ranks of 4 rows (DDP) = 1 process of 8: loss and gradients; the float64 ResNet with SyncBatchNorm to 1e-12."""
    model, images, tokens, loss_fn = _distributed_setup(method)
    loss = loss_fn(*model(images, tokens))
    loss.backward()
    dist_loss, dist_grads, _ = two_ranks[1][0][method]
    assert dist_loss == pytest.approx(loss.item(), rel=1e-5 if method != "sync-bn" else 1e-12)
    for name, p in model.named_parameters():
        if p.grad is not None and name != "visual.attnpool.k_proj.bias":  # softmax ignores a key bias: 0, or noise
            atol, rtol = (1e-6, 1e-4) if method != "sync-bn" else (1e-12, 1e-8)
            assert torch.allclose(dist_grads[name], p.grad, atol=atol, rtol=rtol), name


def test_sync_batchnorm_running_statistics_are_the_global_batchs(two_ranks):
    """After one forward on 2 ranks: BatchNorm2d's running mean and unbiased running variance of all 8 rows."""
    model, images, tokens, _ = _distributed_setup("sync-bn")
    model(images, tokens)
    buffers = two_ranks[1][0]["sync-bn"][2]
    assert len(buffers) > 10
    for name, b in model.named_buffers():
        assert torch.allclose(buffers[name], b, rtol=1e-10, atol=0), name


def test_gradient_caching_over_two_ranks_equals_one_process(two_ranks):
    """2 ranks x 2 micro-batches = 1 process x 2 micro-batches, with SyncBatchNorm: rank r's micro-batch k holds its
    share of the global micro-batch k (data.global_batches), and the gradients are averaged over the ranks."""
    model, images, tokens, _ = _distributed_setup("sync-bn")
    rows = [i for _, i in next(iter(data.global_batches(8, 8, accum_steps=2)))]
    loss = _grad_cache(model, images, tokens, rows, 1)
    dist_loss, dist_grads = two_ranks[1][0]["grad-cache"]
    assert dist_loss == pytest.approx(loss, rel=1e-12)
    for name, p in model.named_parameters():
        if p.grad is not None and name != "visual.attnpool.k_proj.bias":
            assert torch.allclose(dist_grads[name], p.grad, atol=1e-12, rtol=1e-8), name


@pytest.mark.parametrize("flags", ["", "--sync-bn", "--accum-steps 2 --sync-bn"])
def test_a_step_not_finite_on_one_rank_is_skipped_on_both(flags, two_ranks):
    """Rank 1's images are infinite: neither rank takes the step, and on both the weights, BatchNorm's running
    statistics and AdamW's moments are as before (DDP; SyncBatchNorm; gradient caching with SyncBatchNorm)."""
    assert [out["skip"][flags] for out in two_ranks[1]] == [(0.0, True), (0.0, True)]


def test_a_stop_on_one_rank_stops_both_and_tar_shards_resume_exactly(two_ranks):
    """SIGTERM on rank 1 alone: both ranks stop after the same step, rank 0 saves every rank's loader positions (which
    differ between the ranks), and the resumed run (4 loader slots, 2 passes of their shards) trains on each rank's
    straight stream of batches, the same crops of the same samples at every step."""
    folder, outs = two_ranks
    for straight, (code, _, before), (resumed, _, after) in (out["tar"] for out in outs):
        assert (code, resumed, len(before), len(after)) == (128 + signal.SIGTERM, None, 6, 2)
        assert all(torch.equal(a, b) for a, b in zip(straight, before + after))
    assert final_weights(folder / "r")["step"] == 8 and len(metrics(folder / "r")) == 8


def test_a_data_error_on_one_rank_is_one_line_on_each(two_ranks):
    """Rank 1's shard gives no usable sample: it says so in one line; rank 0, whose collective failed, in one line."""
    (code0, err0, _), (code1, err1, _) = [out["data error"] for out in two_ranks[1]]
    assert code0 == code1 == 1 and "Traceback" not in err0 + err1
    assert err1.startswith("train.py: error: 0 usable samples in a pass over the 1 shards of rank 1") and \
        len(err1.splitlines()) == 1
    assert err0.startswith("train.py: error: ") and len(err0.splitlines()) == 1, err0


@pytest.mark.parametrize("mode", ["data", "retrieval"])
def test_zeroshot_on_two_ranks_equals_one_process(mode, two_ranks, eval_folder, tmp_path):
    """torchrun zeroshot.py: the images split over the ranks give one process's results; rank 0 alone writes them."""
    where = str(eval_folder / ("images" if mode == "data" else "pairs.csv"))
    zeroshot.main(["--model", str(eval_folder / "run"), f"--{mode}", where, "--workers", "0",
                   "--output", str(tmp_path / "one.json")])
    folder = two_ranks[0]
    assert json.loads((folder / f"{mode}0.json").read_text()) == json.loads((tmp_path / "one.json").read_text())
    assert (folder / f"{mode}1.json").read_text() == ""

# ---------------------------------------------------------------------------------------------------- checkpoints


def test_own_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = cloob.CLIP(MICRO)
    model.set_temperature(30.0, learnable=False)
    path = str(tmp_path / "run" / "ckpt.pt")
    cloob.save_checkpoint(path, model, tokenizer="bytes", method="cloob", inv_tau=30.0, beta=8.0, step=7)
    assert os.listdir(tmp_path / "run") == ["ckpt.pt"]  # the temp file was renamed
    assert set(torch.load(path, weights_only=True)) >= {"state_dict", "config", "tokenizer", "method", "step"}
    loaded, info = cloob.load_model(path)
    assert info["method"] == "cloob" and info["tokenizer"] == "bytes" and info["inv_tau"] == 30.0
    assert info["config"] == MICRO and info["step"] == 7
    images, tokens = micro_batch(3)
    for a, b in zip(outputs(model.eval(), images, tokens), outputs(loaded, images, tokens)):
        assert torch.equal(a, b)


def test_official_cloob_checkpoint_loads(tmp_path):
    d = load_ref("tiny_rn.pt")
    sd = {k: v for k, v in d["state_dict"].items() if k != "logit_scale"}
    text = ("token_embedding", "positional_embedding", "ln_final", "text_projection", "transformer.")
    official = {"module." + ("transformer." + k if k.startswith(text) else k): v for k, v in sd.items()}
    official["module.logit_inv_tau"] = torch.tensor(30.0).log()
    official["module.logit_scale_hopfield"] = torch.tensor(14.0).log()
    assert "module.transformer.transformer.resblocks.0.ln_1.weight" in official
    torch.save({"epoch": 31, "name": "cloob_rn50", "state_dict": official}, tmp_path / "cloob.pt")
    model, info = cloob.load_model(str(tmp_path / "cloob.pt"), **d["args"])
    assert info["format"] == "cloob-official" and info["method"] == "cloob"
    assert info["inv_tau"] == pytest.approx(30.0) and info["beta"] == pytest.approx(14.0)
    image_features, text_features, _ = outputs(model, d["image"], d["text"])
    assert rel_err(image_features, d["image_features"]) <= 1e-6 and rel_err(text_features, d["text_features"]) <= 1e-6


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        cloob.load_model(str(tmp_path / "missing.pt"))
    (tmp_path / "random.pt").write_bytes(os.urandom(1000))
    with pytest.raises(ValueError, match="cannot be read") as e:
        cloob.load_model(str(tmp_path / "random.pt"))
    assert "\n" not in str(e.value)
    torch.save({"foo": 1, "bar": [2]}, tmp_path / "dict.pt")
    with pytest.raises(ValueError, match="no state_dict; top-level keys: \\['bar', 'foo'\\]"):
        cloob.load_model(str(tmp_path / "dict.pt"))
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a CLIP/CLOOB state dict"):
        cloob.load_model(str(tmp_path / "other.pt"))
    sd = cloob.CLIP(MICRO).state_dict()
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match='Unexpected key\\(s\\) in state_dict: "extra.weight"'):
        cloob.load_model(str(tmp_path / "extra.pt"), **dataclasses.asdict(MICRO))

# ---------------------------------------------------------------------------------------------------- interop


def peer_error(model, io):
    """Largest relative error of our features against the peer's on the same images and tokens."""
    with torch.no_grad():
        x, y = model.encode_image(io["images"]), model.encode_text(io["tokens"])
    return max(rel_err(x, io["image_features"].double()), rel_err(y, io["text_features"].double()))


@pytest.mark.parametrize("where", ["openclip_hub_tiny", "openclip_hub_tiny/open_clip_model.safetensors",
                                   "openclip_hub_tiny/open_clip_pytorch_model.bin"])
def test_openclip_hub_folder_and_its_files_load_exactly(where):
    model, info = cloob.load_model(ref(where))
    assert info["format"] == "openclip-hub" and info["tokenizer"] == "clip"
    assert not model.config.quick_gelu and model.config.vision_heads == 2 and model.config.transformer_heads == 2
    assert peer_error(model, load_ref("openclip_tiny_io.pt")) <= 1e-5


def test_bare_openclip_file_says_its_assumption_and_takes_overrides():
    path, io = ref("openclip_trainer_tiny.pt"), load_ref("openclip_tiny_io.pt")
    with pytest.warns(UserWarning, match="assuming OpenAI's QuickGELU and 64-wide heads.*quick_gelu=False") as w:
        model, info = cloob.load_model(path, vision_heads=2, transformer_heads=2)
    assert len(w) == 1 and "\n" not in str(w[0].message) and info["format"] == "openai-state-dict"
    assert peer_error(model, io) > 1e-2  # GELU weights read as QuickGELU: silently wrong without the warning
    model, _ = cloob.load_model(path, quick_gelu=False, vision_heads=2, transformer_heads=2)
    assert peer_error(model, io) <= 1e-5


def test_huggingface_folders_load_exactly(tmp_path):
    io = load_ref("hf_tiny_io.pt")
    for where in ("hf_tiny", "hf_tiny/model.safetensors"):
        model, info = cloob.load_model(ref(where))
        assert info["format"] == "huggingface" and not model.config.quick_gelu and model.config.vision_heads == 2
        assert peer_error(model, io) <= 1e-5
    # an older save: pytorch_model.bin with position_ids buffers
    sd = cloob.read_safetensors(ref("hf_tiny/model.safetensors"))
    sd.update({f"{t}_model.embeddings.position_ids": torch.arange(n)[None] for t, n in (("text", 77), ("vision", 17))})
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(open(ref("hf_tiny/config.json")).read())
    assert peer_error(cloob.load_model(str(tmp_path))[0], io) <= 1e-5


def test_safetensors_reader_matches_torch_load(tmp_path):
    hub = ref("openclip_hub_tiny")
    ours, theirs = cloob.read_safetensors(f"{hub}/open_clip_model.safetensors"), torch.load(
        f"{hub}/open_clip_pytorch_model.bin"
    )
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    tensors = {"a": torch.randn(3).half(), "b": torch.randn(2, 3), "c": torch.arange(5), "d": torch.randn(7).bfloat16()}
    blobs, header, offset = [], {"__metadata__": {"format": "pt"}}, 0  # byte offsets not aligned to the dtypes
    for name, x in tensors.items():
        blob = x.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = dict(
            dtype={torch.float16: "F16", torch.float32: "F32", torch.int64: "I64", torch.bfloat16: "BF16"}[x.dtype],
            shape=list(x.shape),
            data_offsets=[offset, offset + len(blob)],
        )
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    (tmp_path / "t.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))
    read = cloob.read_safetensors(str(tmp_path / "t.safetensors"))
    assert all(read[k].dtype == x.dtype and torch.equal(read[k], x) for k, x in tensors.items())


@pytest.mark.parametrize(
    "option,value",
    [
        ("mlp_ratio", 4.9231),
        ("ls_init_value", 1e-5),
        ("hf_model_name", "roberta-base"),
        ("timm_model_name", "convnext_base"),
        ("pool_type", "avg"),
        ("new_option", 1),
    ],
)
def test_openclip_options_this_model_lacks_are_refused(option, value, tmp_path):
    hub = ref("openclip_hub_tiny")
    cfg = json.load(open(f"{hub}/open_clip_config.json"))
    cfg["model_cfg"]["vision_cfg"][option] = value
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    os.symlink(f"{hub}/open_clip_model.safetensors", tmp_path / "open_clip_model.safetensors")
    assert f"{option}={value!r} has no equivalent" in one_line_error(cloob.load_model, str(tmp_path))


def test_huggingface_options_and_wrong_shapes_are_refused(tmp_path):
    cfg = json.load(open(ref("hf_tiny/config.json")))
    os.symlink(ref("hf_tiny/model.safetensors"), tmp_path / "model.safetensors")
    for change in ({"model_type": "siglip"}, {"text_config": dict(cfg["text_config"], hidden_act="relu")}):
        (tmp_path / "config.json").write_text(json.dumps(dict(cfg, **change)))
        assert "options this model does not have" in one_line_error(cloob.load_model, str(tmp_path))
    sd = cloob.CLIP(MICRO).state_dict()
    sd["visual.transformer.resblocks.0.mlp.c_fc.weight"] = torch.zeros(300, 64)  # an MLP ratio other than 4
    torch.save(sd, tmp_path / "wide.pt")
    message = one_line_error(cloob.load_model, str(tmp_path / "wide.pt"), **dataclasses.asdict(MICRO))
    assert (
        "weights do not match the architecture: size mismatch for visual.transformer.resblocks.0.mlp.c_fc.weight"
        in message
    )


def test_our_checkpoints_are_laid_out_for_openclip(tmp_path):
    torch.manual_seed(0)
    model = cloob.CLIP(MICRO)
    cloob.save_checkpoint(str(tmp_path / "ours.pt"), model, "bytes", "clip")
    # what open_clip.create_model(..., pretrained=path) does: torch.load, take "state_dict", load strictly
    sd = torch.load(tmp_path / "ours.pt", weights_only=True)["state_dict"]
    assert cloob.CLIP(MICRO).load_state_dict(sd) is not None and sd.keys() == model.state_dict().keys()


def test_a_hand_made_checkpoint_loads_with_defaults(tmp_path, capsys):
    """{"state_dict", "config"}: a CLIP model, its tokenizer told by the vocabulary (258 ids: bytes)."""
    for config, tokenizer in ((MICRO, "clip"), (dataclasses.replace(MICRO, vocab_size=258), "bytes")):
        ckpt = {"state_dict": cloob.CLIP(config).state_dict(), "config": dataclasses.asdict(config)}
        torch.save(ckpt, tmp_path / "m.pt")
        loaded, info = cloob.load_model(str(tmp_path / "m.pt"))
        assert info["method"] == "clip" and info["tokenizer"] == tokenizer and info["config"] == config
    Image.new("RGB", (20, 20), (200, 30, 30)).save(tmp_path / "red.png")
    r = zeroshot.main(["--model", str(tmp_path / "m.pt"), "--image", str(tmp_path / "red.png"), "--labels", "red,blue"])
    assert sum(r[str(tmp_path / "red.png")].values()) == pytest.approx(1)
    ckpt = {"state_dict": cloob.CLIP(MICRO).state_dict(), "config": dataclasses.asdict(MICRO), "tokenizer": "bytes"}
    torch.save(ckpt, tmp_path / "m.pt")  # says bytes; holds 32 ids
    with pytest.raises(SystemExit):
        zeroshot.main(["--model", str(tmp_path / "m.pt"), "--image", str(tmp_path / "red.png"), "--labels", "red,blue"])
    assert "zeroshot.py: error: bytes tokenizer: 258 ids; the model has 32" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- data


def test_preprocess_resizes_shorter_side_and_centre_crops():
    import data
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)  # h=20, w=40: already the right short side
    out = data.preprocess(Image.fromarray(pixels), 20)
    assert out.shape == (3, 20, 20) and out.dtype == torch.float32
    # OpenAI's
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    expected = (pixels[:, 10:30] / 255 - mean) / std
    assert np.allclose(out.numpy(), expected.transpose(2, 0, 1), atol=1e-6)
    grey = Image.new("L", (90, 45), 128)  # grey, non-square, needs resizing: every pixel is 128/255 normalised
    out = data.preprocess(grey, 32)
    assert out.shape == (3, 32, 32)
    assert np.allclose(out.numpy(), ((128 / 255 - mean) / std)[:, None, None], atol=1e-6)


def test_preprocess_equals_openais_transform():
    """OpenAI's torchvision transform on palette, RGBA, LA and CMYK images, and where the centre crop starts half a
    pixel in (46 x 32 and 32 x 46: `round`, as torchvision's CenterCrop)."""
    cases = load_ref("transform_cases.pt")
    assert set(cases) == {"palette.png", "palette.gif", "rgba.png", "la.png", "cmyk.jpg", "wide.png", "tall.png"}
    for name, (file, expected) in cases.items():
        with Image.open(io.BytesIO(file.numpy().tobytes())) as image:
            assert (data.preprocess(image, 16) - expected).abs().max() <= 1e-6, name


def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    image = Image.open(tmp_path / "g16.png")
    assert image.mode.startswith("I")
    grey = np.asarray(data.to_rgb(image))[..., 0].astype(float)
    assert np.abs(grey - ramp / 257).max() <= 0.5 and grey.mean() == pytest.approx(127.5, abs=1)
    eight_bit = Image.fromarray((ramp / 257).round().astype(np.uint8))  # resized before it becomes RGB, still scaled
    assert (data.preprocess(image, 16) - data.preprocess(eight_bit, 16)).abs().max() < 0.05


def torchvision_get_params(width, height, rng, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params (torchvision/transforms/transforms.py), transcribed with a numpy
    Generator for torch's: the area and the log aspect ratio uniform, 10 tries, then the centre crop clamped to the
    ratio range. Left is drawn before top (torchvision draws top first). -> (left, top, right, bottom)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            j = int(rng.integers(0, width - w + 1))
            i = int(rng.integers(0, height - h + 1))
            return j, i, j + w, i + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    i, j = (height - h) // 2, (width - w) // 2
    return j, i, j + w, i + h


def test_training_crop_is_torchvisions_random_resized_crop():
    for width, height in ((200, 200), (640, 480), (300, 420), (400, 40), (40, 400)):  # boxes from the same stream
        ours, theirs = np.random.default_rng(width), np.random.default_rng(width)
        for _ in range(100):
            assert data.crop_box(width, height, ours) == torchvision_get_params(width, height, theirs)
    rng = np.random.default_rng(0)
    boxes = [data.crop_box(200, 200, rng) for _ in range(4000)]
    covered = [(r - l) * (b - t) / 200 ** 2 for l, t, r, b in boxes]
    assert np.mean([c >= 0.9 for c in covered]) >= 0.99 and all(c <= 1 for c in covered)
    aspect = np.abs(np.log([(r - l) / (b - t) for l, t, r, b in boxes]))
    assert aspect.mean() < 0.05  # square crops of 0.9-1.0 of a square image only fit near aspect 1
    assert data.crop_box(400, 40, np.random.default_rng(0)) == (173, 0, 226, 40)  # the fallback: centre, aspect 4/3



def test_a_jpeg_crop_decoded_in_draft_mode_keeps_the_output_resolution():
    """PIL's draft mode decodes a large JPEG at a reduced DCT scale: the crop must keep at least the output's pixels
    across, so it matches the crop of the fully decoded photo up to JPEG's rounding (mean error 3.6-3.8 of 255 on
    this 1280 x 960 texture at 224 px; decoding at half that scale gives 21-22: a blurred crop)."""
    noise = np.random.default_rng(0).random((240, 320, 3)) * 255
    buf = io.BytesIO()
    Image.fromarray(noise.astype(np.uint8)).resize((1280, 960), Image.BICUBIC).save(buf, "JPEG", quality=95)
    for seed in range(3):
        full = Image.open(io.BytesIO(buf.getvalue()))
        full.load()  # decoded whole: draft mode no longer applies
        drafted = data.random_resized_crop(Image.open(io.BytesIO(buf.getvalue())), 224, np.random.default_rng(seed))
        whole = data.random_resized_crop(full, 224, np.random.default_rng(seed))
        assert (drafted.float() - whole.float()).abs().mean() < 8


def test_training_crops_change_with_the_step_not_with_the_rank(tmp_path):
    """A sample's crop is drawn from (seed, step, index): the same whichever rank or loader worker reads it and
    whatever else is in its batch; another one each epoch. Tar shards: another one each pass over the shard."""
    rows = write_images(tmp_path / "img", 4, resolution=64)
    (tmp_path / "t.csv").write_text("filepath,title\n" + "".join(f"img/{f},{c}\n" for f, c, _ in rows))
    train_set = data.TrainSet(data.CsvCaptions(str(tmp_path / "t.csv")), 32)
    first, later, again = train_set[[(0, 1)]][0], train_set[[(5, 1)]][0], train_set[[(0, 2), (0, 1)]][0]
    assert torch.equal(first[0], again[1]) and not torch.equal(first[0], later[0])
    shards = iter(data.TarShards(write_shards(tmp_path / "shards", 1, 4), 4, 32))
    (one, captions, *_), (two, captions_again, *_) = next(shards), next(shards)
    assert captions == captions_again and not torch.equal(one, two)


def test_synthetic_data_is_deterministic_and_holds_out_combinations():
    a = data.Synthetic(50, 32, seed=3)
    pixels, captions, labels = a.render(range(10))
    again = a.render([7, 3])  # per index: the same whatever else is in the batch
    assert np.array_equal(again[0], pixels[[7, 3]]) and again[1] == [captions[7], captions[3]]
    assert not np.array_equal(data.Synthetic(50, 32, seed=4).render([3])[0], pixels[[3]])
    assert len(a.triples) == 80 and not any(data.is_heldout(*t) for t in a.triples)
    heldout = data.Synthetic(20, 32, split="heldout")
    assert len(heldout.triples) == 20 and all(data.is_heldout(*t) for t in heldout.triples)
    assert {(s, c) for s, c, _ in heldout.triples} <= {(s, c) for s, c, _ in a.triples}  # pairs seen elsewhere
    labels = heldout.render(range(20))[2]
    assert len(set(labels["shape"])) > 2 and len(set(labels["colour"])) > 2
    for name, (classes, templates) in data.ZEROSHOT_TASKS.items():  # prompts are not training captions
        assert len(classes) >= 4 and not any(t.split()[1] in c for t in templates for c in data.CAPTIONS)



def test_the_synthetic_benchmark_shows_only_combinations_training_never_draws():
    """Each image of zeroshot.py's synthetic benchmark: its shape and colour (the labels) and its position (where its
    coloured pixels lie) form a triple the training split never draws."""
    tasks, [(images, labels, _)] = zeroshot.benchmark("synthetic", 32)
    std, mean = torch.tensor(data.STD)[:, None, None], torch.tensor(data.MEAN)[:, None, None]
    pixels = ((images * std + mean) * 255).numpy()  # [n, 3, R, R]
    positions = np.array(list(data.POSITIONS.values()))  # [5, 2] (x, y)
    for image, shape, colour in zip(pixels, labels["shape"], labels["colour"]):
        ys, xs = np.nonzero(image.max(0) - image.min(0) > 80)  # the coloured shape, not the grey background
        where = list(data.POSITIONS)[np.abs(positions - [xs.mean() / 31, ys.mean() / 31]).sum(1).argmin()]
        assert data.is_heldout(tasks["shape"][0][shape], tasks["colour"][0][colour], where)


def test_synthetic_shapes_are_drawn_where_and_as_their_captions_say():
    pixels, captions, _ = data.Synthetic(200, 32).render(range(200))
    saturated = pixels.max(-1) - pixels.min(-1) > 80  # [n, R, R]: the coloured shape, not the grey background
    for image, shape, caption in zip(pixels, saturated, captions):
        ys, xs = np.nonzero(shape)
        sides = dict(left=xs.mean() < 14, right=xs.mean() > 18, top=ys.mean() < 14, bottom=ys.mean() > 18)
        assert all(inside for side, inside in sides.items() if side in caption), caption
        colour = image[shape].mean(0)
        assert min(data.COLOURS, key=lambda c: np.abs(colour - data.COLOURS[c]).sum()) in caption, caption


def test_global_batches_do_not_depend_on_world_size():
    one = iter(data.global_batches(40, 8, seed=1))
    two = [iter(data.global_batches(40, 4, rank=r, world=2, seed=1)) for r in range(2)]
    for _ in range(12):  # crosses epoch boundaries (5 steps per epoch)
        assert next(one) == next(two[0]) + next(two[1])
    resumed = iter(data.global_batches(40, 8, seed=1, start=7))
    fresh = iter(data.global_batches(40, 8, seed=1))
    assert next(resumed) == [next(fresh) for _ in range(8)][-1]
    # in micro-batches (--accum-steps 2): rank r's k-th half is its share of the global batch's k-th half
    one = next(iter(data.global_batches(40, 8, seed=1, accum_steps=2)))
    two = [next(iter(data.global_batches(40, 4, rank=r, world=2, seed=1, accum_steps=2))) for r in range(2)]
    assert one == two[0][:2] + two[1][:2] + two[0][2:] + two[1][2:]
    # each epoch is a new permutation of all samples, keyed by its steps
    batches = data.global_batches(40, 8, seed=1)
    epochs = [[key for _ in range(5) for key in next(batches)] for _ in range(2)]
    assert [sorted(i for _, i in keys) for keys in epochs] == [list(range(40))] * 2
    assert [i for _, i in epochs[0]] != [i for _, i in epochs[1]] and {s for s, _ in epochs[1]} == set(range(5, 10))


def test_csv_files_as_spreadsheets_write_them(tmp_path, capsys):
    rows = write_images(tmp_path / "img", 8)
    lines = ["filepath,title"] + [f"img/{f},{cap}" for f, cap, _ in rows[:7]] + ["img/0007.png"]  # a short row
    (tmp_path / "bom.csv").write_bytes("\n".join(lines).encode("utf-8-sig"))
    ds = data.CsvCaptions(str(tmp_path / "bom.csv"))
    assert len(ds) == 8 and ds[7][1] is None
    batch = data.TrainSet(ds, 32)[[(0, 7), (0, 0)]]
    assert batch[2] == {"no caption": 1} and batch[1][0] == rows[0][1]  # the short row is skipped and counted
    (tmp_path / "latin1.csv").write_bytes("filepath,title\nimg/0000.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.csv: not UTF-8 text \(byte "):
        data.CsvCaptions(str(tmp_path / "latin1.csv"))


def test_tsv_quotes_are_text_and_csv_quotes_that_swallow_lines_are_named(tmp_path):
    rows = [f"imgs/{i}.png\tcaption {i}" for i in range(8)]
    rows[2], rows[3] = 'imgs/2.png\t"the best" day ever', 'imgs/3.png\t"unclosed quote begins this caption'
    (tmp_path / "cc.tsv").write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    captions = [c for _, c in data.CsvCaptions(str(tmp_path / "cc.tsv")).rows]
    assert len(captions) == 8 and captions[2] == '"the best" day ever' and captions[3].startswith('"unclosed quote')
    (tmp_path / "q.csv").write_text('filepath,title\na.png,"a, quoted caption"\nb.png,"unclosed\nc.png,more\n')
    assert 'q.csv, line 4: a field spans lines' in one_line_error(data.CsvCaptions, str(tmp_path / "q.csv"))
    (tmp_path / "d.csv").write_text("filepath,title,title\na.png,one,two\n")
    assert "a column name given twice (columns: ['filepath', 'title', 'title'])" in one_line_error(
        data.CsvCaptions, str(tmp_path / "d.csv")
    )



def test_csv_rows_naming_one_image_file_share_its_id(eval_folder):
    """However its path is spelled (relative, ./, //, absolute), one file is one image."""
    dataset = data.CsvCaptions(str(eval_folder / "pairs.csv"))
    files = [os.path.realpath(item[0]) for item in dataset]
    assert len(set(files)) == len(set(dataset.image_ids)) == 17  # 15 files, "missing.png", "images/diamond/x.png"
    assert all((a == b) == (i == j) for a, i in zip(files, dataset.image_ids) for b, j in zip(files, dataset.image_ids))


def test_image_folders_take_torchvisions_extensions_and_symlinked_folders(tmp_path, capsys):
    os.makedirs(tmp_path / "elsewhere")
    os.makedirs(tmp_path / "data" / "cat")
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "data" / "cat" / "a.tif")
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "elsewhere" / "b.ppm")
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "cat" / "more")
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "dog")
    folder = data.ImageFolder(str(tmp_path / "data"))
    assert folder.classes == ["cat", "dog"] and len(folder) == 3
    os.makedirs(tmp_path / "none" / "x")
    (tmp_path / "none" / "x" / "notes.txt").write_text("no image")
    assert ".tif .tiff .webp" in one_line_error(data.ImageFolder, str(tmp_path / "none"))



def test_tar_shards_split_over_ranks_and_workers(tmp_path):
    pattern = write_shards(tmp_path / "shards", 4, 6, ext=".tar.gz")  # gzipped shards, as tarfile reads them
    assert len(data.expand_braces(pattern)) == 4
    seen = []
    for rank in range(2):
        loader = torch.utils.data.DataLoader(
            data.TarShards(pattern, 3, 32, rank=rank, world=2), batch_size=None, num_workers=2
        )
        batches = iter(loader)
        seen.append([c for _ in range(4) for c in next(batches)[1]])  # 4 batches x 3 = one pass over 12 samples
    assert len(set(seen[0])) == 12 and not set(seen[0]) & set(seen[1])


def test_tar_shards_resume_from_each_slots_position_reading_at_most_one_shard_again(tmp_path, monkeypatch):
    """A loader resumed at step k from the positions its slots' last batches before k carried gives the straight
    run's batches from k on (the same samples, the same crops), with 0, 1 and 2 workers, mid-pass and passes later.
    Resuming reads again at most what a shard held before the position: the cost does not grow with the step."""
    pattern = write_shards(tmp_path / "shards", 4, 5)  # batches of 3 straddle shards

    def batches(workers, start=0, positions={}):
        shards = data.TarShards(pattern, 3, 32, workers=workers)
        shards.start, shards.positions = start, positions  # as train.py's loader resumes them
        return iter(torch.utils.data.DataLoader(shards, batch_size=None, num_workers=workers))
    for workers in (2, 1, 0):
        slots = max(1, workers)
        straight = batches(workers)
        steps = [next(straight) for _ in range(16)]  # 2.4 passes over each slot's shards (2 workers)
        for k in (7, 14):
            positions = {s: steps[max(j for j in range(k) if j % slots == s)][3] for s in range(slots)}
            resumed = batches(workers, k, positions)
            for step in range(k, 16):
                images, captions, _, position = next(resumed)
                assert captions == steps[step][1] and torch.equal(images, steps[step][0]) and position == steps[step][3]
    reads, tar_samples = [], data.tar_samples

    def counted(path):  # samples read
        for sample in tar_samples(path):
            reads.append(1)
            yield sample
    monkeypatch.setattr(data, "tar_samples", counted)
    for k in (2, 15):  # 0 workers: in the first pass and in the third
        reads.clear()
        next(batches(0, k, {0: steps[k - 1][3]}))
        assert len(reads) <= 5 + 3  # what the position's shard held before it, and a batch


def test_tar_sample_without_caption_is_a_missing_caption(tmp_path):
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, payload in (("a.jpg", b"x"), ("a.json", b"{}"), ("b.txt", b"caption")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    assert list(data.tar_samples(str(tmp_path / "s.tar"))) == [(b"x", None), (None, b"caption")]
    with pytest.raises(ValueError, match="no caption"):
        data.load_sample((io.BytesIO(b"x"), None, {}), None)



def test_repeated_tar_keys_start_new_samples(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    members = [m for i in range(3) for m in (("0000.png", buf.getvalue()), ("0000.txt", f"c{i}".encode()))]
    write_tar(tmp_path / "s.tar", members + [("0001.txt", b"d"), ("0001.png", buf.getvalue()), ("0001.txt", b"e")])
    assert [c for _, c in data.tar_samples(str(tmp_path / "s.tar"))] == [b"c0", b"c1", b"c2", b"d", b"e"]


def test_tar_shards_without_usable_samples_fail_instead_of_hanging(tmp_path):
    os.makedirs(tmp_path / "bad")
    with tarfile.open(tmp_path / "bad" / "00000.tar", "w") as tar:
        for i in range(3):  # captions without images, and one corrupt image
            for name, payload in ((f"{i}.txt", b"a caption"),) + (((f"{i}.jpg", b"not a jpeg"),) if i == 0 else ()):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(ValueError, match="0 usable samples in a pass over the 1 shards of rank 0"):
        next(iter(data.TarShards(str(tmp_path / "bad" / "00000.tar"), 2, 32)))


def test_a_loader_worker_with_fewer_samples_than_a_batch_stops_the_run(tmp_path):
    pattern = write_shards(tmp_path / "shards", 2, 8)
    os.replace(tmp_path / "shards" / "00001.tar", tmp_path / "full.tar")
    with tarfile.open(tmp_path / "full.tar") as full:
        write_tar(
            tmp_path / "shards" / "00001.tar", [(m.name, full.extractfile(m).read()) for m in full.getmembers()[:4]]
        )
    batches = iter(torch.utils.data.DataLoader(data.TarShards(pattern, 4, 32, workers=2), batch_size=None,
                                               num_workers=2))
    with pytest.raises(Exception, match=r"2 usable samples in a pass over the 1 shards of rank 0, "
                                        r"loader worker 1: fewer than a batch of 4") as e:
        [next(batches) for _ in range(8)]
    traceback.clear_frames(e.tb)  # the loader's workers end now (shut down later by gc.collect, they wait 5 s)
    del batches
    assert data.expand_braces("x/{00003..00000}.tar") == [] and "0 shards for 1 ranks" in one_line_error(
        data.TarShards, "x/{00003..00000}.tar", 4)
    assert "a brace range with a step ({000..010..2}) is not supported" in one_line_error(
        data.expand_braces, "x/{000..010..2}.tar")


# ---------------------------------------------------------------------------------------------------- the step


def test_lr_schedule_warms_up_to_the_peak_then_follows_the_cosine():
    args = train.parse_args(["--lr", "2.0", "--warmup", "10", "--restart-cycles", "1"])
    lrs = [train.get_lr(step, args, 110) for step in range(110)]
    assert lrs[:10] == pytest.approx([0.2 * (step + 1) for step in range(10)]) and lrs[9] == max(lrs) == 2.0
    assert lrs[10:] == pytest.approx([1 + math.cos(math.pi * step / 100) for step in range(100)], abs=1e-12)
    args.restart_cycles = 2  # two cosines of 50 steps, each from the peak
    lrs = [train.get_lr(step, args, 110) for step in range(110)]
    assert lrs[10:] == pytest.approx([1 + math.cos(math.pi * (step % 50) / 50) for step in range(100)], abs=1e-12)


@pytest.mark.parametrize("preset", ["tiny-vit", "tiny-rn"])
def test_weight_decay_applies_to_weight_matrices_only(preset):
    """One AdamW step with zero gradients moves only decayed tensors, by lr x wd: weight matrices, convolutions,
    embeddings and projections; not LayerNorm or BatchNorm gains, biases, the class embedding or the temperature
    (OpenCLIP's rule, by module and name)."""
    args = train.parse_args(["--method", "clip", "--model", preset, "--wd", "0.5", "--lr", "0.1"])
    model, _ = train.build_model(args, CPU)
    _, optimizer, _, _ = train.prepare(train.settings(args, model, None, 1), model, CPU, 1)
    norms = {f"{name}.{p}".lstrip(".") for name, m in model.named_modules()
             if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)) for p, _ in m.named_parameters(recurse=False)}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        kept = name in norms or name.endswith(("bias", "class_embedding", "logit_scale"))
        assert torch.equal(p.detach(), before[name] * (1.0 if kept else 0.95)), name


def _step_setup(flags, seed=0):
    """train.py's step for the tiny ResNet on 4 random images -> (args, model, net, optimizer, scaler, ctx, images,
    tokens)."""
    args = train.parse_args(["--model", "tiny-rn", "--batch-size", "4", *flags])
    model, _ = train.build_model(args, CPU)
    args = train.settings(args, model, None, 1)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (4, 48), generator=g)
    tokens[:, 20] = 257
    return (args, model, *train.prepare(args, model, CPU, 1), torch.rand(4, 3, 64, 64, generator=g) * 255, tokens)


def test_a_learnable_temperature_stays_between_1_and_100():
    args, model, net, optimizer, scaler, ctx, images, tokens = _step_setup(["--method", "clip"])
    for start, clamped in ((math.log(500), math.log(100)), (-1.0, 0.0)):  # 1/T of 500, then of 1/e
        with torch.no_grad():
            model.logit_scale.fill_(start)
        train.train_step(args, model, net, optimizer, scaler, ctx, images, tokens, 1)
        assert model.logit_scale.item() == pytest.approx(clamped, abs=1e-6)


@pytest.mark.parametrize("flags", [[], ["--accum-steps", "2"], ["--grad-checkpointing"], ["--precision", "fp16"]])
def test_a_skipped_step_leaves_the_model_as_it_was(flags):
    """A ResNet forward that overflows (fp16) or meets infinite pixels writes inf/NaN into BatchNorm's running
    statistics before the loss is known: the skipped step restores them, with weights and AdamW's state."""
    args, model, net, optimizer, scaler, ctx, images, tokens = _step_setup(flags)
    train.train_step(args, model, net, optimizer, scaler, ctx, images, tokens, 1)  # one step taken first
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: [t.clone() for t in s.values()] for k, s in optimizer.state.items()}
    overflow = 1e6 if "fp16" in flags else math.inf  # 1e6 x 255 is finite in float32, not in float16
    _, finite = train.train_step(args, model, net, optimizer, scaler, ctx, images * overflow, tokens, 1)
    assert finite.tolist() == [0.0, 0.0]  # the loss is not finite
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(torch.equal(a, b) for k, s in optimizer.state.items() for a, b in zip(s.values(), moments[k]))


def test_gradients_that_are_not_finite_skip_the_step():
    """A finite loss whose gradients hold a NaN: the step is skipped all the same."""
    args, model, net, optimizer, scaler, ctx, images, tokens = _step_setup([])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.visual.attnpool.c_proj.weight.register_hook(lambda grad: grad * math.nan)
    loss, finite = train.train_step(args, model, net, optimizer, scaler, ctx, images, tokens, 1)
    assert torch.isfinite(loss) and finite.tolist() == [1.0, 0.0]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("flags", [["--accum-steps", "4"], ["--grad-checkpointing"]])
def test_one_step_updates_batchnorm_statistics_once(flags):
    args = train.parse_args(["--model", "tiny-rn", "--batch-size", "8", *flags])
    model, _ = train.build_model(args, CPU)
    args = train.settings(args, model, None, 1)
    net, optimizer, scaler, ctx = train.prepare(args, model, CPU, 1)
    images, tokens = torch.randn(8, 3, 64, 64), torch.randint(0, 256, (8, 48))
    tokens[:, 20] = 257
    train.train_step(args, model, net, optimizer, scaler, ctx, images, tokens, 1)
    counts = {k: v.item() for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")}
    assert len(counts) > 10 and set(counts.values()) == {1}


class LiveActivations:
    """saved_tensors_hooks: bytes of activations autograd holds (parameters excluded), and their peak."""

    def __init__(self, model):
        self.params, self.live, self.peak = {p.data_ptr() for p in model.parameters()}, 0, 0

    def pack(self, t):
        return _Held(self, t, 0 if t.data_ptr() in self.params else t.numel() * t.element_size())


class _Held:
    def __init__(self, owner, t, n):
        self.owner, self.t, self.n = owner, t, n
        owner.live += n
        owner.peak = max(owner.peak, owner.live)

    def __del__(self):
        self.owner.live -= self.n


@pytest.mark.parametrize("method", ["clip", "cloob"])
def test_gradient_caching_equals_the_big_batch_gradient(method):
    torch.manual_seed(0)
    model = cloob.CLIP(dataclasses.replace(cloob.CONFIGS["tiny-vit"], vocab_size=258))
    model.set_temperature(30.0 if method == "cloob" else 1 / 0.07, learnable=method == "clip")
    pixels, captions, _ = data.Synthetic(32, 32).render(range(32))
    images, tokens = data.normalize(data.channels_first(pixels)), cloob.Tokenizer("bytes", 48)(captions)
    args = train.parse_args(["--method", method, "--batch-size", "32"])
    grads, peaks = {}, {}
    for k in (1, 4):
        args.accum_steps = k
        model.zero_grad()
        hooks = LiveActivations(model)
        with torch.autograd.graph.saved_tensors_hooks(hooks.pack, lambda held: held.t):
            if k == 1:
                train.compute_loss(args, model, *model(images, tokens)).backward()
            else:
                train.grad_cache_backward(
                    args, model, model, images, tokens, contextlib.nullcontext(),
                    torch.amp.GradScaler("cpu", enabled=False), 1
                )
        grads[k] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        peaks[k] = hooks.peak
    assert grads[1].keys() == grads[4].keys() and ("logit_scale" in grads[4]) == (method == "clip")
    for n in grads[1]:
        assert (grads[4][n] - grads[1][n]).abs().max() <= 1e-5 * max(1.0, grads[1][n].abs().max().item()), n
    assert peaks[4] < 0.3 * peaks[1]  # activations of one micro-batch at a time


class Overflow(torch.autograd.Function):
    """The loss as it is, its gradient infinite: an fp16 overflow of the scaled gradients, with a finite loss."""

    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def test_nonfinite_losses_skip_the_step_and_repeated_ones_stop_the_run(tmp_path, monkeypatch, capsys):
    """A non-finite loss skips its step (weights and AdamW's moments as before); the fifth in a row stops the run at
    that step whatever --log-every is. fp16 overflows (a finite loss, gradients inf) are GradScaler's calibration:
    counted apart, never a reason to stop."""
    real, calls = train.compute_loss, []

    def poisoned(args, model, x, y):  # steps listed in `bad` get a NaN loss, those in `overflow` infinite gradients
        calls.append(1)
        loss = real(args, model, x, y) * (float("nan") if len(calls) in bad else 1.0)
        return Overflow.apply(loss) if len(calls) in overflow else loss
    monkeypatch.setattr(train, "compute_loss", poisoned)
    bad, overflow = {5, 6}, set()
    common = [*FAST, "--batch-size", "4", "--logs-dir", str(tmp_path)]
    train.main([*common, "--steps", "6", "--save-every", "5", "--name", "nan"])
    five, six = (torch.load(p, weights_only=True) for p in cloob.checkpoints(str(tmp_path / "nan")))
    assert (five["step"], six["step"]) == (5, 6) and metrics(tmp_path / "nan")[-2]["nonfinite_steps"] == 2
    for k in five["state_dict"]:  # step 6 left weights and Adam moments as they were
        assert torch.equal(five["state_dict"][k], six["state_dict"][k]) and torch.isfinite(six["state_dict"][k]).all()
    assert all(
        torch.equal(a["exp_avg"], b["exp_avg"])
        for a, b in zip(five["optimizer"]["state"].values(), six["optimizer"]["state"].values())
    )
    calls.clear()
    bad, overflow = set(range(3, 100)), set()
    err = train_error(capsys, *common, "--steps", "20", "--log-every", "100", "--name", "nan2")
    assert "the loss or its gradients were not finite for 5 steps in a row (by step 7)" in err
    calls.clear()
    # fp16: 9 steps skipped in a row, 4 of them for a NaN loss: the overflows are no failures
    bad, overflow = {2, 4, 6, 8}, {1, 3, 5, 7, 9}
    train.main([*common, "--steps", "10", "--precision", "fp16", "--log-every", "10", "--name", "fp16"])
    # GradScaler halves its scale after each of the 9
    assert "non-finite: 4 steps skipped fp16 overflows: 5 (loss scale now 2^7)" in capsys.readouterr().out
    event = metrics(tmp_path / "fp16")[0]
    assert (event["nonfinite_steps"], event["fp16_overflows"]) == (4, 5)


def vit_train_flops(c):
    """Training FLOPs per sample of a ViT CLIP by hand: matmuls (2 per multiply-add), backward = 2 x forward,
    except that the patch embedding computes no gradient for the images."""
    def blocks(tokens, width, layers):  # qkv, out, 4x MLP: 12 w^2 per token; QK^T and AV: 2 T^2 w
        # the last block answers one query (the class or end token): qkv of every token, the rest for one
        last = 2 * tokens * 3 * width ** 2 + 4 * tokens * width + 2 * 9 * width ** 2
        return (layers - 1) * (2 * tokens * 12 * width ** 2 + 4 * tokens ** 2 * width) + last
    patches = (c.image_resolution // c.vision_patch_size) ** 2
    patch_embed = 2 * patches * 3 * c.vision_patch_size ** 2 * c.vision_width
    image = patch_embed + blocks(patches + 1, c.vision_width, c.vision_layers) + 2 * c.vision_width * c.embed_dim
    text = blocks(c.context_length, c.transformer_width, c.transformer_layers) + 2 * c.transformer_width * c.embed_dim
    return 3 * (image + text) - patch_embed


def test_flops_counted_from_the_config_match_a_count_by_hand():
    for name in ("tiny-vit", "ViT-B-32"):
        assert train.flops_per_sample(cloob.CONFIGS[name]) == vit_train_flops(cloob.CONFIGS[name])


def test_bench_times_the_training_step(capsys, monkeypatch):
    r = train.main(["--bench", "--batch-size", "8", "--steps", "2"])
    assert "step_ms" in capsys.readouterr().out and r["flops_per_sample"] == vit_train_flops(cloob.CONFIGS["tiny-vit"])
    assert r["samples_per_s"] == pytest.approx(8 / (r["step_ms"] / 1e3)) and r["mfu"] is None  # no peak known on a CPU
    assert r["peak_memory_gib"] is None and r["device"] == "cpu"  # the CUDA allocator's peak, on a GPU
    monkeypatch.setattr(train, "PEAK_TFLOPS", {"cpu": 1})  # as if the CPU's bf16 peak were 1 TFLOP/s
    train.main(["--bench", "--batch-size", "8", "--steps", "1", "--accum-steps", "2", "--method", "clip",
                "--precision", "bf16"])
    r = json.loads(capsys.readouterr().out)
    assert r["accum_steps"] == 2 and r["method"] == "clip"
    assert r["mfu"] == pytest.approx(r["flops_per_sample"] * r["samples_per_s"] / 1e12)
    assert train.main(["--bench", "--batch-size", "8", "--steps", "1"])["mfu"] is None  # no fp32 peak in the table



def test_compiled_model_recompiles_a_bounded_number_of_times_over_caption_lengths():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = cloob.CLIP(dataclasses.replace(MICRO, context_length=64))
    compiled = torch.compile(model, backend="eager")  # dynamo's guards and recompiles, without inductor's code
    torch._dynamo.utils.counters.clear()
    images, tokens = torch.randn(2, 3, 16, 16), torch.randint(0, 30, (2, 64))
    tokens[:, 5] = MICRO.vocab_size - 1
    for length in (8, 16, 24, 32, 40, 48, 56, 64, 16):
        compiled(images, tokens[:, :length])
    # the first length; the second makes the length dynamic; the full context (a slice that takes every position)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3
    assert train.parse_args([]).compile is torch.cuda.is_available() and not train.parse_args(["--no-compile"]).compile


# ---------------------------------------------------------------------------------------------------- training runs


def test_short_synthetic_run_learns(tmp_path):
    # CLIP on the demo's data, 60 steps of 64: the held-out combinations' colours are learned (seeds 0-6 gave 0.99-1.0
    # on the tests' 100 held-out images, 0.988-1.0 on all 500, and a loss of 0.62-0.67 ln 64; CLOOB takes about three
    # times the steps, shape the demo's 1000)
    train.main(["--method", "clip", "--steps", "60", "--warmup", "15", "--lr", "1e-3", "--batch-size", "64",
                "--log-every", "30", "--logs-dir", str(tmp_path), "--name", "demo", "--seed", "3"])
    final = metrics(tmp_path / "demo")[-1]
    assert final["zeroshot/colour/top1"] >= 0.9  # chance: 0.2
    assert losses(tmp_path / "demo")[-1] < 0.75 * math.log(64)  # from about ln(N)
    # zeroshot.py measures the run's checkpoint on the same benchmark, whatever the training seed
    r = zeroshot.main(["--model", str(tmp_path / "demo"), "--data", "synthetic", "--workers", "0"])
    assert [r[t]["top1"] for t in ("shape", "colour")] == [final[f"zeroshot/{t}/top1"] for t in ("shape", "colour")]


def test_csv_with_missing_and_corrupt_images_trains_and_reports(tmp_path, capsys):
    rows = write_images(tmp_path / "img", 16)
    (tmp_path / "img" / "0001.png").unlink()  # missing
    (tmp_path / "img" / "0002.png").write_bytes(b"not a png")  # corrupt
    lines = ["filepath\ttitle"] + [f"img/{f}\t{'' if i == 3 else cap}" for i, (f, cap, _) in enumerate(rows)]
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
    train.main([*FAST, "--train-data", str(tmp_path / "train.tsv"), "--tokenizer", "bytes", "--batch-size", "8",
                "--steps", "4", "--logs-dir", str(tmp_path), "--name", "csv"])
    out = capsys.readouterr().out
    assert "missing image" in out and "corrupt image" in out and "no caption" in out
    events = metrics(tmp_path / "csv")
    assert events[-1]["skipped"] >= 3 and np.isfinite(events[-1]["loss"]) and 0 <= events[-1]["data_wait"] <= 1



def test_tar_shards_train(tmp_path):
    pattern = write_shards(tmp_path / "shards", 2, 6, ext=".tar.gz")
    train.main([*FAST, "--train-data", pattern, "--train-num-samples", "12", "--tokenizer", "bytes",
                "--batch-size", "6", "--steps", "3", "--logs-dir", str(tmp_path), "--name", "tar"])
    assert len(losses(tmp_path / "tar")) == 3


def test_damaged_shards_are_skipped_counted_and_named(tmp_path, capsys):
    pattern = write_shards(tmp_path / "shards", 4, 6)
    good = (tmp_path / "shards" / "00001.tar").read_bytes()
    (tmp_path / "shards" / "00001.tar").write_bytes(good[:len(good) // 2])  # truncated mid-file
    (tmp_path / "shards" / "00002.tar").write_bytes(os.urandom(5000))  # not a tar
    (tmp_path / "shards" / "00003.tar").write_bytes(b"")  # empty
    train.main(
        [
            *FAST,
            "--train-data",
            pattern,
            "--train-num-samples",
            "12",
            "--tokenizer",
            "bytes",
            "--batch-size",
            "3",
            "--steps",
            "5",
            "--logs-dir",
            str(tmp_path),
            "--name",
            "tar",
        ]
    )
    out = capsys.readouterr().out
    assert all(f"damaged shard 0000{i}.tar" in out for i in (1, 2, 3)) and "Traceback" not in out
    assert len(losses(tmp_path / "tar")) == 5 and all(np.isfinite(losses(tmp_path / "tar")))


def test_csv_column_flags_epochs_defaults_and_hopfield_beta(tmp_path, capsys):
    """--csv-separator '\\t' as typed in a shell is a tab; the start line names the data's defaults in effect;
    --epochs sets the length on synthetic data too, and a warm-up as long as the run is a warning."""
    rows = write_images(tmp_path / "img", 8)
    (tmp_path / "t.csv").write_text("caption\timage\n" + "".join(f"{cap}\timg/{f}\n" for f, cap, _ in rows))
    common = [*FAST, "--train-data", str(tmp_path / "t.csv"), "--csv-img-key", "image", "--csv-caption-key", "caption",
              "--csv-separator", "\\t", "--tokenizer", "bytes", "--batch-size", "4", "--epochs", "2",
              "--logs-dir", str(tmp_path)]
    train.main([*common, "--name", "beta8"])
    assert "\ndefaults, the official CLOOB recipe's (real data): {'restart_cycles': 10}\n" in capsys.readouterr().out
    train.main([*common, "--name", "beta2", "--hopfield-beta", "2"])
    assert [e["epoch"] for e in metrics(tmp_path / "beta8") if "loss" in e] == [0.5, 1.0, 1.5, 2.0]  # 8 rows, 2 x 4
    assert losses(tmp_path / "beta2")[0] != pytest.approx(losses(tmp_path / "beta8")[0], rel=1e-3)
    capsys.readouterr()
    train.main([*FAST, "--epochs", "1", "--train-num-samples", "8", "--batch-size", "4", "--logs-dir", str(tmp_path),
                "--name", "epoch"])
    out = capsys.readouterr().out
    assert len(losses(tmp_path / "epoch")) == 2 and "the warm-up (2 steps) is the whole run" in out
    assert "defaults, the demo's: {'restart_cycles': 1, 'zeroshot_data': 'synthetic'}\n" in out
    assert train.parse_args(["--epochs", "1", "--steps", "3"]).steps == 3  # --steps wins


def test_zeroshot_data_flag_evaluates_a_folder_during_training(eval_folder, tmp_path):
    train.main([*FAST, "--batch-size", "4", "--steps", "2", "--zeroshot-every", "1", "--logs-dir", str(tmp_path),
                "--name", "zs", "--zeroshot-data", str(eval_folder / "images")])
    scores = [e["zeroshot/images/top1"] for e in metrics(tmp_path / "zs") if "zeroshot/images/top1" in e]
    assert len(scores) == 2 and all(0 <= s <= 1 for s in scores)


def test_fine_tuning_a_resnet_trains_in_train_mode_and_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    cloob.save_checkpoint(str(tmp_path / "rn.pt"), cloob.CLIP(cloob.CONFIGS["tiny-rn"]), "bytes", "cloob")
    common = [*FAST, "--pretrained", str(tmp_path / "rn.pt"), "--batch-size", "4", "--logs-dir", str(tmp_path)]
    train.main([*common, "--steps", "4", "--name", "straight"])
    train.main([*common, "--steps", "2", "--name", "resumed"])
    train.main([*common, "--steps", "4", "--name", "resumed", "--resume", "latest"])
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert a["state_dict"]["visual.bn1.num_batches_tracked"] == 4  # BatchNorm live from the first step
    for k in a["state_dict"]:
        assert torch.allclose(a["state_dict"][k].float(), b["state_dict"][k].float(), atol=1e-6), k


@pytest.mark.parametrize("preset,method,beta2,eps", [("tiny-vit", "clip", 0.98, 1e-6), ("tiny-rn", "clip", 0.999, 1e-8),
                                                     ("tiny-vit", "cloob", 0.98, 1e-8)])
def test_adamw_defaults_and_run_name_follow_the_loaded_model(preset, method, beta2, eps, tmp_path):
    cloob.save_checkpoint(str(tmp_path / "model.pt"), cloob.CLIP(cloob.CONFIGS[preset]), "bytes", "clip")
    args = train.parse_args(["--pretrained", str(tmp_path / "model.pt"), "--method", method])
    model, _ = train.build_model(args, CPU)
    run = train.settings(args, model, "bytes", 1)  # the settings once the model is known; the command's stay
    assert (run.beta2, run.eps) == (beta2, eps) and args.name.startswith(f"{method}-model-") and model.training
    assert (args.beta2, args.eps) == (None, None)


def test_learnable_cloob_temperature_is_clamped(tmp_path):
    train.main([*FAST, "--batch-size", "8", "--steps", "4", "--learn-inv-tau", "--init-inv-tau", "99.9", "--lr", "0.05",
                "--logs-dir", str(tmp_path), "--name", "t"])
    inv_tau = [e["inv_temperature"] for e in metrics(tmp_path / "t") if "loss" in e]
    assert max(inv_tau) <= 100 + 1e-4 and inv_tau[-1] == pytest.approx(100, abs=1e-3)  # it grows, up to the clamp



@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    """2 fp32 steps of 8: what the other precisions and torch.compile are compared with (seed 1: both batches' captions
    fit 40 token positions, so torch.compile compiles once)."""
    logs = tmp_path_factory.mktemp("fp32")
    train.main([*FAST, "--batch-size", "8", "--steps", "2", "--seed", "1", "--logs-dir", str(logs), "--name", "fp32"])
    return losses(logs / "fp32")


@pytest.mark.parametrize("flags", [["--precision", "bf16"], ["--precision", "fp16"]])
def test_mixed_precision_trains_on_cpu(flags, fp32_run, tmp_path):
    """bf16 autocast (the GPU default) and fp16 with GradScaler: finite losses close to fp32's."""
    train.main([*FAST, "--batch-size", "8", "--steps", "2", "--seed", "1", "--logs-dir", str(tmp_path), *flags,
                "--name", "run"])
    assert losses(tmp_path / "run") == pytest.approx(fp32_run, rel=0.05)
    assert (final_weights(tmp_path / "run")["scaler"].get("scale") is not None) == ("fp16" in flags)  # fp16 only


def test_compile_trains_as_eager(fp32_run, tmp_path, monkeypatch, capsys):
    """--compile with --grad-checkpointing: the fp32 run's losses. Dynamo and AOTAutograd trace the model and its
    checkpointed blocks as on a GPU; inductor's code generation (a minute of C++ builds on a cold CPU cache, and
    Triton on a GPU in any case) is replaced by eager kernels."""
    torch._dynamo.reset()  # a fresh process's dynamo: no shapes marked dynamic by the recompilation test
    compiled, compile_eagerly = [], partial(torch.compile, backend="aot_eager")
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or compile_eagerly(model))
    train.main([*FAST, "--batch-size", "8", "--steps", "2", "--seed", "1", "--logs-dir", str(tmp_path), "--compile",
                "--grad-checkpointing", "--name", "run"])
    assert len(compiled) == 1
    assert losses(tmp_path / "run") == pytest.approx(fp32_run, rel=1e-4)

# ---------------------------------------------------------------------------------------------------- stop and resume


def wait_for_steps(run_dir, n, process, timeout=90):
    """Until the run has logged n steps (or died)."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if os.path.isfile(run_dir / "metrics.jsonl") and len(losses(run_dir)) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{run_dir} did not reach step {n}")


def worker_pids(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return sorted(int(p) for p in f.read().split())


def alive(pid):
    """Whether a process runs (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False



@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """20 steps of 4 without a stop: the checkpoint a stopped or killed run must resume to."""
    logs = tmp_path_factory.mktemp("straight")
    train.main([*FAST, "--batch-size", "4", "--steps", "20", "--save-every", "20", "--logs-dir", str(logs),
                "--name", "straight"])
    return final_weights(logs / "straight")


def test_a_signal_finishes_the_step_saves_and_resumes_exactly(straight_run, eval_folder, tmp_path):
    """Ctrl-C (SIGINT) and SIGTERM to the whole process group while a periodic evaluation runs, as schedulers send
    them: the loader workers of training and evaluation leave them to the main process, the step finishes, one whole
    checkpoint is written, the exit status is 128 + SIGINT. The run has no --name: the continuation the stop line
    prints, typed as printed, ends where the straight run does, and metrics.jsonl holds each step once."""
    argv = [*FAST, "--batch-size", "4", "--steps", "20", "--save-every", "20", "--logs-dir", str(tmp_path),
            "--zeroshot-data", str(eval_folder / "images"), "--zeroshot-every", "5"]
    run = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *argv, "--workers", "1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:  # until the main process is held while its evaluation's loader worker runs
        if len(worker_pids(run.pid)) == 2:  # the training loader's worker and the evaluation's
            os.kill(run.pid, signal.SIGSTOP)
            if len(worker_pids(run.pid)) == 2 and all(map(alive, worker_pids(run.pid))):
                time.sleep(0.2)  # the worker has set its signal handling up (before, it has the main process's)
                break
            os.kill(run.pid, signal.SIGCONT)
        time.sleep(0.005)
    os.killpg(run.pid, signal.SIGINT)
    os.killpg(run.pid, signal.SIGTERM)  # at once: a later one may find the run saved and exiting, where it kills
    os.kill(run.pid, signal.SIGCONT)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 128 + signal.SIGINT and "Traceback" not in err, err
    stop = re.search(r"stopped by SIGINT after step (\d+): saved (\S+); continue with the same command and (.*)\n", out)
    assert stop and 5 <= int(stop.group(1)) < 20 and stop.group(2).endswith(f"step_{int(stop.group(1)):07d}.pt")
    run_dir = pathlib.Path(stop.group(2)).parent.parent
    assert [os.path.basename(p) for p in glob.glob(str(run_dir / "checkpoints" / "*"))] == \
        [os.path.basename(stop.group(2))]  # one whole file, no temp file
    train.main([*argv, *shlex.split(stop.group(3))])
    resumed = final_weights(run_dir)
    assert resumed["step"] == 20 and same_weights(resumed["state_dict"], straight_run["state_dict"])
    assert [e["step"] for e in metrics(run_dir) if "loss" in e] == list(range(1, 21))


def test_a_killed_run_resumes_to_the_same_weights(straight_run, tmp_path):
    """SIGKILL mid-run leaves no chance to save: --resume latest continues from the last (atomic) checkpoint."""
    argv = [*FAST, "--batch-size", "4", "--steps", "20", "--save-every", "3", "--log-every", "10",
            "--logs-dir", str(tmp_path), "--name", "killed"]
    run = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *argv], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not cloob.checkpoints(str(tmp_path / "killed")) and time.time() < deadline:
        time.sleep(0.02)
    run.kill()
    run.wait()
    assert os.path.basename(cloob.checkpoints(str(tmp_path / "killed"))[-1]) < "step_0000020.pt"  # killed mid-run
    train.main([*argv, "--resume", "latest"])
    resumed = final_weights(tmp_path / "killed")
    assert resumed["step"] == 20 and same_weights(resumed["state_dict"], straight_run["state_dict"])


def test_torchrun_ranks_stop_together_and_equal_one_process(tmp_path, monkeypatch):
    """torchrun, 2 ranks of 4 = 1 process of 8 for the ResNet with --sync-bn; SIGUSR1 to torchrun, run as the README
    says (it forwards SIGUSR1 when told to), stops both ranks after the same step, with one checkpoint, and every
    rank ends. The first loss agrees to float rounding (without --sync-bn it differs by 18%); after it Adam turns
    rounding in near-zero gradients into +-lr steps (the float64 gradient check above agrees to 1e-8), so the curve
    agrees to 1e-3."""
    common = [*FAST, "--model", "tiny-rn", "--sync-bn", "--steps", "20", "--save-every", "100", "--seed", "1",
              "--logs-dir", str(tmp_path)]
    run = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
                            os.path.join(HERE, "train.py"), *common, "--batch-size", "4", "--name", "two"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
    wait_for_steps(tmp_path / "two", 3, run)
    ranks = worker_pids(run.pid)
    os.kill(run.pid, signal.SIGUSR1)
    out, err = run.communicate(timeout=120)
    stop = re.search(r"stopped by SIGUSR1 after step (\d+)", out)
    assert stop and 3 <= int(stop.group(1)) < 20, out + err
    assert len(ranks) == 2 and not any(map(alive, ranks)) and "[rank" not in err  # no rank's traceback
    step = int(stop.group(1))
    assert [os.path.basename(p) for p in cloob.checkpoints(str(tmp_path / "two"))] == [f"step_{step:07d}.pt"]
    stop_at(monkeypatch, step)  # one process, to the same step
    with pytest.raises(SystemExit):
        train.main([*common, "--batch-size", "8", "--name", "one"])
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(two) == len(one) == step and two[0] == pytest.approx(one[0], rel=1e-5)
    assert two == pytest.approx(one, rel=1e-3)


def test_unreadable_newest_checkpoint_is_skipped_and_named(tmp_path, capsys):
    common = [*FAST, "--batch-size", "4", "--save-every", "1", "--logs-dir", str(tmp_path), "--name", "r"]
    train.main([*common, "--steps", "4"])
    kept = [os.path.basename(p) for p in cloob.checkpoints(str(tmp_path / "r"))]
    assert kept == ["step_0000003.pt", "step_0000004.pt"]  # the newest two
    newest = cloob.checkpoints(str(tmp_path / "r"))[-1]
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train.main([*common, "--steps", "6", "--resume", newest])
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"train.py: error: --resume: {newest} cannot be read") and "\n" not in err
    train.main([*common, "--steps", "6", "--resume", "latest"])
    out = capsys.readouterr().out
    assert f"--resume latest: skipping {newest} cannot be read" in out
    assert f"resuming from {tmp_path / 'r' / 'checkpoints' / 'step_0000003.pt'} (step 3)" in out
    assert final_weights(tmp_path / "r")["step"] == 6



def stop_at(monkeypatch, step):
    """train_step that receives SIGTERM during the given step (counted from this run's first)."""
    calls, real = [], train.train_step

    def step_and_maybe_stop(*args):
        calls.append(1)
        if len(calls) == step:
            train.RECEIVED.append(signal.SIGTERM)
        return real(*args)
    monkeypatch.setattr(train, "train_step", step_and_maybe_stop)
    monkeypatch.setattr(train, "RECEIVED", [])


def test_rollback_stop_and_requeue_continue_the_rollback(tmp_path, monkeypatch, capsys):
    common = [*FAST, "--batch-size", "4", "--steps", "6", "--save-every", "2", "--logs-dir", str(tmp_path)]
    train.main([*common, "--name", "straight"])
    train.main([*common, "--name", "r"])  # checkpoints at 4 and 6
    stop_at(monkeypatch, 1)
    with pytest.raises(SystemExit) as e:  # roll back to step 4; stopped after step 5
        train.main([*common, "--name", "r", "--resume", str(tmp_path / "r" / "checkpoints" / "step_0000004.pt")])
    assert e.value.code == 128 + signal.SIGTERM
    assert [os.path.basename(p) for p in cloob.checkpoints(str(tmp_path / "r"))] == [
        "step_0000004.pt",
        "step_0000005.pt",
    ]
    assert glob.glob(str(tmp_path / "r" / "rolled_back_*" / "step_0000006.pt"))
    monkeypatch.undo()  # the real train_step, no signal
    train.main([*common, "--name", "r", "--resume", "latest"])  # the SLURM requeue: from step 5
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "r")
    assert b["step"] == 6 and all(
        torch.allclose(a["state_dict"][k], b["state_dict"][k], atol=1e-6) for k in a["state_dict"]
    )
    before = {p: os.path.getmtime(p) for p in glob.glob(str(tmp_path / "r" / "**"), recursive=True)}
    capsys.readouterr()
    assert train.main([*common, "--name", "r", "--resume", "latest"]) is None  # requeued after it finished: exit 0
    assert capsys.readouterr().out.strip().endswith("has finished: step 6 of 6; nothing to do (raise --steps to go on)")
    assert {p: os.path.getmtime(p) for p in glob.glob(str(tmp_path / "r" / "**"), recursive=True)} == before


def test_a_stop_at_an_evaluation_step_evaluates_first(tmp_path, monkeypatch):
    common = [
        *FAST,
        "--batch-size",
        "4",
        "--steps",
        "6",
        "--zeroshot-every",
        "2",
        "--logs-dir",
        str(tmp_path),
        "--name",
        "e",
    ]
    stop_at(monkeypatch, 4)
    with pytest.raises(SystemExit):
        train.main(common)
    monkeypatch.undo()
    train.main([*common, "--resume", "latest"])
    assert [e["step"] for e in metrics(tmp_path / "e") if "zeroshot/shape/top1" in e] == [2, 4, 6]


def test_a_run_directory_belongs_to_one_run(tmp_path, capsys):
    common = [*FAST, "--batch-size", "4", "--save-every", "2", "--logs-dir", str(tmp_path), "--name", "reuse"]
    train.main([*common, "--steps", "4"])
    before = {p: os.path.getmtime(p) for p in cloob.checkpoints(str(tmp_path / "reuse"))}
    err = train_error(capsys, *common, "--steps", "6", "--seed", "1")
    assert "has checkpoints: continue with --resume latest or pick another --name" in err
    assert {p: os.path.getmtime(p) for p in cloob.checkpoints(str(tmp_path / "reuse"))} == before
    (tmp_path / "reuse" / "checkpoints" / "step_0000006.pt.tmp").write_bytes(b"half a checkpoint")
    train.main([*common, "--steps", "6", "--resume", "latest"])  # a deliberate change (more steps) is fine
    assert not glob.glob(str(tmp_path / "reuse" / "checkpoints" / "*.tmp"))  # the killed save's leftover is gone


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """-> the flags of a finished 2-step run, to resume."""
    logs = str(tmp_path_factory.mktemp("short"))
    argv = [*FAST, "--batch-size", "4", "--logs-dir", logs, "--name", "r", "--steps", "2"]
    train.main(argv)
    return argv


@pytest.mark.parametrize("change,message", [
    (["--model", "tiny-rn"], "image_resolution 32 -> 64"),
    (["--batch-size", "8"], "global_batch 4 -> 8"),
    (["--method", "clip"], "method 'cloob' -> 'clip'"),
    (["--seed", "3"], "seed 0 -> 3"),
])
def test_resume_refuses_a_different_run(change, message, short_run, capsys):
    err = train_error(capsys, *short_run, "--steps", "4", "--resume", "latest", *change)
    assert message in err and "differs from" in err


def test_resume_from_a_file_that_is_not_a_training_checkpoint(tmp_path, capsys):
    cloob.save_checkpoint(str(tmp_path / "weights.pt"), cloob.CLIP(cloob.CONFIGS["tiny-vit"]), "bytes", "cloob")
    err = train_error(
        capsys, *FAST, "--steps", "2", "--logs-dir", str(tmp_path), "--resume", str(tmp_path / "weights.pt")
    )
    assert "weights.pt is not a train.py checkpoint (start from its weights: --pretrained)" in err



def test_resume_applies_this_runs_optimizer_settings_and_says_so(tmp_path, capsys):
    """--wd, --beta2 and --eps given with --resume apply from there on, as config.json and the checkpoint record them
    (not AdamW's saved groups); a CLIP run's resume does not compare CLOOB's --hopfield-beta."""
    common = [*FAST, "--method", "clip", "--batch-size", "4", "--logs-dir", str(tmp_path), "--name", "r"]
    train.main([*common, "--steps", "2"])
    capsys.readouterr()
    train.main([*common, "--steps", "3", "--resume", "latest", "--wd", "0.2", "--beta2", "0.9", "--eps", "1e-7",
                "--hopfield-beta", "2"])
    assert "(step 2; wd 0.1 -> 0.2; beta2 0.98 -> 0.9; eps 1e-06 -> 1e-07)" in capsys.readouterr().out
    groups = final_weights(tmp_path / "r")["optimizer"]["param_groups"]
    assert [(g["weight_decay"], tuple(g["betas"]), g["eps"]) for g in groups] == [(0.2, (0.9, 0.9), 1e-7),
                                                                                 (0.0, (0.9, 0.9), 1e-7)]


def test_resume_restores_the_loss_scale_and_checks_the_tar_sample_stream(tmp_path, capsys, monkeypatch):
    real, calls = train.compute_loss, []

    def first_loss_nan(args, model, x, y):  # the first step overflows: the fp16 loss scale halves
        calls.append(1)
        return real(args, model, x, y) * (math.nan if len(calls) == 1 else 1.0)
    monkeypatch.setattr(train, "compute_loss", first_loss_nan)
    common = [*FAST, "--batch-size", "4", "--logs-dir", str(tmp_path), "--precision", "fp16"]
    train.main([*common, "--steps", "4", "--name", "straight"])
    calls.clear()
    train.main([*common, "--steps", "2", "--name", "resumed"])
    train.main([*common, "--steps", "4", "--name", "resumed", "--resume", "latest"])
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert straight["scaler"]["scale"] == resumed["scaler"]["scale"] == 2.0 ** 15
    assert same_weights(straight["state_dict"], resumed["state_dict"])
    monkeypatch.undo()
    common = [*FAST, "--batch-size", "4", "--logs-dir", str(tmp_path), "--name", "p"]
    train.main([*common, "--steps", "2"])
    train.main([*common, "--steps", "4", "--resume", "latest", "--precision", "fp16"])  # a new scale for fp16
    assert len(losses(tmp_path / "p")) == 4 and final_weights(tmp_path / "p")["scaler"]["scale"] == 2.0 ** 16
    pattern = write_shards(tmp_path / "shards", 2, 8)
    tar = [*FAST, "--train-data", pattern, "--train-num-samples", "16", "--tokenizer", "bytes", "--batch-size", "4",
           "--logs-dir", str(tmp_path), "--name", "t"]
    train.main([*tar, "--steps", "2"])
    train.main([*tar, "--steps", "3", "--resume", "latest", "--workers", "1"])  # 0 workers or 1: the same stream
    assert "loader_slots 1 -> 2" in train_error(capsys, *tar, "--steps", "4", "--workers", "2", "--resume", "latest")


def test_a_data_error_in_a_loader_worker_ends_the_run_promptly(tmp_path, capsys):
    """Its one line, and the worker ends at once (shut down inside gc.collect, it would wait 5 s)."""
    (tmp_path / "urls.csv").write_text(
        "filepath,title\n" + "".join(f"https://example.com/{i}.jpg,a cat\n" for i in range(8))
    )
    t0 = time.time()
    err = train_error(capsys, "--train-data", str(tmp_path / "urls.csv"), "--workers", "1", "--batch-size", "4",
                      "--tokenizer", "bytes", "--model", "tiny-vit", "--logs-dir", str(tmp_path))
    assert "image is a URL (download the images first" in err and time.time() - t0 < 4


# ---------------------------------------------------------------------------------------------------- zeroshot.py


def test_readme_example_gives_zeroshots_probabilities(clip_checkpoint, tmp_path, capsys):
    """The README's Python example, run as written (a checkpoint and an image of ours put in), prints the labels'
    probabilities that zeroshot.py --image computes for the same image and labels."""
    readme = open(os.path.join(HERE, "README.md")).read()
    snippet = re.search(r"```python\n(import torch\n.*?)```", readme, re.S).group(1)
    Image.new("RGB", (48, 40), (200, 30, 30)).save(tmp_path / "red.png")
    snippet = snippet.replace('"ViT-B-32.pt"', repr(clip_checkpoint))
    snippet = snippet.replace('"dog.jpg"', repr(str(tmp_path / "red.png")))
    capsys.readouterr()
    exec(snippet, {})
    printed = eval(capsys.readouterr().out)  # {label: probability}
    labels = ["a photo of a dog", "a photo of a cat", "a diagram"]
    r = zeroshot.main(["--model", clip_checkpoint, "--image", str(tmp_path / "red.png"), "--labels", ",".join(labels)])
    assert list(printed) == labels and printed == pytest.approx(r[str(tmp_path / "red.png")], abs=1e-3)  # rounded


def test_zeroshot_batched_classifier_equals_direct_computation(eval_folder, tmp_path):
    out = tmp_path / "r.json"
    zeroshot.main(["--model", str(eval_folder / "run"), "--data", str(eval_folder / "images"), "--templates", "single",
                   "--batch-size", "4", "--workers", "0", "--output", str(out)])
    result = json.loads(out.read_text())["images"]  # the task is named after the folder
    model, info = cloob.load_model(str(eval_folder / "run" / "checkpoints" / "step_0000005.pt"))
    tok = cloob.Tokenizer(info["tokenizer"], model.config.context_length)
    names, hits1, hits5 = ["diamond", "round disc", "square"], 0, 0
    with torch.no_grad():  # one text and one image at a time
        w = torch.stack([F.normalize(model.encode_text(tok([f"a photo of a {c}."]))[0], dim=-1) for c in names])
        for label, folder in enumerate(["diamond", "round_disc", "square"]):
            for f in sorted(os.listdir(eval_folder / "images" / folder)):
                if f.endswith(".png"):
                    image = data.preprocess(Image.open(eval_folder / "images" / folder / f), 16)
                    scores = F.normalize(model.encode_image(image[None])[0], dim=-1) @ w.T
                    hits1 += scores.argmax().item() == label
                    hits5 += label in scores.topk(3).indices.tolist()
    assert result["n"] == 21 and result["skipped"] == 1  # the corrupt file is counted, not fatal
    assert result["top1"] == pytest.approx(hits1 / 21) and result["top5"] == pytest.approx(hits5 / 21)



class OneHot(torch.nn.Module):
    """A stand-in model: an image's features are its pixels as given, a caption's the one-hot of its first token."""

    def encode_image(self, images):
        return images

    def encode_text(self, tokens):
        return F.one_hot(tokens[:, 0], 4).float()


def test_zeroshot_counts_as_topk_a_tie_or_nan_is_no_hit(eval_folder, tmp_path, capsys):
    """Two classes named alike score alike: top-1 credits one of them, as argmax would (50% here, not 100%); an image
    whose features are NaN is no hit. Class names given twice are a warning naming them."""
    words = ["crane", "heron"]

    def tokenizer(texts):
        return torch.tensor([[words.index(t)] for t in texts])
    tasks = {"birds": (["crane", "crane", "heron"], ("{}",))}
    images = F.one_hot(torch.zeros(20, dtype=torch.long), 4).float()  # all look like a crane
    labels = torch.arange(20) % 2  # half of them the first crane class, half the second
    r = zeroshot.evaluate(OneHot(), tokenizer, tasks, [(images, {"birds": labels}, collections.Counter())])
    assert (r["birds"]["top1"], r["birds"]["top5"]) == (0.5, 1.0)
    images[:10] = math.nan
    r = zeroshot.evaluate(OneHot(), tokenizer, tasks, [(images, {"birds": labels}, collections.Counter())])
    assert (r["birds"]["top1"], r["birds"]["top5"]) == (0.25, 0.5)
    (tmp_path / "names.txt").write_text("a b\nc\na b\n")
    zeroshot.class_task(data.ImageFolder(str(eval_folder / "images")), str(tmp_path / "names.txt"))
    assert capsys.readouterr().err == "warning: class names given twice: ['a b']\n"


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_long_zeroshot_passes_show_progress_short_ones_stay_silent(eval_folder, monkeypatch):
    """Once a pass has taken 2 s: a line at each tenth with the count, the rate and the time left; on a terminal one
    line rewritten in place (the last ends it), in a log file a line each."""
    assert list(zeroshot.progress(range(5), 5, "images")) == list(range(5))  # fast: nothing said (capsys would show)
    clock = iter(range(100))
    monkeypatch.setattr(zeroshot.time, "time", lambda: float(next(clock)))  # a second a call
    # batch i of 8 images ends at second i; silent for the first 2 s, then each tenth once
    lines = ["images 24/50: 8/s, 0.1 min left", *(f"images {n}/50: 8/s, 0.0 min left" for n in (32, 40, 48)),
             "images 50/50: 7/s, 0.0 min left"]
    for stderr, end in ((io.StringIO(), "\n"), (Terminal(), "\r")):
        monkeypatch.setattr(zeroshot.sys, "stderr", stderr)
        assert list(zeroshot.progress(range(7), 50, "images", step=8)) == list(range(7))  # 7 batches of 8 images
        assert stderr.getvalue() == end.join(lines) + "\n"
    zeroshot.classifier(OneHot(), lambda texts: torch.zeros(len(texts), 1, dtype=torch.long), ["a"] * 10, ("{}",))
    list(zeroshot.loader(data.ImageFolder(str(eval_folder / "images")), 16, batch_size=4, workers=0))  # 22 files
    assert "\rclasses 10/10: " in stderr.getvalue() and "\rimages 20/22: " in stderr.getvalue()
    assert stderr.getvalue().endswith(" min left\n")


def test_config_of_a_vit_whose_patches_do_not_tile_the_image_is_refused():
    assert "vision_patch_size 8 does not divide 30" in one_line_error(
        dataclasses.replace, MICRO, image_resolution=30)


def test_top5_counts_the_fifth_class(eval_folder):
    """evaluate's top-1 and top-5 against ranks by hand, with 7 classes (top-5 is not all of them)."""
    model, _ = cloob.load_model(str(eval_folder / "run"))
    tok, names = cloob.Tokenizer("bytes", 24), [f"class {i}" for i in range(7)]
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(60, 3, 16, 16, generator=g), torch.randint(0, 7, (60,), generator=g)
    batches = [(images[i:i + 16], {"t": labels[i:i + 16]}, collections.Counter()) for i in range(0, 60, 16)]
    r = zeroshot.evaluate(model, tok, {"t": (names, ("{}",))}, batches)["t"]
    with torch.no_grad():
        scores = F.normalize(model.encode_image(images), dim=-1) @ F.normalize(model.encode_text(tok(names)), dim=-1).T
    rank = (scores > scores.gather(1, labels[:, None])).sum(1)  # classes scoring above the true one
    assert (rank == 4).any() and (rank >= 5).any()
    assert r["top1"] == pytest.approx((rank < 1).double().mean().item()) and r["n"] == 60
    assert r["top5"] == pytest.approx((rank < 5).double().mean().item())


def test_zeroshot_clip_tokenizer_checkpoint_through_the_cli(eval_folder, clip_checkpoint, tmp_path):
    (tmp_path / "names.txt").write_text("an x\na circle\na box\n")
    out = tmp_path / "r.json"
    result = subprocess.run([sys.executable, os.path.join(HERE, "zeroshot.py"), "--model", clip_checkpoint,
                             "--data", str(eval_folder / "images"), "--classnames", str(tmp_path / "names.txt"),
                             "--workers", "0", "--output", str(out)], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, HOME=str(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert "cloob checkpoint, clip, clip tokenizer" in result.stderr
    assert "images: top-1" in result.stdout
    r = json.loads(out.read_text())["images"]
    assert r["n"] == 21 and 0 <= r["top1"] <= r["top5"] <= 1


def test_zeroshot_single_images(eval_folder, capsys):
    paths = [str(eval_folder / "images" / "diamond" / sorted(os.listdir(eval_folder / "images" / "diamond"))[0]),
             str(eval_folder / "images" / "square" / sorted(os.listdir(eval_folder / "images" / "square"))[0])]
    results = zeroshot.main(
        ["--model", str(eval_folder / "run"), "--image", *paths, "--labels", "a diamond, a square,a disc"]
    )
    model, _ = cloob.load_model(str(eval_folder / "run" / "checkpoints" / "step_0000005.pt"))
    tok = cloob.Tokenizer("bytes", 24)
    with torch.no_grad():
        y = F.normalize(model.encode_text(tok(["a diamond", "a square", "a disc"])), dim=-1)
        for path in paths:
            x = F.normalize(model.encode_image(data.preprocess(Image.open(path), 16)[None]), dim=-1)
            expected = dict(zip(["a diamond", "a square", "a disc"], (30.0 * x @ y.T).softmax(-1)[0].tolist()))
            assert results[path] == pytest.approx(expected, rel=1e-5, abs=1e-7)
            assert list(results[path]) == sorted(expected, key=expected.get, reverse=True)  # best first
    assert capsys.readouterr().out.count("%") == 6


def test_retrieval_recall_with_one_caption_per_image():
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(50, 8, generator=g), dim=-1)
    y = F.normalize(x + 0.8 * torch.randn(50, 8, generator=g), dim=-1)
    r = zeroshot.retrieval_recall(x, y, torch.arange(50), chunk=7)  # one caption per image
    assert (r["images"], r["captions"]) == (50, 50)
    for direction, (q, k) in (("image_to_text", (x, y)), ("text_to_image", (y, x))):
        position = (torch.argsort(q @ k.T, dim=-1, descending=True) == torch.arange(50)[:, None]).float().argmax(-1)
        for n in (1, 5, 10):
            assert r[f"{direction}_R@{n}"] == pytest.approx((position < n).float().mean().item())
    assert 0 < r["image_to_text_R@1"] < r["image_to_text_R@10"] < 1


def test_retrieval_with_several_captions_per_image_follows_the_standard_protocol():
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    ids = torch.arange(6).repeat_interleave(5)  # 5 captions per image, as COCO
    r = zeroshot.retrieval_recall(images, images[ids], ids, chunk=4)  # a perfect model
    assert (r["images"], r["captions"]) == (6, 30) and r["image_to_text_R@1"] == r["text_to_image_R@1"] == 1.0
    texts = F.normalize(images[ids] + 0.9 * torch.randn(30, 8, generator=g), dim=-1)
    r = zeroshot.retrieval_recall(images, texts, ids)
    scores = images @ texts.T  # [6, 30]: by hand
    i2t = [scores[i].argmax().item() in range(5 * i, 5 * i + 5) for i in range(6)]
    t2i = [(texts[j] @ images.T).argmax().item() == j // 5 for j in range(30)]
    assert r["image_to_text_R@1"] == pytest.approx(np.mean(i2t)) and r["text_to_image_R@1"] == pytest.approx(
        np.mean(t2i)
    )



def test_zeroshot_retrieval_reads_each_image_once(eval_folder, monkeypatch, capsys):
    """pairs.csv: 15 image files, two captions each, paths spelled three ways, one of them corrupt, plus a missing
    image and an empty caption. Each image is read once; recall is that of the features computed by hand."""
    real, reads = data.preprocess, []

    def counted(image, resolution):
        reads.append(image.size)
        return real(image, resolution)
    monkeypatch.setattr(data, "preprocess", counted)
    r = zeroshot.main(["--model", str(eval_folder / "run"), "--retrieval", str(eval_folder / "pairs.csv"),
                       "--workers", "0", "--batch-size", "4"])
    assert len(reads) == r["images"] == 14 and r["captions"] == 28
    assert r["skipped"] == {"corrupt image": 1, "missing image": 1, "no caption": 1}
    assert "14 images, 28 captions: image_to_text_R@1" in capsys.readouterr().out
    monkeypatch.undo()
    model, _ = cloob.load_model(str(eval_folder / "run"))
    rows = [(os.path.realpath(p), c) for p, c, _ in data.CsvCaptions(str(eval_folder / "pairs.csv"))
            if c and os.path.isfile(p) and not p.endswith("broken.jpg")]
    files = sorted({f for f, _ in rows})
    with torch.no_grad():
        x = model.encode_image(torch.stack([data.preprocess(Image.open(f), 16) for f in files]))
        y = model.encode_text(cloob.Tokenizer("bytes", 24)([c for _, c in rows]))
    expected = zeroshot.retrieval_recall(F.normalize(x, dim=-1), F.normalize(y, dim=-1),
                                         torch.tensor([files.index(f) for f, _ in rows]))
    assert {k: v for k, v in r.items() if k != "skipped"} == pytest.approx(expected)


def test_zeroshot_classifier_is_clips_prompt_ensemble_one_class_at_a_time(eval_folder):
    """Each class: its 7 prompts encoded, each normalised, averaged, renormalised (OpenAI's notebook), by hand."""
    model, _ = cloob.load_model(str(eval_folder / "run"))
    tokenizer, names, seen = cloob.Tokenizer("bytes", model.config.context_length), [f"class {i}" for i in range(9)], []
    templates = zeroshot.TEMPLATES["ensemble"]
    encode = model.encode_text
    model.encode_text = lambda tokens: seen.append(len(tokens)) or encode(tokens)
    w = zeroshot.classifier(model, tokenizer, names, templates)
    with torch.no_grad():
        expected = [F.normalize(F.normalize(encode(tokenizer([t.format(c) for t in templates])), dim=-1).mean(0), dim=0)
                    for c in names]
    assert seen == [7] * 9 and w.shape == (model.config.embed_dim, 9)
    assert torch.allclose(w, torch.stack(expected, dim=1), atol=1e-6)


def test_zeroshot_folders_labels_and_templates(eval_folder, tmp_path, capsys, monkeypatch):
    classifier, candidates = zeroshot.classifier, []
    monkeypatch.setattr(zeroshot, "classifier", lambda *a: candidates.append(a[2:4]) or classifier(*a))
    nested = tmp_path / "nested"
    for c in ("diamond", "square"):
        for i, f in enumerate(sorted(os.listdir(eval_folder / "images" / c))):
            os.makedirs(nested / c / f"part{i % 2}", exist_ok=True)
            os.symlink(eval_folder / "images" / c / f, nested / c / f"part{i % 2}" / f)
    os.makedirs(nested / "empty_class")
    (tmp_path / "t.txt").write_text("a {} with {curly} braces\n")
    r = zeroshot.main(["--model", str(eval_folder / "run"), "--data", str(nested), "--workers", "0", "--templates",
                       str(tmp_path / "t.txt")])
    assert "nested: top-1" in capsys.readouterr().out  # the task is named after the folder
    r = r["nested"]
    assert r["n"] == 14 and r["skipped"] == 1  # images at any depth
    # a class folder without images stays a candidate; the template file's other braces are text
    assert candidates == [(["diamond", "empty class", "square"], ["a {} with {curly} braces"])]
    with pytest.raises(SystemExit):
        zeroshot.main(["--model", str(eval_folder / "run"), "--image", "x.png", "--labels", ",, ,"])
    assert "zeroshot.py: error: --labels ',, ,' names no label" in capsys.readouterr().err


def test_gelu_flag_reads_a_bare_state_dict_as_gelu(tmp_path):
    torch.manual_seed(0)
    config = dataclasses.replace(MICRO, vocab_size=49408, context_length=77, transformer_width=64, quick_gelu=False)
    torch.save(cloob.CLIP(config).state_dict(), tmp_path / "bare.pt")
    Image.new("RGB", (20, 20), (200, 30, 30)).save(tmp_path / "red.png")
    argv = ["--model", str(tmp_path / "bare.pt"), "--image", str(tmp_path / "red.png"), "--labels", "red,blue"]
    with pytest.warns(UserWarning, match="records no architecture"):
        quick = zeroshot.main(argv)[str(tmp_path / "red.png")]
    gelu = zeroshot.main([*argv, "--gelu"])[str(tmp_path / "red.png")]
    model, _ = cloob.load_model(str(tmp_path / "bare.pt"), quick_gelu=False)
    tokens, image = cloob.Tokenizer("clip")(["red", "blue"]), data.preprocess(Image.open(tmp_path / "red.png"), 16)
    with torch.no_grad():
        x, y = model(image[None], tokens)
        expected = (model.logit_scale.exp() * x @ y.T).softmax(-1)[0].tolist()
    assert [gelu["red"], gelu["blue"]] == pytest.approx(expected, rel=1e-5) and quick != pytest.approx(gelu, rel=1e-5)



@pytest.fixture(scope="module")
def huge_png(tmp_path_factory):
    """A PNG whose header says 20000 x 20000 pixels (4e8, over twice Pillow's limit), with no pixel data."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)  # 8-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--data", "{empty}"], "no images in class sub-folders"),
        (["--data", "{images}", "--classnames", "{names}"], ": 2 class names for 3 class folders"),
        (["--data", "nowhere"], "image folder not found: nowhere"),
        (["--image", "nowhere.jpg", "--labels", "a,b"], "nowhere.jpg: missing image"),
        (["--image", "{images}/square/broken.jpg", "--labels", "a,b"], "broken.jpg: corrupt image"),
        (["--image", "{images}/square", "--labels", "a,b"], "square: a directory, not an image"),
        (["--image", "{huge}", "--labels", "a,b"], "huge.png: image too large (over Pillow's decompression-bomb limit"),
        (
            ["--image", "{images}/square/broken.jpg", "--labels", "a cat,a dog,a cat"],
            "--labels: ['a cat'] repeated",
        ),
        (["--data", "{images}", "--output", "{empty}"], "Is a directory"),
        (["--data", "{images}", "--output", "{empty}/no/r.json"], "No such file or directory"),
        (["--data", "{images}", "--templates", "{names}"], "every template needs a {} for the name"),
        (["--model", "{names}", "--data", "{images}"], "cannot be read"),
        (
            ["--model", "{empty}", "--data", "{images}"],
            "a folder without an OpenCLIP or Hugging Face model or train.py checkpoints",
        ),
        (["--model", "missing.pt", "--data", "{images}"], "checkpoint not found: missing.pt"),
        (["--model", "{fork}", "--data", "{images}"], "fork.pt: its config has fields this model lacks: ['siglip_b"),
    ],
)
def test_zeroshot_bad_input_is_a_one_line_error(argv, message, eval_folder, huge_png, tmp_path, monkeypatch, capsys):
    os.makedirs(tmp_path / "empty" / "some_class")
    (tmp_path / "names.txt").write_text("a\nb\n")
    fork = torch.load(eval_folder / "run" / "checkpoints" / "step_0000005.pt", weights_only=True)
    fork["config"]["siglip_bias"] = -10.0  # a modified model's checkpoint
    torch.save(fork, tmp_path / "fork.pt")
    paths = dict(empty=tmp_path / "empty", images=eval_folder / "images", names=tmp_path / "names.txt", huge=huge_png,
                 fork=tmp_path / "fork.pt")
    argv = [a.format(**paths) for a in (argv if argv[0] == "--model" else ["--model", str(eval_folder / "run"), *argv])]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        zeroshot.main([*argv, "--workers", "0"])
    err = capsys.readouterr().err.splitlines()
    errors = [line for line in err if not line.endswith("px")]  # minus the model line
    assert (
        e.value.code == 1 and len(errors) == 1 and errors[0].startswith("zeroshot.py: error: ") and message in errors[0]
    )
    assert len(err) == 1 or "--output" not in argv  # a bad --output is found before the model is loaded


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--steps", "-3"], ["--save-every", "0"], ["--log-every", "0"],
                                  ["--batch-size", "0"], ["--workers", "-1"], ["--lr", "0"], ["--beta2", "1"],
                                  ["--warmup", "x"], ["--accum-steps", "3", "--batch-size", "8"], ["--seed", "-1"],
                                  ["--csv-separator", ";;"]])
def test_numeric_flags_are_checked_when_parsed(argv, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and ("error: argument" in err or "must divide --batch-size" in err), err


@pytest.mark.parametrize("flag,message", [(["--batch-size", "0"], "--batch-size must be >= 1 and --workers >= 0"),
                                          (["--workers", "-1"], "--batch-size must be >= 1 and --workers >= 0"),
                                          (["--csv-separator", "\\t;"], "argument --csv-separator: invalid")])
def test_zeroshot_numeric_flags_are_checked_when_parsed(flag, message, capsys):
    with pytest.raises(SystemExit) as e:
        zeroshot.parse_args(["--model", "m.pt", "--data", "d", *flag])
    assert e.value.code == 2 and message in capsys.readouterr().err



@pytest.mark.parametrize("argv,message", [
    (["--train-data", "data.parquet"], "expected synthetic, a .csv/.tsv file or .tar/.tar.gz shards"),
    (["--train-data", "x.tar"], "--train-num-samples is for tar shards, and they need it"),
    (["--train-data", "x.csv", "--train-num-samples", "100"], "--train-num-samples is for tar shards"),
    (["--method", "simclr"], "invalid choice: 'simclr'"),
    (["--resume", "latest"], "--resume latest needs --name (a run without one is named after its start time)"),
])
def test_bad_flags_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--train-data", "nope.csv"], "data file not found: nope.csv"),
    (["--train-data", "x/{00000..00003}.tar", "--train-num-samples", "10"], "shard not found"),
    (["--train-data", "x/{000..010..2}.tar", "--train-num-samples", "10"], "a brace range with a step"),
    (["--resume", "missing.pt"], "checkpoint not found: missing.pt"),
    (["--pretrained", "missing.pt"], "checkpoint not found: missing.pt"),
])
def test_bad_paths_are_one_line_errors(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert message in train_error(capsys, *argv, "--logs-dir", str(tmp_path))


def test_data_and_run_directory_problems_are_one_line_errors(tmp_path, capsys):
    pattern = write_shards(tmp_path / "shards", 2, 3)
    tar = [*FAST, "--train-data", pattern, "--tokenizer", "bytes", "--logs-dir", str(tmp_path)]
    assert "4 samples are fewer than one global batch of 6" in train_error(capsys, *tar, "--train-num-samples", "4",
                                                                           "--batch-size", "6", "--name", "a")
    assert "2 shards for 1 ranks x 4 workers each" in train_error(capsys, *tar, "--train-num-samples", "6",
                                                                     "--workers", "4", "--name", "b")
    (tmp_path / "file").write_text("")
    assert "Not a directory" in train_error(
        capsys, *FAST, "--steps", "1", "--logs-dir", str(tmp_path / "file")
    )


