"""Tests: CPU, offline, seconds. Reference outputs made by the peers' own code (OpenAI's CLIP, the official CLOOB loss,
OpenCLIP, Hugging Face transformers) are read from reference/, which holds the script that remade them."""
import collections
import contextlib
import dataclasses
import gc
import glob
import io
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

import cloob

REF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference")
# a few-thousand-parameter ViT for tests that only need some model
MICRO = cloob.ModelConfig(embed_dim=16, image_resolution=16, vision_layers=1, vision_width=64, vision_patch_size=8,
                          context_length=8, vocab_size=32, transformer_width=32, transformer_heads=2,
                          transformer_layers=1)


def ref(name):
    return os.path.join(REF, name)


def load_ref(name):
    return torch.load(ref(name), weights_only=True)


def outputs(model, image, text):
    with torch.no_grad():
        x, y = model(image, text)
        return model.encode_image(image), model.encode_text(text), model.logit_scale.exp() * x @ y.T


def micro_batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, MICRO.vocab_size - 1, (n, MICRO.context_length), generator=g)
    tokens[torch.arange(n), torch.randint(1, MICRO.context_length, (n,), generator=g)] = MICRO.vocab_size - 1
    return torch.randn(n, 3, 16, 16, generator=g), tokens


# ---------------------------------------------------------------------------------------------------- model

@pytest.mark.parametrize("name", ["tiny_vit", "tiny_rn"])
def test_matches_openai_outputs(name, tmp_path):
    d = load_ref(f"{name}.pt")
    # saved as OpenCLIP does: under "state_dict", with DDP's "module." prefix
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in d["state_dict"].items()}}, tmp_path / "oc.pt")
    model, info = cloob.load_model(str(tmp_path / "oc.pt"), quick_gelu=True, **d["args"])
    assert info["format"] == "openai-state-dict" and not model.training
    image_features, text_features, logits = outputs(model, d["image"], d["text"])
    assert (image_features - d["image_features"]).abs().max() <= 1e-4
    assert (text_features - d["text_features"]).abs().max() <= 1e-4
    assert (logits - d["logits_per_image"]).abs().max() <= 1e-4
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


@pytest.mark.parametrize("name", ["RN50", "ViT-B-32"])
def test_keys_and_shapes_match_openai(name):
    expected = {}
    for line in open(ref(f"{name}.state_dict.txt")):
        key, rest = line.split(" ", 1)
        shape, dtype = rest.rsplit(" ", 1)
        expected[key] = (tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype.strip())
    ours = {
        k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in cloob.CLIP(cloob.CONFIGS[name]).state_dict().items()
    }
    assert ours == expected


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
        torch.manual_seed(1)  # the same batch-norm / dropout-free randomness either way
        cloob.cloob_loss(*model(images, tokens), 30.0, 8.0).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 10
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_new_model_initialisation():
    model = cloob.CLIP(cloob.CONFIGS["tiny-rn"])
    assert all(torch.all(b.bn3.weight == 0) for layer in (model.visual.layer1, model.visual.layer4) for b in layer)
    assert model.logit_scale.item() == pytest.approx(torch.tensor(1 / 0.07).log().item())
    model.set_temperature(30.0, learnable=False)
    assert model.logit_scale.exp().item() == pytest.approx(30.0) and not model.logit_scale.requires_grad

# ---------------------------------------------------------------------------------------------------- tokenizer


def test_clip_tokenizer_matches_openai():
    tok = cloob.Tokenizer("clip", context_length=16)
    cases = [json.loads(line) for line in open(ref("tokenizer_cases.jsonl"))]
    assert len(cases) > 30
    for case in cases:
        assert tok.encode(case["text"]) == case["ids"], case["text"]
    assert tok([c["text"] for c in cases]).tolist() == [c["tokens_ctx16"] for c in cases]
    assert (tok.sot, tok.eot, tok.vocab_size) == (49406, 49407, 49408)


def test_clip_tokenizer_cleans_text_like_ftfy():
    tok = cloob.Tokenizer("clip")
    cases = {json.loads(line)["text"]: json.loads(line)["ids"] for line in open(ref("tokenizer_cases.jsonl"))}
    # OpenAI runs ftfy.fix_text first, which straightens quotes and narrows full-width letters
    assert tok.encode("It\u2019s a dog\u2019s life, isn\u2019t it?") == cases["It's a dog's life, isn't it?"]
    assert tok.encode("\uff41 photo of a dog.") == cases["a photo of a dog."]


def test_bytes_tokenizer_truncates_keeping_end_token():
    tok = cloob.Tokenizer("bytes", context_length=8)
    out = tok(["ab", "abcdefghijk", "é"])
    assert out.shape == (3, 8) and out.dtype == torch.long
    assert out[0].tolist() == [256, 97, 98, 257, 0, 0, 0, 0]
    assert out[1].tolist() == [256, 97, 98, 99, 100, 101, 102, 257]
    assert out[2].tolist()[:4] == [256, 0xC3, 0xA9, 257]
    assert tok.vocab_size == 258


def test_clip_tokenizer_needs_no_download_and_names_a_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no cache anywhere: the merges file ships beside cloob.py
    assert cloob.Tokenizer("clip").encode("a diagram") == [320, 22697]
    with pytest.raises(FileNotFoundError, match="BPE merges file not found: .*nope.txt.gz"):
        cloob.Tokenizer("clip", bpe_path=str(tmp_path / "nope.txt.gz"))
    assert "tokenizer 'cl100k_base': expected clip or bytes" in one_line_error(cloob.Tokenizer, "cl100k_base")

# ---------------------------------------------------------------------------------------------------- losses


def rel_err(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


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
    with pytest.raises(ValueError, match="at least 2"):
        loss_fn(x, x, *args)


def _distributed_setup(method):
    """-> (model, images, tokens, loss function) of a micro CLIP; "sync-bn": a ResNet with cloob.SyncBatchNorm, in
    float64 (rounding out of the way) and with its last BatchNorm gains drawn (OpenAI's zero init would hide the
    blocks)."""
    torch.manual_seed(0)
    images, tokens = micro_batch(8)
    if method == "sync-bn":
        model = cloob.CLIP(dataclasses.replace(MICRO, vision_layers=(1, 1, 1, 1), vision_width=16, image_resolution=32))
        model.double()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.__class__ = cloob.SyncBatchNorm
                torch.nn.init.normal_(m.weight)
        images = F.interpolate(images, size=32).double()
    else:
        model = cloob.CLIP(MICRO)
    if method != "clip":  # fixed inv_tau, as in training (DDP would wait for an unused parameter's gradient)
        model.set_temperature(30.0, learnable=False)
    loss_fn = (lambda x, y: cloob.clip_loss(x, y, model.logit_scale.exp())) if method == "clip" else \
        (lambda x, y: cloob.cloob_loss(x, y, 30.0, 8.0))
    return model, images, tokens, loss_fn


def _distributed_worker(rank, world, tmp, method):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank, world_size=world)
    model, images, tokens, loss_fn = _distributed_setup(method)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    n = 8 // world
    loss = loss_fn(*ddp(images[rank * n:(rank + 1) * n], tokens[rank * n:(rank + 1) * n]))
    loss.backward()
    mean_loss = loss.detach().clone()  # each rank's loss is the mean over its own rows
    dist.all_reduce(mean_loss)
    if rank == 0:
        torch.save((mean_loss.item() / world, {k: p.grad for k, p in model.named_parameters()}), f"{tmp}/out.pt")
    dist.barrier()
    del ddp  # DDP's reducer lives in reference cycles: freed after its process group, gloo aborts the process
    gc.collect()
    dist.destroy_process_group()


