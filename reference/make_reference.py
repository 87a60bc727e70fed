"""Remake the tests' oracles (every other file in this folder) with the peers' own code. The tests never run this.

In a scratch venv (CPU torch 2.13.0; OpenCLIP imports torchvision, whose CUDA operator registrations fail against
the CPU torch and which its model code does not need, so those two files are emptied; OpenAI's clip imports
pkg_resources, gone from setuptools 81):
    python3.11 -m venv /tmp/refvenv && . /tmp/refvenv/bin/activate
    pip install torch==2.13.0 'torchvision==0.28.*' numpy
    pip install openai-clip==1.0.1 ftfy regex open_clip_torch==3.3.0 'transformers>=5,<6' safetensors 'setuptools<81'
    TV=$(python -c "import importlib.util as u; print(u.find_spec('torchvision').submodule_search_locations[0])")
    : > $TV/_meta_registrations.py; : > $TV/_autograd_registrations.py
    python reference/make_reference.py
(Made with openai-clip 1.0.1, open_clip_torch 3.3.0, transformers 5.24.0, torch 2.13.0+cpu.)

Small on purpose: 320-id vocabularies (start 318, end 319: the end id is the largest, where OpenAI's and OpenCLIP's
text towers pool), narrow towers, and every float tensor perturbed away from its initial value (zero biases, unit
gains and zero-initialised BatchNorm gains would hide a wrong name or a missing op).
"""
import dataclasses
import json
import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
import clip.clip  # noqa: E402  openai-clip 1.0.1: OpenAI's clip.py, model.py and simple_tokenizer.py
import clip.model  # noqa: E402
import clip.simple_tokenizer  # noqa: E402
import ftfy  # noqa: E402
import open_clip  # noqa: E402
import transformers  # noqa: E402
from open_clip.push_to_hf_hub import save_for_hf  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BPE = os.path.join(HERE, "..", "bpe_simple_vocab_16e6.txt.gz")
VOCAB = 320
TEXTS = ["a photo of a dog.", "A Photo Of A DOG!", "a diagram", "an image of a cat sitting on a mat",
         "itap of a tench.",
         "a bad photo of the goldfish.", "a origami great white shark.", "a photo of the large tiger shark.",
         "a hammerhead shark in a video game.", "art of the electric ray.", "It's a dog's life, isn't it?",
         "don't   stop\tbelieving\n", "rock'n'roll", "Hello, World!!!", "naïve café résumé", "Ærøskøbing",
         "日本語のテキスト", "中文字符", "emoji 🐶🐱🚗", "mixed 123 numbers 4567", "3.14159 is pi",
         "e-mail: someone@example.com", "https://example.com/a?b=c&d=e", "&amp; &lt;b&gt;bold&lt;/b&gt;",
         "C++ and C# and F#", "snake_case and camelCase and kebab-case", "   leading and trailing spaces   ", "", " ",
         "!!!", "a", "supercalifragilisticexpialidocious", "antidisestablishmentarianism",
         "The quick brown fox jumps over the lazy dog", "a photo of a Pembroke Welsh corgi",
         "a photo of a Tesla Model S Sedan 2012, a type of car.", "a centered satellite photo of annual crop land.",
         "a photo of a 1965 Ford Mustang", "tulips, roses & daisies", "x" * 200, "word " * 40]


# ftfy's character-level fixes (OpenAI runs ftfy.fix_text first): none of these is mojibake, so its encoding repair
# (not reproduced) leaves them alone; tokenizer_cases() checks that
FTFY_TEXTS = ["\uff76\uff9e\uff77\uff9e \uff83\uff7d\uff84", "\uff8a\uff9f\uff9d\u3002",
              "\uffa1\uffa4\uffa7 \uffc2\uffc3",
              "\uffe5100 or \uffe0 or \uffe1", "\uffe2\uffe3\uffe4\uffe6 \uff5f\uff60 \uffe8\uffe9\uffee",
              "\uff28\uff45\uff4c\uff4c\uff4f\u3000\uff37\uff4f\uff52\uff4c\uff44\uff01", "\u0133sbaan \u0132SSEL",
              "\u01c6ungla \u01c4 \u01c5", "\u01c9ubav \u01c7 \u01c8 \u01cc \u01ca \u01cb \u01f3 \u01f1 \u01f2",
              "\ufb05op \ufb06ar \ufb00 \ufb04", "\u0149 what", "fish &amp;amp;amp; chips",
              "&amp;amp;amp;lt;b&amp;amp;amp;gt;", "&amp;amp;quot;hi&amp;amp;quot;", "a <b>bold</b> &amp;amp;amp; more",
              "line &amp;amp;amp; one\nline <two> &amp;amp;amp; three\nline &amp;amp;amp; four",
              "&EACUTE;T&EACUTE; &NTILDE;", "&#59; and &#x3b; and &ampx; and &amp without",
              "it&#x2019;s &hellip; &#8220;x&#8221;",
              "&#xff76;&#xff9e; &amp;#xff21;", "\x1b[31mred\x1b[0m text", "\x1b[1;32mbold\x1b[0m and \x1b[Kclear",
              "\x93quoted\x94 and it\x92s", "dots\x85 euro \x80 dash \x96", "undefined \x81\x8d\x8f\x90\x9d bytes",
              "\ufeffa photo", "a\ufeffb\ufeff", "a\x00b\x07c\x08d", "tab\tand\x0bvtab\x0cform", "\x7fdel \x1bbare esc",
              "\u206adeprecated\u206f \ufff9ann\ufffbotation\ufffc", "lone \ud800 surrogate \udc00",
              "a\r\nb\rc\u2028d\u2029e", "\u2018single\u2019 \u201adouble\u201b \u201cq\u201d \u201eq\u201f \u02bc",
              "ca\u0301fe\u0301 na\u0308ive", "\uff21\u0301 \uff41\u0308"]


def out(name):
    return os.path.join(HERE, name)


def perturb(model, seed):
    """Move every float tensor off its initial value; BatchNorm variances stay positive."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.mul_(1 + 0.5 * noise.abs())
            else:
                t.add_(noise * (0.1 if t.dim() < 2 else 0.5 * t.std().item() + 1e-3))
    return model.eval()


def tokens(n, context, seed):
    """CLIP-layout rows: start, random ids, end, zero padding, of different lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.zeros(n, context, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(1, context - 1, (1,), generator=g))
        ids = torch.randint(1, VOCAB - 2, (length,), generator=g)
        rows[i, :length + 2] = torch.cat([torch.tensor([VOCAB - 2]), ids, torch.tensor([VOCAB - 1])])
    return rows


def images(n, resolution, seed):
    return torch.randn(n, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed))


def tokenizer_cases():
    tok = clip.simple_tokenizer.SimpleTokenizer(BPE)
    sot, eot = tok.encoder["<|startoftext|>"], tok.encoder["<|endoftext|>"]
    with open(out("tokenizer_cases.jsonl"), "w") as f:
        for text in TEXTS + FTFY_TEXTS:
            assert ftfy.fix_text(text) == ftfy.fix_text(text, fix_encoding=False), f"mojibake: {text!r}"
            ids = tok.encode(text)
            row = [sot, *ids, eot][:16]
            row[-1] = eot if len(ids) + 2 > 16 else row[-1]
            lone_surrogates = any(0xD800 <= ord(c) < 0xE000 for c in text)  # not writable as UTF-8: escaped
            f.write(json.dumps(dict(text=text, ids=ids, tokens_ctx16=row + [0] * (16 - len(row))),
                               ensure_ascii=lone_surrogates) + "\n")


def openai_models():
    """OpenAI's CLIP(...) in float32, and the ViT as a TorchScript archive laid out as OpenAI's releases."""
    configs = {"tiny_vit": dict(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64,
                                vision_patch_size=8),
               "tiny_rn": dict(embed_dim=32, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=4,
                               vision_patch_size=None)}
    for seed, (name, vision) in enumerate(configs.items()):
        args = dict(vision, context_length=16, vocab_size=VOCAB, transformer_width=32, transformer_heads=2,
                    transformer_layers=2)
        torch.manual_seed(seed)
        model = perturb(clip.model.CLIP(**args), seed)
        image, text = images(2, args["image_resolution"], seed), tokens(3, 16, seed)
        with torch.no_grad():
            logits_per_image, _ = model(image, text)
            torch.save(dict(args=args, state_dict=model.state_dict(), image=image, text=text,
                            image_features=model.encode_image(image), text_features=model.encode_text(text),
                            logits_per_image=logits_per_image), out(f"{name}.pt"))
        if name == "tiny_vit":  # float16 weights and the three scalar entries OpenAI's build_model pops
            for key in ("input_resolution", "context_length", "vocab_size"):
                model.__dict__.pop(key, None)  # plain int attributes of OpenAI's CLIP, buffers in the releases
                model.register_buffer(key, torch.tensor(args[key if key != "input_resolution" else "image_resolution"]))
            clip.model.convert_weights(model)
            traced = torch.jit.trace_module(model, {"encode_image": image, "encode_text": text})
            traced.save(out("tiny_vit_openai_jit.pt"))