@pytest.mark.parametrize("method", ["clip", "cloob", "sync-bn"])
def test_distributed_loss_equals_full_batch(method, tmp_path):
    model, images, tokens, loss_fn = _distributed_setup(method)
    loss = loss_fn(*model(images, tokens))
    loss.backward()
    mp.spawn(_distributed_worker, args=(2, str(tmp_path), method), nprocs=2)
    dist_loss, dist_grads = torch.load(tmp_path / "out.pt", weights_only=True)
    assert dist_loss == pytest.approx(loss.item(), rel=1e-5 if method != "sync-bn" else 1e-12)
    for name, p in model.named_parameters():
        if p.grad is not None and name != "visual.attnpool.k_proj.bias":  # softmax ignores a key bias: 0, or noise
            atol, rtol = (1e-6, 1e-4) if method != "sync-bn" else (1e-12, 1e-8)
            assert torch.allclose(dist_grads[name], p.grad, atol=atol, rtol=rtol), name

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


def test_unwrap_removes_compile_and_ddp_prefixes():
    model = cloob.CLIP(MICRO)

    class Wrapper(torch.nn.Module):  # stands in for DDP (.module) and torch.compile (._orig_mod)
        def __init__(self, module):
            super().__init__()
            self.module = module
    assert cloob.unwrap(Wrapper(Wrapper(model))) is model


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
    assert (image_features - d["image_features"]).abs().max() <= 1e-4
    assert (text_features - d["text_features"]).abs().max() <= 1e-4


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        cloob.load_model(str(tmp_path / "missing.pt"))
    (tmp_path / "random.pt").write_bytes(os.urandom(1000))
    with pytest.raises(ValueError, match="cannot be read") as e:
        cloob.load_model(str(tmp_path / "random.pt"))
    assert "\n" not in str(e.value)
    torch.save({"foo": 1, "bar": [2]}, tmp_path / "dict.pt")
    with pytest.raises(ValueError, match="no state_dict found; top-level keys: \\['bar', 'foo'\\]"):
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


def one_line_error(fn, *args, **kwargs):
    with pytest.raises(ValueError) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


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


def test_encode_text_takes_tokens_shorter_than_the_context():
    torch.manual_seed(0)
    model = cloob.CLIP(MICRO).eval()
    tokens = torch.tensor([[30, 5, 6, 31, 0, 0, 0, 0], [30, 5, 6, 7, 31, 0, 0, 0]])  # start 30, end 31, padding
    with torch.no_grad():
        assert torch.allclose(model.encode_text(tokens[:, :5]), model.encode_text(tokens), atol=1e-6)

# ---------------------------------------------------------------------------------------------------- data + README


def test_preprocess_resizes_shorter_side_and_centre_crops():
    import data
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)  # h=20, w=40: already the right short side
    out = data.preprocess(Image.fromarray(pixels), 20)
    assert out.shape == (3, 20, 20) and out.dtype == torch.float32
    expected = (pixels[:, 10:30].astype(np.float32) / 255 - data.MEAN) / data.STD
    assert np.allclose(out.numpy(), expected.transpose(2, 0, 1), atol=1e-6)
    grey = Image.new("L", (90, 45), 128)  # grey, non-square, needs resizing: every pixel is 128/255 normalised
    out = data.preprocess(grey, 32)
    assert out.shape == (3, 32, 32)
    assert np.allclose(out.numpy(), ((128 / 255 - data.MEAN) / data.STD)[:, None, None], atol=1e-6)


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory):
    """A micro model with CLIP's vocabulary and context, saved as train.py does."""
    torch.manual_seed(0)
    model = cloob.CLIP(dataclasses.replace(MICRO, vocab_size=49408, context_length=77))
    path = str(tmp_path_factory.mktemp("clip") / "micro.pt")
    cloob.save_checkpoint(path, model, "clip", "clip")
    return path


def test_readme_example_classifies(clip_checkpoint, tmp_path):
    import data
    model, info = cloob.load_model(clip_checkpoint)
    tokenizer = cloob.Tokenizer(info["tokenizer"], model.config.context_length)
    Image.new("RGB", (48, 40), (200, 30, 30)).save(tmp_path / "red.png")
    image = data.preprocess(Image.open(tmp_path / "red.png"), model.config.image_resolution)[None]
    labels = ["a photo of a dog", "a photo of a cat", "a diagram"]
    with torch.no_grad():
        image_features, text_features = model(image, tokenizer(labels))
        probs = (model.logit_scale.exp() * image_features @ text_features.T).softmax(dim=-1)
    assert probs.shape == (1, 3) and abs(probs.sum().item() - 1) < 1e-5

# ---------------------------------------------------------------------------------------------------- data + training
import subprocess  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import time  # noqa: E402

import data  # noqa: E402
import train  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FAST = ["--model", "tiny-vit", "--workers", "0", "--log-every", "1", "--warmup", "2", "--lr", "1e-3"]