def state_dict_listings():
    """`key shape dtype` of OpenAI's full-size RN50 and ViT-B/32, built on the meta device (no weights)."""
    shapes = {"RN50": dict(embed_dim=1024, vision_layers=(3, 4, 6, 3), vision_width=64, vision_patch_size=None),
              "ViT-B-32": dict(embed_dim=512, vision_layers=12, vision_width=768, vision_patch_size=32)}
    for name, vision in shapes.items():
        with torch.device("meta"):
            model = clip.model.CLIP(**vision, image_resolution=224, context_length=77, vocab_size=49408,
                                    transformer_width=512, transformer_heads=8, transformer_layers=12)
        with open(out(f"{name}.state_dict.txt"), "w") as f:
            for key, t in model.state_dict().items():
                f.write(f"{key} {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}\n")


def official_cloob_loss(image_features, text_features, inv_tau, beta):
    """ml-jku/cloob src/training/methods.py (not on PyPI), transcribed: cloob(), infoLOOB_loss(), hopfield_retrieval()
    and hopfield() with hflayers' Hopfield(scaling=beta, no projections) written out as softmax(beta Q K^T) K."""
    def hopfield(state_patterns, stored_patterns):
        retrieved = torch.softmax(beta * state_patterns @ stored_patterns.T, dim=-1) @ stored_patterns
        return retrieved / retrieved.norm(dim=1, keepdim=True)

    def infoLOOB_loss(x, y, i):
        tau = 1 / inv_tau
        k = x @ y.T / tau
        positives = -torch.mean(torch.sum(k * i, dim=1))
        large_neg = -1000.0  # for logsumexp the zero entries must be equal to a very large negative number
        arg_lse = k * torch.logical_not(i) + i * large_neg
        negatives = torch.mean(torch.logsumexp(arg_lse, dim=1))
        return tau * (positives + negatives)

    p_xx, p_yy = hopfield(image_features, image_features), hopfield(text_features, text_features)
    p_xy, p_yx = hopfield(text_features, image_features), hopfield(image_features, text_features)
    i = torch.eye(p_xx.shape[0], dtype=torch.float64) > 0.5
    return infoLOOB_loss(p_xx, p_xy, i) + infoLOOB_loss(p_yy, p_yx, i), dict(U_x=p_xx, U_y=p_xy, V_x=p_yx, V_y=p_yy)


def losses():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(16, 32, generator=g, dtype=torch.float64), dim=-1)
    y = torch.nn.functional.normalize(x + 0.8 * torch.randn(16, 32, generator=g, dtype=torch.float64), dim=-1)
    d = dict(image_features=x, text_features=y, inv_tau=30.0, beta=8.0, logit_scale=1 / 0.07)
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    loss, retrievals = official_cloob_loss(xg, yg, 30.0, 8.0)
    loss.backward()
    d.update(cloob_loss=loss.detach(), cloob_grad_image=xg.grad, cloob_grad_text=yg.grad,
             **{k: v.detach() for k, v in retrievals.items()})
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    loss = open_clip.loss.ClipLoss()(xg, yg, torch.tensor(1 / 0.07, dtype=torch.float64))
    loss.backward()
    d.update(clip_loss=loss.detach(), clip_grad_image=xg.grad, clip_grad_text=yg.grad)
    torch.save(d, out("losses.pt"))


def transform_cases():
    """OpenAI's evaluation transform (clip.clip._transform, torchvision) on images of the modes where the order of its
    steps shows (palette, RGBA, LA, CMYK), and on RGB images whose centre crop starts half a pixel in (46 x 32 and
    32 x 46 -> 23 x 16: `round` gives 4 where flooring gives 3), saved as files:
    {name: (file bytes as uint8, expected [3, 16, 16])}."""
    import io
    import numpy as np
    from PIL import Image
    g = np.random.default_rng(0)
    rgba = Image.fromarray(g.integers(0, 256, (30, 41, 4), dtype=np.uint8), "RGBA")
    images = {"palette.png": rgba.convert("RGB").quantize(16), "rgba.png": rgba, "la.png": rgba.convert("LA"),
              "cmyk.jpg": rgba.convert("CMYK"), "palette.gif": rgba.convert("RGB").quantize(8),
              "wide.png": Image.fromarray(g.integers(0, 256, (32, 46, 3), dtype=np.uint8)),
              "tall.png": Image.fromarray(g.integers(0, 256, (46, 32, 3), dtype=np.uint8))}
    cases = {}
    for name, image in images.items():
        buffer = io.BytesIO()
        image.save(buffer, format=name.split(".")[1].replace("jpg", "jpeg"))
        with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
            expected = clip.clip._transform(16)(decoded)
        cases[name] = (torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8), expected)
    torch.save(cases, out("transform_cases.pt"))


class NoTokenizer:  # the folder for a model with OpenCLIP's own tokenizer has no tokenizer files
    def save_pretrained(self, directory):
        pass


def openclip_model():
    """OpenCLIP defaults (nn.GELU: no quick_gelu in the config), 2 heads of 16 in both towers (head_width 16)."""
    cfg = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=2, width=32, patch_size=8, head_width=16),
               text_cfg=dict(context_length=77, vocab_size=VOCAB, width=32, heads=2, layers=2))
    torch.manual_seed(2)
    model = perturb(open_clip.CLIP(**cfg), 2)
    preprocess = dataclasses.asdict(open_clip.transform.PreprocessCfg())  # what create_model sets
    open_clip.model.set_model_preprocess_cfg(model, dict(preprocess, size=32))
    save_for_hf(model, NoTokenizer(), cfg, out("openclip_hub_tiny"))
    # as OpenCLIP's trainer saves it under DDP: no config inside
    torch.save({"epoch": 1, "name": "tiny", "state_dict": {"module." + k: v for k, v in model.state_dict().items()}},
               out("openclip_trainer_tiny.pt"))
    image, text = images(2, 32, 2), tokens(2, 77, 2)
    with torch.no_grad():
        torch.save(dict(images=image, tokens=text, image_features=model.encode_image(image),
                        text_features=model.encode_text(text)), out("openclip_tiny_io.pt"))


def huggingface_model():
    """transformers' CLIPModel with exact GELU, 2 heads of 16, pooling at the end-of-text id (the last id)."""
    towers = dict(hidden_size=32, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2, hidden_act="gelu")
    config = transformers.CLIPConfig(
        text_config=dict(towers, vocab_size=VOCAB, max_position_embeddings=77, bos_token_id=VOCAB - 2,
                         eos_token_id=VOCAB - 1), vision_config=dict(towers, image_size=32, patch_size=8),
        projection_dim=32)
    torch.manual_seed(3)
    model = perturb(transformers.CLIPModel(config), 3)
    model.save_pretrained(out("hf_tiny"))
    image, text = images(2, 32, 3), tokens(2, 77, 3)
    features = lambda o: getattr(o, "pooler_output", o)  # transformers 5 returns an output object
    with torch.no_grad():
        image_features = features(model.get_image_features(pixel_values=image))
        torch.save(dict(images=image, tokens=text, image_features=image_features,
                        text_features=features(model.get_text_features(input_ids=text))), out("hf_tiny_io.pt"))


if __name__ == "__main__":
    assert torch.__version__.startswith("2.13.0") and open_clip.__version__ == "3.3.0"
    steps = [tokenizer_cases, openai_models, state_dict_listings, losses, transform_cases, openclip_model,
             huggingface_model]
    for step in steps:  # or only those named: python reference/make_reference.py tokenizer_cases
        if len(sys.argv) == 1 or step.__name__ in sys.argv[1:]:
            step()
    print("written:", sorted(os.listdir(HERE)))