def metrics(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def losses(run_dir):
    return [e["loss"] for e in metrics(run_dir) if "loss" in e]


def write_images(folder, n, resolution=32, seed=0):
    """n synthetic images saved as PNG files; -> [(file name, caption, labels)]."""
    os.makedirs(folder, exist_ok=True)
    pixels, captions, labels = data.Synthetic(n, resolution, seed=seed).render(range(n))
    for i in range(n):
        png(pixels[i]).save(os.path.join(folder, f"{i:04d}.png"))
    return [(f"{i:04d}.png", captions[i], {k: v[i] for k, v in labels.items()}) for i in range(n)]


def png(pixels):
    return Image.fromarray(pixels.round().astype(np.uint8))


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


def test_global_batches_do_not_depend_on_world_size():
    one = iter(data.GlobalBatches(40, 8, seed=1))
    two = [iter(data.GlobalBatches(40, 4, rank=r, world=2, seed=1)) for r in range(2)]
    for _ in range(12):  # crosses epoch boundaries (5 steps per epoch)
        assert next(one) == next(two[0]) + next(two[1])
    resumed = iter(data.GlobalBatches(40, 8, seed=1, start=7))
    fresh = iter(data.GlobalBatches(40, 8, seed=1))
    assert next(resumed) == [next(fresh) for _ in range(8)][-1]


def test_lr_schedule():
    args = train.parse_args(["--lr", "1.0", "--warmup", "10", "--steps", "110", "--restart-cycles", "1"])
    assert train.get_lr(0, args, 110) == pytest.approx(0.1) and train.get_lr(9, args, 110) == pytest.approx(1.0)
    assert train.get_lr(60, args, 110) == pytest.approx(0.5) and train.get_lr(109, args, 110) < 1e-3
    args.restart_cycles = 2
    assert train.get_lr(59, args, 110) < 0.01 and train.get_lr(60, args, 110) == pytest.approx(1.0)


def test_torchrun_two_ranks_reproduce_one_process(tmp_path):
    common = [*FAST, "--steps", "4", "--logs-dir", str(tmp_path), "--seed", "1"]
    train.main([*common, "--batch-size", "8", "--name", "one"])
    for name, extra in (("two", []), ("two-cached", ["--accum-steps", "2"])):  # DDP; gradient caching, 2 x 2 per rank
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(HERE, "train.py"), *common, "--batch-size", "4", "--name", name, *extra],
                       check=True, capture_output=True, cwd=HERE, timeout=120)
        assert losses(tmp_path / name) == pytest.approx(losses(tmp_path / "one"), rel=1e-4, abs=1e-5)
    assert len(losses(tmp_path / "one")) == 4


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    common = [sys.executable, os.path.join(HERE, "train.py"), *FAST, "--batch-size", "4", "--steps", "40",
              "--save-every", "3", "--logs-dir", str(tmp_path), "--log-every", "10"]
    subprocess.run([*common, "--name", "straight"], check=True, capture_output=True, timeout=120)
    run = subprocess.Popen([*common, "--name", "killed"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not cloob.checkpoints(str(tmp_path / "killed")) and time.time() < deadline:
        time.sleep(0.02)
    run.kill()
    run.wait()
    assert os.path.basename(cloob.checkpoints(str(tmp_path / "killed"))[-1]) < "step_0000040.pt"  # killed mid-run
    subprocess.run([*common, "--name", "killed", "--resume", "latest"], check=True, capture_output=True, timeout=120)
    a = torch.load(cloob.checkpoints(str(tmp_path / "straight"))[-1], weights_only=True)
    b = torch.load(cloob.checkpoints(str(tmp_path / "killed"))[-1], weights_only=True)
    assert a["step"] == b["step"] == 40
    for k in a["state_dict"]:
        assert torch.allclose(a["state_dict"][k], b["state_dict"][k], atol=1e-6), k
    assert [e["step"] for e in metrics(tmp_path / "killed") if "loss" in e][-1] == 40


def test_csv_with_missing_and_corrupt_images_trains_and_reports(tmp_path, capsys):
    rows = write_images(tmp_path / "img", 16)
    (tmp_path / "img" / "0001.png").unlink()  # missing
    (tmp_path / "img" / "0002.png").write_bytes(b"not a png")  # corrupt
    lines = ["filepath\ttitle"] + [f"img/{f}\t{'' if i == 3 else cap}" for i, (f, cap, _) in enumerate(rows)]
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
    train.main([*FAST, "--train-data", str(tmp_path / "train.tsv"), "--tokenizer", "bytes", "--batch-size", "8",
                "--steps", "4", "--logs-dir", str(tmp_path), "--name", "csv"])
    out = capsys.readouterr().out
    assert "missing image" in out and "corrupt image" in out and "empty caption" in out
    events = metrics(tmp_path / "csv")
    assert events[-1]["skipped"] >= 3 and np.isfinite(events[-1]["loss"]) and 0 <= events[-1]["data_wait"] <= 1


def write_shards(folder, n_shards, per_shard):
    os.makedirs(folder, exist_ok=True)
    pixels, captions, _ = data.Synthetic(n_shards * per_shard, 32).render(range(n_shards * per_shard))
    for s in range(n_shards):
        with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tar:
            for i in range(s * per_shard, (s + 1) * per_shard):
                caption = f"{captions[i]} #{i}"  # unique, to check that no sample is read twice
                buf = io.BytesIO()
                png(pixels[i]).save(buf, format="JPEG")
                for name, payload in ((f"{i:06d}.jpg", buf.getvalue()), (f"{i:06d}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return os.path.join(folder, "{00000..%05d}.tar" % (n_shards - 1))


def test_tar_shards_split_over_ranks_and_workers_and_train(tmp_path):
    pattern = write_shards(tmp_path / "shards", 4, 6)
    assert len(data.expand_braces(pattern)) == 4
    seen = []
    for rank in range(2):
        loader = torch.utils.data.DataLoader(
            data.TarShards(pattern, 3, 32, rank=rank, world=2), batch_size=None, num_workers=2
        )
        batches = iter(loader)
        seen.append([c for _ in range(4) for c in next(batches)[1]])  # 4 batches x 3 = one pass over 12 samples
    assert len(set(seen[0])) == 12 and not set(seen[0]) & set(seen[1])
    train.main([*FAST, "--train-data", pattern, "--train-num-samples", "24", "--tokenizer", "bytes",
                "--batch-size", "6", "--steps", "3", "--logs-dir", str(tmp_path), "--name", "tar"])
    assert len(losses(tmp_path / "tar")) == 3


@pytest.mark.parametrize("argv,message", [
    (["--train-data", "nope.csv"], "data file not found: nope.csv"),
    (["--train-data", "nope.csv", "--tokenizer", "bytes"], "data file not found: nope.csv"),
    (["--train-data", "x/{00000..00003}.tar", "--train-num-samples", "10"], "training shard not found"),
    (["--resume", "missing.pt"], "checkpoint not found: missing.pt"),
    (["--pretrained", "missing.pt"], "checkpoint not found: missing.pt"),
])
def test_bad_paths_are_one_line_errors(argv, message, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *argv, "--logs-dir", str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 1 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_bad_flags_are_usage_errors(capsys):
    for argv in (["--train-data", "data.parquet"], ["--train-data", "x.tar"], ["--method", "simclr"]):
        with pytest.raises(SystemExit) as e:
            train.parse_args(argv)
        assert e.value.code == 2
    assert "expected synthetic, a .csv/.tsv file or .tar/.tar.gz shards" in capsys.readouterr().err


def test_tar_shards_without_usable_samples_fail_instead_of_hanging(tmp_path):
    os.makedirs(tmp_path / "bad")
    with tarfile.open(tmp_path / "bad" / "00000.tar", "w") as tar:
        for i in range(3):  # captions without images, and one corrupt image
            for name, payload in ((f"{i}.txt", b"a caption"),) + (((f"{i}.jpg", b"not a jpeg"),) if i == 0 else ()):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(ValueError, match="0 usable samples in a pass over 00000.tar .the 1 of 1 shards"):
        next(iter(data.TarShards(str(tmp_path / "bad" / "00000.tar"), 2, 32)))


def test_short_synthetic_run_learns(tmp_path):
    # the demo's defaults (CLOOB), 150 steps of 64: the held-out combinations' colours are learned (seeds 0-3 all
    # gave 1.00 here; shape takes the demo's 1000 steps of 128)
    train.main(["--steps", "150", "--warmup", "50", "--batch-size", "64", "--log-every", "50",
                "--logs-dir", str(tmp_path), "--name", "demo"])
    final = metrics(tmp_path / "demo")[-1]
    assert final["zeroshot/colour/top1"] >= 0.9  # chance: 0.2
    assert losses(tmp_path / "demo")[-1] < 0.8 * 2 * math.log(63) / 30  # from about 2 ln(N-1) / inv_tau

# ---------------------------------------------------------------------------------------------------- zeroshot.py

import zeroshot  # noqa: E402


@pytest.fixture(scope="module")
def eval_folder(tmp_path_factory):
    """A class-per-folder image set from the synthetic generator (3 shapes, 7 images each, one corrupt file) and
    a saved MICRO-sized model with the bytes tokenizer."""
    root = tmp_path_factory.mktemp("zs")
    pixels, _, labels = data.Synthetic(60, 24, split="heldout").render(range(60))
    counts = {}
    for i in range(60):
        shape = data.SHAPES[labels["shape"][i]]
        if shape != "triangle" and counts.get(shape, 0) < 7:
            counts[shape] = counts.get(shape, 0) + 1
            os.makedirs(root / "images" / shape.replace("circle", "round_disc"), exist_ok=True)
            png(pixels[i]).save(root / "images" / shape.replace("circle", "round_disc") / f"{i}.png")
    (root / "images" / "square" / "broken.jpg").write_bytes(b"not a jpeg")
    torch.manual_seed(0)
    model = cloob.CLIP(dataclasses.replace(MICRO, vocab_size=258, context_length=24))
    model.set_temperature(30.0, learnable=False)
    cloob.save_checkpoint(str(root / "run" / "checkpoints" / "step_0000005.pt"), model, "bytes", "cloob", inv_tau=30.0)
    return root


def test_zeroshot_batched_classifier_equals_direct_computation(eval_folder, tmp_path):
    out = tmp_path / "r.json"
    zeroshot.main(["--model", str(eval_folder / "run"), "--data", str(eval_folder / "images"), "--templates", "single",
                   "--batch-size", "4", "--workers", "0", "--output", str(out)])
    result = json.loads(out.read_text())
    model, info = cloob.load_model(str(eval_folder / "run" / "checkpoints" / "step_0000005.pt"))
    tok = cloob.Tokenizer(info["tokenizer"], model.config.context_length)
    names, hits1, hits5, per_class = ["cross", "round disc", "square"], 0, 0, {}
    with torch.no_grad():  # one text and one image at a time
        w = torch.stack([F.normalize(model.encode_text(tok([f"a photo of a {c}."]))[0], dim=-1) for c in names])
        for label, folder in enumerate(["cross", "round_disc", "square"]):
            for f in sorted(os.listdir(eval_folder / "images" / folder)):
                if f.endswith(".png"):
                    image = data.preprocess(Image.open(eval_folder / "images" / folder / f), 16)
                    scores = F.normalize(model.encode_image(image[None])[0], dim=-1) @ w.T
                    hits1 += scores.argmax().item() == label
                    per_class.setdefault(names[label], []).append(scores.argmax().item() == label)
                    hits5 += label in scores.topk(3).indices.tolist()
    assert result["n"] == 21 and result["skipped"] == 1  # the corrupt file is counted, not fatal
    assert result["top1"] == pytest.approx(hits1 / 21) and result["top5"] == pytest.approx(hits5 / 21)
    assert result["per_class"] == pytest.approx({c: sum(v) / len(v) for c, v in per_class.items()})


def test_zeroshot_clip_tokenizer_checkpoint_through_the_cli(eval_folder, clip_checkpoint, tmp_path):
    (tmp_path / "names.txt").write_text("an x\na circle\na box\n")
    out = tmp_path / "r.json"
    result = subprocess.run([sys.executable, os.path.join(HERE, "zeroshot.py"), "--model", clip_checkpoint,
                             "--data", str(eval_folder / "images"), "--classnames", str(tmp_path / "names.txt"),
                             "--workers", "0", "--output", str(out)], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, HOME=str(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert "cloob checkpoint, clip, clip tokenizer" in result.stderr
    assert "label: top-1" in result.stdout and "per-class top-1, worst first" in result.stdout
    r = json.loads(out.read_text())
    assert r["n"] == 21 and set(r["per_class"]) == {"an x", "a circle", "a box"} and 0 <= r["top1"] <= r["top5"] <= 1


def test_zeroshot_single_images(eval_folder, capsys):
    paths = [str(eval_folder / "images" / "cross" / sorted(os.listdir(eval_folder / "images" / "cross"))[0]),
             str(eval_folder / "images" / "square" / sorted(os.listdir(eval_folder / "images" / "square"))[0])]
    results = zeroshot.main(
        ["--model", str(eval_folder / "run"), "--image", *paths, "--labels", "a cross, a square,a disc"]
    )
    model, _ = cloob.load_model(str(eval_folder / "run" / "checkpoints" / "step_0000005.pt"))
    tok = cloob.Tokenizer("bytes", 24)
    with torch.no_grad():
        y = F.normalize(model.encode_text(tok(["a cross", "a square", "a disc"])), dim=-1)
        for path in paths:
            x = F.normalize(model.encode_image(data.preprocess(Image.open(path), 16)[None]), dim=-1)
            expected = dict(zip(["a cross", "a square", "a disc"], (30.0 * x @ y.T).softmax(-1)[0].tolist()))
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


def test_zeroshot_classifier_encodes_prompts_in_chunks(eval_folder):
    model, _ = cloob.load_model(str(eval_folder / "run"))
    tokenizer, names, seen = (
        cloob.Tokenizer("bytes", model.config.context_length),
        [f"class {i}" for i in range(50)],
        [],
    )
    whole = zeroshot.classifier(model, tokenizer, names, zeroshot.TEMPLATES["ensemble"], batch_size=10 ** 6)
    encode = model.encode_text
    model.encode_text = lambda tokens: seen.append(len(tokens)) or encode(tokens)
    chunked = zeroshot.classifier(model, tokenizer, names, zeroshot.TEMPLATES["ensemble"], batch_size=64)
    assert max(seen) <= 64 and sum(seen) == 350 and torch.allclose(chunked, whole, atol=1e-6)


def test_zeroshot_retrieval_on_a_csv(eval_folder, tmp_path, capsys):
    rows = ["filepath,title"] + [f"{eval_folder}/images/{d}/{f},a {d}" for d in ("cross", "square")
                                 for f in sorted(os.listdir(eval_folder / "images" / d))] + ["missing.png,a ghost"]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    r = zeroshot.main(
        ["--model", str(eval_folder / "run"), "--retrieval", str(tmp_path / "pairs.csv"), "--workers", "0"]
    )
    assert r["images"] == r["captions"] == 14 and r["skipped"] == {"corrupt image": 1, "missing image": 1}
    assert "14 images, 14 captions: image_to_text_R@1" in capsys.readouterr().out
    assert set(r) >= {f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--data", "{empty}"], "no images in class sub-folders"),
        (["--data", "{images}", "--classnames", "{names}"], "has 2 class names for 3 class folders"),
        (["--data", "nowhere"], "image folder not found: nowhere"),
        (["--image", "nowhere.jpg", "--labels", "a,b"], "nowhere.jpg: missing image"),
        (["--image", "{images}/square/broken.jpg", "--labels", "a,b"], "broken.jpg: corrupt image"),
        (["--image", "{images}/square", "--labels", "a,b"], "square: a directory, not an image"),
        (["--image", "{huge}", "--labels", "a,b"], "huge.png: image too large (over Pillow's decompression-bomb limit"),
        (
            ["--image", "{images}/square/broken.jpg", "--labels", "a cat,a dog,a cat"],
            "--labels: ['a cat'] given more than once",
        ),
        (["--data", "{images}", "--output", "{empty}"], "empty: Is a directory"),
        (["--data", "{images}", "--output", "{empty}/no/r.json"], "No such file or directory"),
        (["--data", "{images}", "--templates", "{names}"], "every template needs a {} for the class name"),
        (["--model", "{names}", "--data", "{images}"], "cannot be read"),
        (
            ["--model", "{empty}", "--data", "{images}"],
            "a folder without an OpenCLIP or Hugging Face model or train.py checkpoints",
        ),
        (["--model", "missing.pt", "--data", "{images}"], "checkpoint not found: missing.pt"),
    ],
)
def test_zeroshot_bad_input_is_a_one_line_error(argv, message, eval_folder, tmp_path, monkeypatch, capsys):
    os.makedirs(tmp_path / "empty" / "some_class")
    (tmp_path / "names.txt").write_text("a\nb\n")
    Image.new("L", (20000, 20000)).save(tmp_path / "huge.png")  # 4e8 pixels, over twice Pillow's limit
    paths = dict(empty=tmp_path / "empty", images=eval_folder / "images", names=tmp_path / "names.txt",
                 huge=tmp_path / "huge.png")
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

# ---------------------------------------------------------------------------------------------------- performance


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
                    args, model, images, tokens, contextlib.nullcontext(), torch.amp.GradScaler("cpu", enabled=False), 1
                )
        grads[k] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        peaks[k] = hooks.peak
    assert grads[1].keys() == grads[4].keys() and ("logit_scale" in grads[4]) == (method == "clip")
    for n in grads[1]:
        assert (grads[4][n] - grads[1][n]).abs().max() <= 1e-5 * max(1.0, grads[1][n].abs().max().item()), n
    assert peaks[4] < 0.3 * peaks[1]  # activations of one micro-batch at a time


def test_nonfinite_losses_skip_the_step_and_repeated_ones_stop_the_run(tmp_path, monkeypatch, capsys):
    real, calls = train.compute_loss, []

    def poisoned(args, model, x, y):  # steps listed in `bad` get a NaN loss (and NaN gradients)
        calls.append(1)
        return real(args, model, x, y) * (float("nan") if len(calls) in bad else 1.0)
    monkeypatch.setattr(train, "compute_loss", poisoned)
    bad = {5, 6}
    train.main(
        [*FAST, "--batch-size", "4", "--steps", "6", "--save-every", "1", "--logs-dir", str(tmp_path), "--name", "nan"]
    )
    five, six = (torch.load(p, weights_only=True) for p in cloob.checkpoints(str(tmp_path / "nan")))
    assert (five["step"], six["step"]) == (5, 6) and metrics(tmp_path / "nan")[-2]["nonfinite_steps"] == 2
    for k in five["state_dict"]:  # step 6 left weights and Adam moments as they were
        assert torch.equal(five["state_dict"][k], six["state_dict"][k]) and torch.isfinite(six["state_dict"][k]).all()
    assert all(
        torch.equal(a["exp_avg"], b["exp_avg"])
        for a, b in zip(five["optimizer"]["state"].values(), six["optimizer"]["state"].values())
    )
    calls.clear()
    bad = set(range(3, 100))
    with pytest.raises(SystemExit):
        train.main(
            [
                *FAST,
                "--batch-size",
                "4",
                "--steps",
                "20",
                "--log-every",
                "5",
                "--logs-dir",
                str(tmp_path),
                "--name",
                "nan2",
            ]
        )
    assert "train.py: error: the loss was not finite for 8 steps in a row (by step 10)" in capsys.readouterr().err


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
    assert 0 < r["peak_memory_gib"] < 24
    monkeypatch.setattr(train, "peak_tflops", lambda device, precision: 1.0)  # as if the device's peak were 1 TFLOP/s
    train.main(["--bench", "--batch-size", "8", "--steps", "1", "--accum-steps", "2", "--method", "clip"])
    r = json.loads(capsys.readouterr().out)
    assert r["accum_steps"] == 2 and r["method"] == "clip"
    assert r["mfu"] == pytest.approx(r["flops_per_sample"] * r["samples_per_s"] / 1e12)


def test_zeroshot_progress_line_every_ten_seconds(monkeypatch, capsys):
    clock = iter([0.0, 5.0, 12.0, 15.0, 30.0])  # start, then one reading per batch
    monkeypatch.setattr(zeroshot.time, "time", lambda: next(clock))
    model = cloob.CLIP(cloob.CONFIGS["tiny-vit"]).eval()
    sizes = [100, 200, 100, 600]  # t=5: too soon; t=12: 300 done, 25 images/s, eta 28 s; t=15: 3 s after; t=30: all
    batches = [(torch.zeros(n, 3, 32, 32), None, {"t": torch.zeros(n, dtype=torch.long)}, collections.Counter())
               for n in sizes]
    zeroshot.evaluate(model, cloob.Tokenizer("bytes", 48), {"t": (["a", "b"], ("{}",))}, batches, total=1000)
    assert capsys.readouterr().err == "  300/1000 images, 25 images/s, eta 28 s\n"


# ---------------------------------------------------------------------------------------------------- reliability
import re  # noqa: E402
import signal  # noqa: E402


def wait_for_steps(run_dir, n, process, timeout=90):
    """Until the run has logged n steps (or died)."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if os.path.isfile(run_dir / "metrics.jsonl") and len(losses(run_dir)) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{run_dir} did not reach step {n}")


def final_weights(run_dir):
    return torch.load(cloob.checkpoints(str(run_dir))[-1], weights_only=True)


def test_sigterm_finishes_the_step_saves_and_resumes_exactly(tmp_path):
    common = [sys.executable, os.path.join(HERE, "train.py"), *FAST, "--batch-size", "4", "--steps", "100",
              "--save-every", "100", "--logs-dir", str(tmp_path), "--workers", "1"]  # a loader worker too
    subprocess.run([*common, "--name", "straight"], check=True, capture_output=True, timeout=120)
    run = subprocess.Popen([*common, "--name", "stopped"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    wait_for_steps(tmp_path / "stopped", 3, run)
    os.killpg(run.pid, signal.SIGTERM)  # to the whole process group, as SLURM and Kubernetes do; then once more
    time.sleep(0.05)
    os.killpg(run.pid, signal.SIGTERM)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    stop = re.search(
        r"stopped by SIGTERM after step (\d+): saved (\S+); continue with the same command and --resume latest", out
    )
    assert stop and 3 <= int(stop.group(1)) < 100 and stop.group(2).endswith(f"step_{int(stop.group(1)):07d}.pt")
    assert [os.path.basename(p) for p in glob.glob(str(tmp_path / "stopped" / "checkpoints" / "*"))] == \
        [os.path.basename(stop.group(2))]  # one whole file, no temp file
    subprocess.run([*common, "--name", "stopped", "--resume", "latest"], check=True, capture_output=True, timeout=120)
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "stopped")
    assert a["step"] == b["step"] == 100
    for k in a["state_dict"]:
        assert torch.allclose(a["state_dict"][k], b["state_dict"][k], atol=1e-6), k
    steps = [e["step"] for e in metrics(tmp_path / "stopped") if "loss" in e]
    assert steps == list(range(1, 101))  # after the resume, metrics.jsonl holds each step once


def worker_pids(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return sorted(int(p) for p in f.read().split())


def test_torchrun_ranks_agree_on_the_stop_step_when_one_rank_is_signalled(tmp_path):
    common = [*FAST, "--steps", "20", "--logs-dir", str(tmp_path), "--seed", "1", "--save-every", "100"]
    train.main([*common, "--batch-size", "8", "--name", "one"])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                os.path.join(HERE, "train.py"), *common, "--batch-size", "4", "--name", "two"]
    run = subprocess.Popen(torchrun, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
    wait_for_steps(tmp_path / "two", 3, run)
    os.kill(worker_pids(run.pid)[-1], signal.SIGUSR1)  # one rank only: the other learns it at the next step
    out, err = run.communicate(timeout=120)
    stop = re.search(r"stopped by \w+ after step (\d+)", out)
    assert stop and 3 <= int(stop.group(1)) < 20, out + err
    assert [os.path.basename(p) for p in cloob.checkpoints(str(tmp_path / "two"))] == [
        f"step_{int(stop.group(1)):07d}.pt"
    ]
    subprocess.run(torchrun + ["--resume", "latest"], check=True, capture_output=True, cwd=HERE, timeout=120)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4, abs=1e-5)


def test_unreadable_newest_checkpoint_is_skipped_and_named(tmp_path, capsys):
    common = [*FAST, "--batch-size", "4", "--save-every", "1", "--logs-dir", str(tmp_path), "--name", "r"]
    train.main([*common, "--steps", "4"])
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


@pytest.mark.parametrize(
    "flags", [["--precision", "bf16"], ["--precision", "fp16"], ["--compile", "--grad-checkpointing"]]
)
def test_gpu_default_paths_train_on_cpu(flags, tmp_path, capsys):
    """bf16 autocast (the GPU default), fp16 with GradScaler, torch.compile (with checkpointed blocks): finite losses
    close to fp32's."""
    common = [*FAST, "--batch-size", "8", "--steps", "3", "--logs-dir", str(tmp_path)]
    train.main([*common, "--name", "fp32"])
    train.main([*common, *flags, "--name", "other"])
    assert ("first step, with torch.compile's compilation:" in capsys.readouterr().out) == ("--compile" in flags)
    assert losses(tmp_path / "other") == pytest.approx(
        losses(tmp_path / "fp32"), rel=1e-4 if "--compile" in flags else 0.05
    )
    ckpt = final_weights(tmp_path / "other")
    assert (ckpt["scaler"].get("scale") is not None) == (flags == ["--precision", "fp16"])  # GradScaler only for fp16

# ---------------------------------------------------------------------------------------------------- bad input


def train_error(capsys, *argv):
    """The one line train.py prints when it refuses argv (exit status 1)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(list(argv))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1 and err.startswith("train.py: error: "), err
    return err


def test_a_run_directory_belongs_to_one_run(tmp_path, capsys):
    common = [*FAST, "--batch-size", "4", "--save-every", "2", "--logs-dir", str(tmp_path), "--name", "reuse"]
    train.main([*common, "--steps", "4"])
    before = {p: os.path.getmtime(p) for p in cloob.checkpoints(str(tmp_path / "reuse"))}
    err = train_error(capsys, *common, "--steps", "6", "--seed", "1")
    assert "holds a run's checkpoints: continue with --resume latest or pick another --name" in err
    assert {p: os.path.getmtime(p) for p in cloob.checkpoints(str(tmp_path / "reuse"))} == before
    (tmp_path / "reuse" / "checkpoints" / "step_0000006.pt.tmp").write_bytes(b"half a checkpoint")
    train.main([*common, "--steps", "6", "--resume", "latest"])  # a deliberate change (more steps) is fine
    assert not glob.glob(str(tmp_path / "reuse" / "checkpoints" / "*.tmp"))  # the killed save's leftover is gone


@pytest.mark.parametrize("change,message", [
    (["--model", "tiny-rn"], "image_resolution 32 -> 64"),
    (["--batch-size", "8"], "global_batch 4 -> 8"),
    (["--method", "clip"], "method 'cloob' -> 'clip'"),
    (["--seed", "3"], "seed 0 -> 3"),
])
def test_resume_refuses_a_different_run(change, message, tmp_path, capsys):
    common = [*FAST, "--batch-size", "4", "--logs-dir", str(tmp_path), "--name", "r", "--steps", "2"]
    train.main(common)
    err = train_error(capsys, *common, "--steps", "4", "--resume", "latest", *change)
    assert message in err and "differs from" in err


def test_resume_from_a_file_that_is_not_a_training_checkpoint(tmp_path, capsys):
    cloob.save_checkpoint(str(tmp_path / "weights.pt"), cloob.CLIP(cloob.CONFIGS["tiny-vit"]), "bytes", "cloob")
    err = train_error(
        capsys, *FAST, "--steps", "2", "--logs-dir", str(tmp_path), "--resume", str(tmp_path / "weights.pt")
    )
    assert "weights.pt is not a train.py checkpoint (start from its weights: --pretrained)" in err


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--steps", "-3"], ["--save-every", "0"], ["--log-every", "0"],
                                  ["--batch-size", "0"], ["--workers", "-1"], ["--lr", "0"], ["--beta2", "1"],
                                  ["--warmup", "x"], ["--accum-steps", "3", "--batch-size", "8"]])
def test_numeric_flags_are_checked_when_parsed(argv, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and ("error: argument" in err or "must divide --batch-size" in err), err


def test_data_and_run_directory_problems_are_one_line_errors(tmp_path, capsys):
    pattern = write_shards(tmp_path / "shards", 2, 3)
    tar = [*FAST, "--train-data", pattern, "--tokenizer", "bytes", "--logs-dir", str(tmp_path)]
    assert "4 samples are fewer than one global batch of 6" in train_error(capsys, *tar, "--train-num-samples", "4",
                                                                           "--batch-size", "6", "--name", "a")
    assert "2 shards cannot feed 1 ranks x 4 workers each" in train_error(capsys, *tar, "--train-num-samples", "6",
                                                                     "--workers", "4", "--name", "b")
    (tmp_path / "file").write_text("")
    assert "cannot write the run directory" in train_error(
        capsys, *FAST, "--steps", "1", "--logs-dir", str(tmp_path / "file")
    )


def test_csv_files_as_spreadsheets_write_them(tmp_path, capsys):
    rows = write_images(tmp_path / "img", 8)
    lines = ["filepath,title"] + [f"img/{f},{cap}" for f, cap, _ in rows[:7]] + ["img/0007.png"]  # a short row
    (tmp_path / "bom.csv").write_bytes("\n".join(lines).encode("utf-8-sig"))
    ds = data.CsvCaptions(str(tmp_path / "bom.csv"))
    assert len(ds) == 8 and ds[7][1] is None
    batch = data.TrainSet(ds, 32)[[(0, 7), (0, 0)]]
    assert batch[2] == {"missing caption": 1} and batch[1][0] == rows[0][1]  # the short row is skipped and counted
    (tmp_path / "latin1.csv").write_bytes("filepath,title\nimg/0000.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.csv, line 2: not UTF-8 text"):
        data.CsvCaptions(str(tmp_path / "latin1.csv"))


def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    image = Image.open(tmp_path / "g16.png")
    assert image.mode.startswith("I")
    grey = np.asarray(data.to_rgb(image))[..., 0].astype(float)
    assert np.abs(grey - ramp / 257).max() <= 0.5 and grey.mean() == pytest.approx(127.5, abs=1)
    eight_bit = Image.fromarray((ramp / 257).round().astype(np.uint8))  # resized before it becomes RGB, still scaled
    assert (data.preprocess(image, 16) - data.preprocess(eight_bit, 16)).abs().max() < 0.05


def test_tar_sample_without_caption_is_a_missing_caption(tmp_path):
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, payload in (("a.jpg", b"x"), ("a.json", b"{}"), ("b.txt", b"caption")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    assert list(data.tar_samples(str(tmp_path / "s.tar"))) == [(b"x", None), (None, b"caption")]
    with pytest.raises(ValueError, match="missing caption"):
        data.load_sample((io.BytesIO(b"x"), None, {}), None)


def test_zeroshot_folders_labels_and_templates(eval_folder, tmp_path, capsys):
    nested = tmp_path / "nested"
    for c in ("cross", "square"):
        for i, f in enumerate(sorted(os.listdir(eval_folder / "images" / c))):
            os.makedirs(nested / c / f"part{i % 2}", exist_ok=True)
            os.symlink(eval_folder / "images" / c / f, nested / c / f"part{i % 2}" / f)
    os.makedirs(nested / "empty_class")
    (tmp_path / "t.txt").write_text("a {} with {curly} braces\n")
    r = zeroshot.main(["--model", str(eval_folder / "run"), "--data", str(nested), "--workers", "0", "--templates",
                       str(tmp_path / "t.txt")])
    assert "per-class top-1, worst first" in capsys.readouterr().out
    assert r["n"] == 14 and r["skipped"] == 1 and r["per_class"]["empty class"] is None  # images at any depth
    with pytest.raises(SystemExit):
        zeroshot.main(["--model", str(eval_folder / "run"), "--image", "x.png", "--labels", ",, ,"])
    assert "zeroshot.py: error: --labels ',, ,' names no label" in capsys.readouterr().err

# ------------------------------------------------------------------------------------------- fine-tuning, BatchNorm


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
    model, _ = train.build_model(args, torch.device("cpu"))
    assert (args.beta2, args.eps) == (beta2, eps) and args.name.startswith(f"{method}-model-") and model.training


def test_learnable_cloob_temperature_is_clamped(tmp_path):
    train.main([*FAST, "--batch-size", "8", "--steps", "4", "--learn-inv-tau", "--init-inv-tau", "99.9", "--lr", "0.05",
                "--logs-dir", str(tmp_path), "--name", "t"])
    inv_tau = [e["inv_temperature"] for e in metrics(tmp_path / "t") if "loss" in e]
    assert max(inv_tau) <= 100 + 1e-4 and inv_tau[-1] == pytest.approx(100, abs=1e-3)  # it grows, up to the clamp


def test_sync_bn_makes_two_resnet_ranks_reproduce_one_process(tmp_path):
    common = [*FAST, "--model", "tiny-rn", "--steps", "3", "--logs-dir", str(tmp_path), "--seed", "1"]
    train.main([*common, "--batch-size", "8", "--name", "one"])
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.join(HERE, "train.py"), *common, "--batch-size", "4", "--name", "two", "--sync-bn"],
                   check=True, capture_output=True, cwd=HERE, timeout=120)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    # the first loss agrees to float rounding (without --sync-bn it differs by 18%); after it, Adam turns rounding in
    # near-zero gradients into +-lr steps (a float64 check of the gradients: equal to 1e-8), so the curve agrees to 1e-3
    assert two[0] == pytest.approx(one[0], rel=1e-5) and two == pytest.approx(one, rel=1e-3)
    a, b = final_weights(tmp_path / "one")["state_dict"], final_weights(tmp_path / "two")["state_dict"]
    for k in ("visual.bn1.running_var", "visual.layer4.0.bn3.running_var"):  # statistics of the global batch
        assert torch.allclose(a[k], b[k], rtol=5e-3), k


@pytest.mark.parametrize("flags", [["--accum-steps", "4"], ["--grad-checkpointing"]])
def test_one_step_updates_batchnorm_statistics_once(flags):
    args = train.parse_args(["--model", "tiny-rn", "--batch-size", "8", *flags])
    model, _ = train.build_model(args, torch.device("cpu"))
    net, optimizer, scaler, ctx = train.prepare(args, model, torch.device("cpu"), 1)
    images, tokens = torch.randn(8, 3, 64, 64), torch.randint(0, 256, (8, 48))
    tokens[:, 20] = 257
    train.train_step(args, model, net, optimizer, scaler, ctx, images, tokens, 1)
    counts = {k: v.item() for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")}
    assert len(counts) > 10 and set(counts.values()) == {1}


def test_training_crop_is_torchvisions_random_resized_crop():
    rng = np.random.default_rng(0)
    boxes = [data.crop_box(200, 200, rng) for _ in range(4000)]
    covered = [(r - l) * (b - t) / 200 ** 2 for l, t, r, b in boxes]
    assert np.mean([c >= 0.9 for c in covered]) >= 0.99 and all(c <= 1 for c in covered)
    aspect = np.abs(np.log([(r - l) / (b - t) for l, t, r, b in boxes]))
    assert aspect.mean() < 0.05  # square crops of 0.9-1.0 of a square image only fit near aspect 1
    assert data.crop_box(400, 40, np.random.default_rng(0)) == (173, 0, 226, 40)  # the fallback: centre, aspect 4/3


def test_zeroshot_data_flag_evaluates_a_folder_during_training(eval_folder, tmp_path):
    train.main([*FAST, "--batch-size", "4", "--steps", "2", "--zeroshot-every", "1", "--logs-dir", str(tmp_path),
                "--name", "zs", "--zeroshot-data", str(eval_folder / "images")])
    scores = [e["zeroshot/images/top1"] for e in metrics(tmp_path / "zs") if "zeroshot/images/top1" in e]
    assert len(scores) == 2 and all(0 <= s <= 1 for s in scores)


def test_a_data_error_in_a_loader_worker_ends_the_run_promptly(tmp_path):
    (tmp_path / "urls.csv").write_text(
        "filepath,title\n" + "".join(f"https://example.com/{i}.jpg,a cat\n" for i in range(8))
    )
    t0 = time.time()
    result = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--train-data", str(tmp_path / "urls.csv"),
                             "--workers", "1", "--batch-size", "4", "--tokenizer", "bytes", "--model", "tiny-vit",
                             "--logs-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and time.time() - t0 < 60, result.stderr
    assert "image is a URL (download the images first" in result.stderr and "Traceback" not in result.stderr


def test_ctrl_c_finishes_the_step_and_saves(tmp_path):
    run = subprocess.Popen(
        [
            sys.executable,
            os.path.join(HERE, "train.py"),
            *FAST,
            "--batch-size",
            "4",
            "--steps",
            "300",
            "--logs-dir",
            str(tmp_path),
            "--name",
            "c",
            "--workers",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    wait_for_steps(tmp_path / "c", 2, run)
    os.killpg(run.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
    out, err = run.communicate(timeout=60)
    assert run.returncode == 130 and "stopped by SIGINT after step" in out and "Traceback" not in err, err
    assert len(cloob.checkpoints(str(tmp_path / "c"))) == 1

# ---------------------------------------------------------------------------------------------------- evaluation input


def test_preprocess_equals_openais_transform_on_palette_alpha_and_cmyk_images():
    cases = torch.load(ref("transform_cases.pt"), weights_only=True)
    assert set(cases) == {"palette.png", "palette.gif", "rgba.png", "la.png", "cmyk.jpg"}
    for name, (file, expected) in cases.items():
        with Image.open(io.BytesIO(file.numpy().tobytes())) as image:
            assert (data.preprocess(image, 16) - expected).abs().max() <= 1e-6, name


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


def test_labels_from_a_file_may_hold_commas(eval_folder, tmp_path):
    (tmp_path / "labels.txt").write_text("a cross, drawn\na square, filled\n")
    image = str(eval_folder / "images" / "square" / sorted(os.listdir(eval_folder / "images" / "square"))[0])
    r = zeroshot.main(["--model", str(eval_folder / "run"), "--image", image, "--labels", str(tmp_path / "labels.txt")])
    assert set(r[image]) == {"a cross, drawn", "a square, filled"} and sum(r[image].values()) == pytest.approx(1)

# ---------------------------------------------------------------------------------------------------- data and resume


def test_tsv_quotes_are_text_and_csv_quotes_that_swallow_lines_are_named(tmp_path):
    rows = [f"imgs/{i}.png\tcaption {i}" for i in range(8)]
    rows[2], rows[3] = 'imgs/2.png\t"the best" day ever', 'imgs/3.png\t"unclosed quote begins this caption'
    (tmp_path / "cc.tsv").write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    captions = [c for _, c in data.CsvCaptions(str(tmp_path / "cc.tsv")).rows]
    assert len(captions) == 8 and captions[2] == '"the best" day ever' and captions[3].startswith('"unclosed quote')
    (tmp_path / "q.csv").write_text('filepath,title\na.png,"a, quoted caption"\nb.png,"unclosed\nc.png,more\n')
    assert 'q.csv, line 4: a field runs over several lines' in one_line_error(data.CsvCaptions, str(tmp_path / "q.csv"))
    (tmp_path / "d.csv").write_text("filepath,title,title\na.png,one,two\n")
    assert "a column named twice (['filepath', 'title', 'title'])" in one_line_error(
        data.CsvCaptions, str(tmp_path / "d.csv")
    )


def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_repeated_tar_keys_start_new_samples(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    write_tar(
        tmp_path / "s.tar",
        [m for i in range(3) for m in (("0000.png", buf.getvalue()), ("0000.txt", f"c{i}".encode()))],
    )
    assert [c for _, c in data.tar_samples(str(tmp_path / "s.tar"))] == [b"c0", b"c1", b"c2"]


def test_a_loader_worker_with_fewer_samples_than_a_batch_stops_the_run(tmp_path):
    pattern = write_shards(tmp_path / "shards", 2, 8)
    os.replace(tmp_path / "shards" / "00001.tar", tmp_path / "full.tar")
    with tarfile.open(tmp_path / "full.tar") as full:
        write_tar(
            tmp_path / "shards" / "00001.tar", [(m.name, full.extractfile(m).read()) for m in full.getmembers()[:4]]
        )
    loader = torch.utils.data.DataLoader(data.TarShards(pattern, 4, 32, workers=2), batch_size=None, num_workers=2)
    with pytest.raises(
        Exception,
        match=r"2 usable samples in a pass over 00001.tar \(the 1 of 2 shards read by rank 0, "
        r"loader worker 1\): fewer than a batch of 4",
    ):
        [batch for batch, _ in zip(loader, range(8))]
    assert "the brace range {00003..00000} is empty" in one_line_error(data.expand_braces, "x/{00003..00000}.tar")


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


def test_resume_checks_precision_and_the_tar_sample_stream(tmp_path, capsys):
    common = [*FAST, "--batch-size", "4", "--logs-dir", str(tmp_path), "--name", "p"]
    train.main([*common, "--steps", "2"])
    train.main([*common, "--steps", "4", "--resume", "latest", "--precision", "fp16"])  # a new scale for fp16
    assert len(losses(tmp_path / "p")) == 4 and final_weights(tmp_path / "p")["scaler"]["scale"] > 0
    pattern = write_shards(tmp_path / "shards", 2, 8)
    tar = [*FAST, "--train-data", pattern, "--train-num-samples", "16", "--tokenizer", "bytes", "--batch-size", "4",
           "--logs-dir", str(tmp_path), "--name", "t"]
    train.main([*tar, "--steps", "2", "--workers", "1"])
    assert "workers 1 -> 2" in train_error(capsys, *tar, "--steps", "4", "--workers", "2", "--resume", "latest")


def test_a_hand_made_checkpoint_loads_with_defaults(tmp_path):
    model = cloob.CLIP(MICRO)
    torch.save({"state_dict": model.state_dict(), "config": dataclasses.asdict(MICRO)}, tmp_path / "mine.pt")
    loaded, info = cloob.load_model(str(tmp_path / "mine.pt"))
    assert info["method"] == "clip" and info["tokenizer"] == "clip" and info["config"] == MICRO

# ---------------------------------------------------------------------------------------------------- speed paths


def test_token_batches_are_cut_after_the_longest_caption_exactly():
    tok = cloob.Tokenizer("clip")
    captions = ["a dog", "a photo of a small brown dog running on the beach at sunset"]
    short, full = tok(captions), tok(captions + ["x " * 100])[:2]
    assert short.shape == (2, 16) and full.shape == (2, 77) and torch.equal(short, full[:, :16])
    assert tok(["a"]).shape == (1, 8) and cloob.Tokenizer("bytes", 48)(["y" * 60]).shape == (1, 48)
    torch.manual_seed(0)
    model = cloob.CLIP(dataclasses.replace(MICRO, vocab_size=49408, context_length=77)).eval()
    with torch.no_grad():
        assert torch.allclose(model.encode_text(short), model.encode_text(full), atol=1e-6)


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


def test_csv_column_flags_epochs_and_hopfield_beta(tmp_path):
    rows = write_images(tmp_path / "img", 8)
    (tmp_path / "t.csv").write_text("caption;image\n" + "".join(f"{cap};img/{f}\n" for f, cap, _ in rows))
    common = [*FAST, "--train-data", str(tmp_path / "t.csv"), "--csv-img-key", "image", "--csv-caption-key", "caption",
              "--csv-separator", ";", "--tokenizer", "bytes", "--batch-size", "4", "--epochs", "2",
              "--logs-dir", str(tmp_path)]
    train.main([*common, "--name", "beta8"])
    train.main([*common, "--name", "beta2", "--hopfield-beta", "2"])
    assert [e["epoch"] for e in metrics(tmp_path / "beta8") if "loss" in e] == [0.5, 1.0, 1.5, 2.0]  # 8 rows, 2 x 4
    assert losses(tmp_path / "beta2")[0] != pytest.approx(losses(tmp_path / "beta8")[0], rel=1e-3)


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
