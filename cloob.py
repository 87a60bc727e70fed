"""CLIP and CLOOB in one file, the method first: configs, image and text towers, Hopfield retrieval and the losses
(with their distributed gather); then the tokenizer and checkpoint loading. Parameter names follow OpenAI's CLIP so
its (and OpenCLIP's, and CLOOB's) weights load.

CLIP  (Radford et al. 2021): symmetric InfoNCE on the normalised features, learnable temperature.
CLOOB (Fürst et al. 2021): retrieve both modalities from modern Hopfield networks that store the batch,
       then apply InfoLOOB (InfoNCE with the positive left out of the denominator) to the retrievals.
"""
import functools
import glob
import gzip
import html
import json
import math
import os
import pathlib
import re
import unicodedata
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ----------------------------------------------------------------------------------------------------
# Configs


@dataclass
class ModelConfig:
    """Field names are the arguments of OpenAI's `CLIP(...)`. The end-of-text id is vocab_size-1."""
    embed_dim: int = 512
    image_resolution: int = 224
    # an int: a ViT's blocks; 4 numbers: a ResNet's blocks per stage
    vision_layers: int | tuple = 12
    vision_width: int = 768
    vision_patch_size: int | None = 32
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 512
    transformer_heads: int = 8
    transformer_layers: int = 12
    # x * sigmoid(1.702 x), as every OpenAI and CLOOB checkpoint; False: exact GELU
    quick_gelu: bool = True
    # None: OpenAI's 64-wide heads (ViT width/64, ResNet attention pool width*32/64)
    vision_heads: int | None = None

    def __post_init__(self):  # a ViT's patches must tile the image (else it drops the border pixels)
        if isinstance(self.vision_layers, int) and self.image_resolution % self.vision_patch_size:
            raise ValueError(f"vision_patch_size {self.vision_patch_size} does not divide {self.image_resolution}")


# OpenAI's published shapes (the defaults are ViT-B/32's); two tiny ones for CPU work: the byte tokenizer (256 ids +
# start + end), exact GELU (cheaper than QuickGELU on a CPU). Positional fields, in order: embed_dim,
# image_resolution, vision_layers, vision_width, vision_patch_size, context_length, vocab_size, transformer_width,
# transformer_heads, transformer_layers.
CONFIGS = {
    "RN50": ModelConfig(1024, 224, (3, 4, 6, 3), 64, None),
    "ViT-B-32": ModelConfig(),
    "ViT-B-16": ModelConfig(vision_patch_size=16),
    "ViT-L-14": ModelConfig(768, 224, 24, 1024, 14, transformer_width=768, transformer_heads=12),
    "tiny-vit": ModelConfig(64, 32, 3, 128, 8, 48, 258, 64, 2, 2, quick_gelu=False),
    "tiny-rn": ModelConfig(64, 64, (1, 1, 1, 1), 16, None, 48, 258, 128, 2, 3, quick_gelu=False),
}

# ----------------------------------------------------------------------------------------------------
# Towers. Modules batch-first ([B, L, D]); state_dict names and shapes are OpenAI's.


def _run_blocks(tower, blocks, x, *args):
    """Residual blocks in order; with tower.grad_checkpointing, activations are recomputed in backward."""
    ckpt = tower.grad_checkpointing and torch.is_grad_enabled()
    for block in blocks:
        x = checkpoint(block, x, *args, use_reentrant=False) if ckpt else block(x, *args)
    return x


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads, quick_gelu=True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        # OpenAI's parameters, computed with SDPA
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        gelu = QuickGELU() if quick_gelu else nn.GELU()
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=gelu,
                                             c_proj=nn.Linear(4 * width, width)))

    def forward(self, x, mask=None, causal=False, pool=None):
        """x [B, L, D] -> the block's output [B, L, D]; with pool [B], only each row's position pool[b] is computed:
        [B, 1, D]. mask [B, 1, 1, L]: True where a query may look; causal: each position sees those up to its own
        (SDPA's fast kernel)."""
        qkv = F.linear(self.ln_1(x), self.attn.in_proj_weight, self.attn.in_proj_bias)  # [B, L, 3D]
        q, k, v = qkv.chunk(3, dim=-1)
        if pool is not None:  # the pooled queries, and the residual stream at them: [B, 1, D]
            x, q = (t[torch.arange(len(t), device=t.device), pool, None] for t in (x, q))
        # [B, heads, L, D/heads]
        q, k, v = (t.unflatten(-1, (self.attn.num_heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        x = x + self.attn.out_proj(out.transpose(1, 2).flatten(2))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, quick_gelu=True):
        super().__init__()
        self.width, self.layers, self.grad_checkpointing = width, layers, False
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, quick_gelu) for _ in range(layers))

    def forward(self, x, pool, causal=False):
        """x [B, L, D] -> [B, 1, D] at position pool[b] of each row (the class token; with causal attention, the end
        token). The last block computes only that position, its query seeing the positions up to it (causal)."""
        x = _run_blocks(self, self.resblocks[:-1], x, None, causal)
        positions = torch.arange(x.shape[1], device=x.device)
        mask = (positions <= pool[:, None])[:, None, None] if causal else None  # [B, 1, 1, L]
        return _run_blocks(self, self.resblocks[-1:], x, mask, False, pool)


class VisionTransformer(nn.Module):
    def __init__(self, resolution, patch_size, width, layers, heads, output_dim, quick_gelu=True):
        super().__init__()
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)  # patchify
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((resolution // patch_size) ** 2 + 1, width))
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, quick_gelu)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x):  # x [B, 3, R, R]
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, grid², width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        # [B, grid²+1, width]
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype))
        # the class token -> [B, output_dim]
        return self.ln_post(self.transformer(x, 0)[:, 0]) @ self.proj


class Bottleneck(nn.Module):
    """ResNet bottleneck, anti-aliased: stride > 1 is an avgpool before conv3 (and before the downsample conv)."""

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        nn.init.zeros_(self.bn3.weight)  # OpenAI's: the block starts as the identity
        self.downsample = None
        # "-1" keeps OpenAI's key names downsample.0 / downsample.1
        if stride > 1 or inplanes != planes * 4:
            conv = nn.Conv2d(inplanes, planes * 4, 1, bias=False)
            self.downsample = nn.Sequential(OrderedDict({"-1": nn.AvgPool2d(stride), "0": conv,
                                                         "1": nn.BatchNorm2d(planes * 4)}))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class AttentionPool2d(nn.Module):
    """One attention step whose only query is the mean token: [B, C, H, W] -> [B, output_dim]."""

    def __init__(self, spacial_dim, embed_dim, heads, output_dim):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(embed_dim, embed_dim) for _ in range(3))
        self.c_proj = nn.Linear(embed_dim, output_dim)
        # OpenAI's: 1/sqrt(fan-in)
        for linear in [self.q_proj, self.k_proj, self.v_proj, self.c_proj]:
            nn.init.normal_(linear.weight, std=embed_dim ** -0.5)
        self.heads = heads

    def forward(self, x):
        x = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, HW+1, C]
        # [B, heads, L, C/heads]; q: L = 1
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for t in (self.q_proj(x[:, :1]), self.k_proj(x), self.v_proj(x)))
        # [B, heads, 1, C/heads] -> [B, C]
        return self.c_proj(F.scaled_dot_product_attention(q, k, v).flatten(1))


class ModifiedResNet(nn.Module):
    """OpenAI's ResNet: 3-conv stem with avgpool, anti-aliased bottlenecks, attention pooling."""

    def __init__(self, layers, output_dim, heads, resolution=224, width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        inplanes, self.grad_checkpointing = width, False
        for i, blocks in enumerate(layers):
            planes = width * 2 ** i
            rest = [Bottleneck(planes * 4, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(Bottleneck(inplanes, planes, 1 if i == 0 else 2), *rest))
            inplanes = planes * 4
        self.attnpool = AttentionPool2d(resolution // 32, width * 32, heads, output_dim)

    def forward(self, x):  # x [B, 3, R, R]
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = _run_blocks(self, [*self.layer1, *self.layer2, *self.layer3, *self.layer4], self.avgpool(x))
        return self.attnpool(x)  # [B, output_dim]


class CLIP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = self.config = config
        if isinstance(c.vision_layers, (tuple, list)):
            heads = c.vision_heads or c.vision_width * 32 // 64
            self.visual = ModifiedResNet(c.vision_layers, c.embed_dim, heads, c.image_resolution, c.vision_width)
        else:
            self.visual = VisionTransformer(c.image_resolution, c.vision_patch_size, c.vision_width, c.vision_layers,
                                            c.vision_heads or c.vision_width // 64, c.embed_dim, c.quick_gelu)
        self.transformer = Transformer(c.transformer_width, c.transformer_layers, c.transformer_heads, c.quick_gelu)
        self.token_embedding = nn.Embedding(c.vocab_size, c.transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.transformer_width))
        self.ln_final = nn.LayerNorm(c.transformer_width)
        self.text_projection = nn.Parameter(torch.empty(c.transformer_width, c.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # log inverse temperature
        self.initialize_parameters()

    def initialize_parameters(self):
        """OpenAI's scheme: small embeddings, depth-scaled residual projections in the transformers (the ResNet's
        attention pooling and bottlenecks initialise themselves)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for t in [self.transformer, *(m for m in self.visual.modules() if isinstance(m, Transformer))]:
            proj_std = t.width ** -0.5 * (2 * t.layers) ** -0.5
            for block in t.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=t.width ** -0.5)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(block.mlp.c_fc.weight, std=(2 * t.width) ** -0.5)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)

    def set_temperature(self, inv_tau, learnable):
        """logit_scale = ln(inv_tau). CLIP: 1/0.07, learnable. CLOOB: 30, fixed (the official recipe)."""
        with torch.no_grad():
            self.logit_scale.fill_(math.log(inv_tau))
        self.logit_scale.requires_grad_(learnable)

    def set_grad_checkpointing(self, enable=True):
        for m in self.modules():
            if hasattr(m, "grad_checkpointing"):
                m.grad_checkpointing = enable

    def encode_image(self, images):  # [B, 3, R, R] -> [B, embed_dim], not normalised
        return self.visual(images)

    def encode_text(self, tokens):  # [B, L] -> [B, embed_dim], not normalised; L <= context_length
        # [B, L, width]
        x = self.token_embedding(tokens) + self.positional_embedding[:tokens.shape[1]]
        # first end token of each row
        eot = (tokens == self.config.vocab_size - 1).int().argmax(dim=-1)
        return self.ln_final(self.transformer(x, eot, causal=True)[:, 0]) @ self.text_projection

    def forward(self, images, tokens):
        """-> L2-normalised (image_features, text_features), each [B, embed_dim]."""
        return F.normalize(self.encode_image(images), dim=-1), F.normalize(self.encode_text(tokens), dim=-1)

# ----------------------------------------------------------------------------------------------------
# Losses. Pure functions of L2-normalised features [n, D], computed in float32 (float64 stays float64)
# whatever the autocast state. Under torch.distributed each rank passes its own n rows; features are
# gathered with gradient, each rank computes its n rows against all N = W*n columns (memory n*N), and
# DDP's gradient average then equals the gradient of the single-process loss on the whole batch.


def _full_precision(fn):
    @functools.wraps(fn)
    def wrapper(*args):
        args = [a.float() if torch.is_tensor(a) and a.dtype in (torch.float16, torch.bfloat16) else a for a in args]
        with torch.autocast(args[0].device.type, enabled=False):  # the first argument: features
            return fn(*args)
    return wrapper


def _distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank0():
    """Whether this process is rank 0 of several, or the only one."""
    return not _distributed() or dist.get_rank() == 0


def setup_distributed():
    """-> (rank, world size, device) from torchrun's RANK, WORLD_SIZE, LOCAL_RANK, with the process group started
    where there are several ranks (gloo on CPUs; on GPUs NCCL for CUDA tensors, gloo for CPU tensors: the loop's
    small sums and votes need no device sync); a plain `python` run is rank 0 of 1."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


class _AllGather(torch.autograd.Function):
    """Every rank's rows [n, ...] -> [W*n, ...], in rank order. Every rank's loss depends on every rank's rows, so the
    gradient of this rank's rows is the sum over the ranks of their gradients: a reduce-scatter."""

    @staticmethod
    def forward(ctx, x):
        out = x.new_empty(dist.get_world_size() * len(x), *x.shape[1:])
        dist.all_gather_single(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty(len(grad) // dist.get_world_size(), *grad.shape[1:])
        dist.reduce_scatter_single(out, grad.contiguous())
        return out


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d that normalises a training batch with the statistics of the global batch: each rank's per-channel
    sums are gathered with gradient, so W ranks of n images compute what one process of W*n does. Works with any
    backend (torch's SyncBatchNorm needs a GPU). train.py --sync-bn turns a ResNet's BatchNorm2d layers into this."""

    def forward(self, x):  # [B, C, H, W]; every rank's batch has the same size (as train.py's)
        if not (self.training and _distributed()):
            return super().forward(x)
        # n: per channel, all ranks
        xf = x.to(self.weight.dtype)
        n = x.numel() / x.shape[1] * dist.get_world_size()
        mean = _AllGather.apply(xf.sum((0, 2, 3))[None]).sum(0) / n  # [C]
        # two passes
        var = _AllGather.apply(((xf - mean[:, None, None]) ** 2).sum((0, 2, 3))[None]).sum(0) / n
        self.num_batches_tracked += 1
        self.running_mean.lerp_(mean.detach(), self.momentum)
        # unbiased, as BatchNorm2d
        self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
        scale = self.weight * torch.rsqrt(var + self.eps)  # [C]
        return (xf * scale[:, None, None] + (self.bias - mean * scale)[:, None, None]).to(x.dtype)


def convert_sync_batchnorm(module):
    """Every BatchNorm2d in `module` becomes a SyncBatchNorm, in place: the same parameters and buffers."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.__class__ = SyncBatchNorm


def gather(x):
    """All ranks' rows [n, D] -> ([W*n, D] with gradient, where this rank's rows start); (x, 0) in one process.
    A contrastive loss needs at least 2 rows in all."""
    offset = 0
    if _distributed():
        offset = dist.get_rank() * len(x)
        x = _AllGather.apply(x)
    if x.shape[0] < 2:
        raise ValueError(f"a contrastive loss needs a global batch of 2 or more samples, got {len(x)}")
    return x, offset


@_full_precision
def hopfield(queries, memory, beta):
    """Modern Hopfield retrieval, one update step: normalize(softmax(beta * Q @ Kᵀ) @ K).
    queries [n, D], memory [N, D] (rows are the stored patterns) -> [n, D], unit norm."""
    attn = torch.softmax(beta * queries @ memory.T, dim=-1)  # [n, N]
    return F.normalize(attn @ memory, dim=-1)


@_full_precision
def infoloob(anchors, samples, inv_tau, offset=0):
    """InfoLOOB: mean_i[ -inv_tau a_i·b_i + logsumexp_{j≠i} inv_tau a_i·b_j ] (positive left out of the sum).
    anchors [n, D], samples [N, D]; anchor i's positive is samples[offset + i]."""
    logits = inv_tau * anchors @ samples.T  # [n, N]
    idx = torch.arange(anchors.shape[0], device=logits.device)
    positive = logits[idx, offset + idx]  # [n]
    negatives = logits.masked_fill(F.one_hot(offset + idx, logits.shape[1]).bool(), float("-inf"))
    return (torch.logsumexp(negatives, dim=-1) - positive).mean()


@_full_precision
def cloob_loss(image_features, text_features, inv_tau, beta):
    """CLOOB, the official scale: (L(U_x, U_y) + L(V_y, V_x)) / inv_tau with L = infoloob, where
    U_x = hop(X, X), U_y = hop(Y, X) are retrieved from the image memory, V_x = hop(X, Y), V_y = hop(Y, Y)
    from the text memory. Features [n, D] unit norm; inv_tau (e.g. 30) and beta (e.g. 8) multiply."""
    X, offset = gather(image_features)  # [N, D]
    Y, _ = gather(text_features)
    U_x, U_y = hopfield(image_features, X, beta), hopfield(text_features, X, beta)  # [n, D]
    V_x, V_y = hopfield(image_features, Y, beta), hopfield(text_features, Y, beta)
    loss = infoloob(U_x, gather(U_y)[0], inv_tau, offset) + infoloob(V_y, gather(V_x)[0], inv_tau, offset)
    return loss / inv_tau


@_full_precision
def clip_loss(image_features, text_features, logit_scale):
    """CLIP's symmetric InfoNCE: (CE(s X Yᵀ) + CE(s Y Xᵀ)) / 2 with s = logit_scale the multiplier (e.g. 100).
    Features [n, D] unit norm."""
    X, offset = gather(image_features)
    Y, _ = gather(text_features)
    labels = offset + torch.arange(image_features.shape[0], device=X.device)
    logits_per_image = logit_scale * image_features @ Y.T  # [n, N]
    logits_per_text = logit_scale * text_features @ X.T
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2

# ----------------------------------------------------------------------------------------------------
# Tokenizer: OpenAI's CLIP BPE on tiktoken, or raw bytes

# OpenAI's, MIT licence
BPE_PATH = pathlib.Path(__file__).resolve().with_name("bpe_simple_vocab_16e6.txt.gz")

# OpenAI's tokenizer first runs ftfy.fix_text. Its character-level fixes are reproduced here (its mojibake repair,
# fix_encoding, is not): one translate table for C1 controls (read as Windows-1252), Latin ligatures, full- and
# half-width forms and curly quotes; then terminal escapes and other control characters go.
_C1 = range(0x80, 0xA0)
_LIGATURES = "ĲĳŉǱǲǳǄǅǆǇǈǉǊǋǌﬀﬁﬂﬃﬄﬆ"  # ftfy's, and ﬅ (long s, t): "ſt"
_WIDTH_FORMS = [chr(c) for c in range(0xFF01, 0xFFF0)]  # full-width ASCII, half-width CJK forms
_FTFY_CHARS = {
    **{c: char for c, char in zip(_C1, bytes(_C1).decode("cp1252", "replace")) if char != "\ufffd"},
    **{ord(c): unicodedata.normalize("NFKC", c) for c in [*_LIGATURES, *_WIDTH_FORMS]},
    ord("ﬅ"): "ſt",
    0x3000: " ",  # the ideographic space
    **dict.fromkeys([0x2BC, *range(0x2018, 0x201C)], "'"),
    **dict.fromkeys(range(0x201C, 0x2020), '"'),
}
# C0 controls but tab, line breaks and form feed; DEL; deprecated format characters; byte-order mark; annotations
_CONTROL_CHARS = dict.fromkeys([*range(9), 11, *range(14, 32), 127, *range(0x206A, 0x2070), 0xFEFF,
                                *range(0xFFF9, 0xFFFD)])
_ANSI_ESCAPE = re.compile(r"\x1b\[[\d;]*[a-zA-Z]")
_HTML_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")
# ftfy's entities: HTML5's that end in ";", and the upper-case spelling of a lower-case one that means nothing else
_ENTITIES = {"&" + name: char for name, char in html.entities.html5.items() if name.endswith(";")}
_ENTITIES.update({name.upper(): char.upper() for name, char in _ENTITIES.items()
                  if name == name.lower() and html.unescape(name.upper()) == name.upper()})


def _unescape(match):
    """ftfy's HTML unescaping of one entity: a known name, or a numeric reference that html.unescape decodes whole."""
    entity = match.group()
    if entity in _ENTITIES:
        return _ENTITIES[entity]
    char = html.unescape(entity)
    return char if entity.startswith("&#") and ";" not in char else entity


def _ftfy(text, entities=True):
    """ftfy.fix_text's fixes in its order (line breaks left out: whitespace is collapsed later), until none changes
    anything."""
    while True:
        before = text
        if entities:  # HTML's
            text = _HTML_ENTITY.sub(_unescape, text)
        text = text.translate(_FTFY_CHARS)
        # surrogate pairs joined, others: �
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        text = unicodedata.normalize("NFC", _ANSI_ESCAPE.sub("", text).translate(_CONTROL_CHARS))
        if text == before:
            return text


def _bytes_to_unicode():
    """OpenAI's (GPT-2's) byte -> printable character table; its order is the order of the first 256 ids."""
    # "!".."~", "¡".."¬", "®".."ÿ"
    printable = [b for b in range(256) if chr(b).isprintable() and b != 32]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


@functools.cache
def _clip_encoding():
    """CLIP's BPE as a tiktoken Encoding. CLIP's `x</w>` (last symbol of a word) becomes the bytes of x plus one
    trailing space: the tokenizer joins pre-split words with spaces, and a space never occurs inside a word,
    so tokens holding a real space byte are unreachable and dropped. Ranks are CLIP's ids, so BPE merge order
    (lowest rank first) is CLIP's merge order, and the `x </w>` merges (ids 256..511) always come first."""
    import tiktoken
    b2u = _bytes_to_unicode()
    u2b = {c: b for b, c in b2u.items()} | {" ": 32}  # CLIP's `</w>` is written as a trailing space
    # the file's first line is a header; CLIP's ids: 256 bytes, 256 bytes ending a word, the merges, start, end
    n_merges = 49408 - 2 * 256 - 2
    merges = gzip.open(BPE_PATH).read().decode("utf-8").split("\n")[1:n_merges + 1]
    symbols = list(b2u.values()) + [c + "</w>" for c in b2u.values()] + ["".join(m.split()) for m in merges]
    ranks = {bytes(u2b[c] for c in s.replace("</w>", " ")): i for i, s in enumerate(symbols)
             if b2u[32] not in s or s == b2u[32]}
    return tiktoken.Encoding("clip", pat_str=r"\S+ ", mergeable_ranks=ranks,
                             special_tokens={"<|startoftext|>": 49406, "<|endoftext|>": 49407})


class Tokenizer:
    """Text -> LongTensor [B, context_length]: start id, token ids, end id, zero padding. Too-long text is cut,
    keeping the end id in the last slot (the text tower pools there). Start and end are the last two ids.
      "clip":  OpenAI's CLIP BPE, token-for-token (49408 ids, start 49406, end 49407), from the merges file shipped
               beside this file (BPE_PATH);
      "bytes": UTF-8 bytes (256 ids + start + end), needs no file."""

    def __init__(self, encoding="clip", context_length=77):
        import regex  # installed with tiktoken
        if encoding not in ("clip", "bytes"):
            raise ValueError(f"tokenizer {encoding!r}: expected clip or bytes")
        if encoding == "clip" and not BPE_PATH.is_file():
            raise FileNotFoundError(f"CLIP BPE merges file not found: {BPE_PATH}")
        self.name, self.context_length = encoding, context_length
        self.enc = _clip_encoding() if encoding == "clip" else None
        self.vocab_size = 49408 if self.enc else 258
        self.sot, self.eot = self.vocab_size - 2, self.vocab_size - 1
        self._words = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|"""
                                    r"""'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

    def _prepare(self, text):
        """OpenAI's cleaning and pre-split: ftfy (which, line by line, stops unescaping HTML at the first line holding
        a "<"), html.unescape twice, whitespace collapsed, lower case; CLIP's regex words, each followed by a space."""
        cut = text.rfind("\n", 0, text.find("<")) + 1 if "<" in text else len(text)
        text = html.unescape(html.unescape(_ftfy(text[:cut]) + _ftfy(text[cut:], entities=False)))
        return "".join(w + " " for w in self._words.findall(" ".join(text.split()).lower()))

    def encode(self, text):
        """str -> list of ids, without start and end."""
        if self.enc is None:
            return list(text.encode("utf-8"))
        # CLIP's special tokens honoured, as OpenAI
        return self.enc.encode(self._prepare(text), allowed_special="all")

    def __call__(self, texts):
        """list of str (or one str) -> LongTensor [B, L], L <= context_length: the columns after the longest row's end
        id, rounded up to a multiple of 8 (few distinct shapes), are cut. Exact: under causal attention a position never
        sees later ones, and features are pooled at the end id. Real captions are short: the text tower runs a
        fraction of its 77 positions. A plain loop: tiktoken's threaded encode_batch is slower for captions."""
        texts = [texts] if isinstance(texts, str) else texts
        ids = [self.encode(text)[:self.context_length - 2] for text in texts]
        longest = max(map(len, ids), default=0) + 2  # with start and end
        out = np.zeros((len(texts), min(self.context_length, math.ceil(longest / 8) * 8)), np.int64)
        for row, row_ids in zip(out, ids):
            row[:len(row_ids) + 2] = [self.sot, *row_ids, self.eot]
        return torch.from_numpy(out)

# ----------------------------------------------------------------------------------------------------
# Checkpoints: ours, OpenAI's TorchScript archives, OpenAI-layout state dicts (OpenCLIP), official CLOOB


def _count(sd, prefix):
    """The number of blocks numbered after `prefix` in a state dict."""
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def infer_config(sd):
    """ModelConfig from OpenAI-layout tensor shapes, as OpenAI's build_model (heads are not in the shapes: 64 wide)."""
    if "visual.proj" in sd:
        width, patch = sd["visual.conv1.weight"].shape[0], sd["visual.conv1.weight"].shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = dict(vision_layers=_count(sd, "visual.transformer.resblocks."), vision_width=width,
                      vision_patch_size=patch, image_resolution=patch * grid)
    else:
        grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = dict(vision_layers=tuple(_count(sd, f"visual.layer{i}.") for i in range(1, 5)),
                      vision_width=sd["visual.layer1.0.conv1.weight"].shape[0], vision_patch_size=None,
                      image_resolution=grid * 32)
    width = sd["ln_final.weight"].shape[0]
    return ModelConfig(embed_dim=sd["text_projection"].shape[1], context_length=sd["positional_embedding"].shape[0],
                       vocab_size=sd["token_embedding.weight"].shape[0], transformer_width=width,
                       transformer_heads=width // 64, transformer_layers=_count(sd, "transformer.resblocks."), **vision)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """A .safetensors file without the package: an 8-byte little-endian header length, a JSON header
    {name: {"dtype", "shape", "data_offsets": [begin, end]}} (offsets into the data after it), then the data."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
    header.pop("__metadata__", None)
    # each tensor's bytes copied out first: its offset need not be a multiple of its dtype's size
    return {name: data[slice(*t["data_offsets"])].clone().view(SAFETENSORS_DTYPES[t["dtype"]]).view(t["shape"])
            for name, t in header.items()}


def read_file(path):
    """A .safetensors file, or anything torch.load reads with weights_only=True; else a one-line error."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.endswith(".safetensors"):
            return read_safetensors(path)
        return torch.load(path, "cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} cannot be read ({str(e).strip().splitlines()[0][:99]})") from None


# open_clip_config.json: the entries this model reads or that do not change its outputs, and the few that it
# implements at one value only. Any other entry is an option this model does not have (layer scale, timm or
# Hugging Face towers, attentional pooling, ...) and is refused: silently ignoring one would give wrong features.
OPENCLIP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "image_size", "layers", "width", "patch_size",
                 "head_width", "context_length", "vocab_size", "heads", "patch_dropout", "output_tokens",
                 "init_logit_scale", "cast_dtype", "fill_color"}
OPENCLIP_VALUES = {"mlp_ratio": 4, "interpolation": "bicubic", "resize_mode": "shortest",
                   "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}


def _openclip_architecture(cfg, path):
    """open_clip_config.json -> the ModelConfig fields that the weights' shapes do not show."""
    model_cfg = cfg.get("model_cfg", cfg)
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    for part in (model_cfg, vision, text, cfg.get("preprocess_cfg", {})):
        for key, value in part.items():
            if key not in OPENCLIP_KEYS and not (key in OPENCLIP_VALUES and OPENCLIP_VALUES[key] == value):
                raise ValueError(f"{path}: OpenCLIP option {key}={value!r} has no equivalent in this model")
    # ResNet: attention pool
    width = vision.get("width", 768) * (32 if isinstance(vision.get("layers"), list) else 1)
    return dict(quick_gelu=model_cfg.get("quick_gelu", False), vision_heads=width // vision.get("head_width", 64),
                transformer_heads=text.get("heads", 8))


# Hugging Face names -> OpenAI's, replaced in this order (the towers' prefixes first)
HF_NAMES = [("vision_model.", "visual."), ("text_model.", ""), ("encoder.layers", "transformer.resblocks"),
            ("embeddings.token_embedding", "token_embedding"), ("embeddings.class_embedding", "class_embedding"),
            ("embeddings.position_embedding.weight", "positional_embedding"), ("embeddings.patch_embedding", "conv1"),
            ("final_layer_norm", "ln_final"), ("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post"),
            ("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
            ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]


def _from_hf(sd, cfg, path):
    """A Hugging Face CLIPModel -> (OpenAI-layout state dict, the ModelConfig fields its config.json gives): names
    converted, q/k/v projections joined into in_proj, nn.Linear projection heads transposed, position_ids dropped."""
    text, vision = cfg.get("text_config", {}), cfg.get("vision_config", {})
    act = {text.get("hidden_act", "quick_gelu"), vision.get("hidden_act", "quick_gelu")}
    eps = {text.get("layer_norm_eps", 1e-5), vision.get("layer_norm_eps", 1e-5)}
    # HF pools at the end-of-text id, or (id 2, older configs) at the largest id: both are ours when it is the last
    if cfg.get("model_type") != "clip" or act not in ({"gelu"}, {"quick_gelu"}) or eps != {1e-5} or \
            text.get("eos_token_id", 2) not in (2, text.get("vocab_size", 49408) - 1):
        raise ValueError(f"{path}: a Hugging Face {cfg.get('model_type')} model with options this model does not have "
                         f"(activations {sorted(act)}, layer-norm eps {sorted(eps)}, end-of-text id)")
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    for theirs, ours in HF_NAMES:
        sd = {k.replace(theirs, ours): v for k, v in sd.items()}
    for q in [k for k in sd if ".self_attn.q_proj." in k]:
        qkv = [sd.pop(q.replace("q_proj", p)) for p in ("q_proj", "k_proj", "v_proj")]
        sd[q.replace("self_attn.q_proj.", "attn.in_proj_")] = torch.cat(qkv)
    sd["text_projection"] = sd.pop("text_projection.weight").T
    sd["visual.proj"] = sd.pop("visual_projection.weight").T
    return sd, dict(quick_gelu=act == {"quick_gelu"}, transformer_heads=text.get("num_attention_heads", 8),
                    vision_heads=vision.get("num_attention_heads", 12))


def _model_files(path):
    """-> (config file, weights file) when `path` is an OpenCLIP hub or Hugging Face folder, or a weights file in one
    (weights in their loaders' order of preference); else (None, None)."""
    folder, name = (path, None) if os.path.isdir(path) else os.path.split(path)
    for config, weights in (("open_clip_config.json", ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")),
                            ("config.json", ("model.safetensors", "pytorch_model.bin"))):
        found = [w for w in weights if os.path.isfile(os.path.join(folder, w)) and name in (None, w)]
        if os.path.isfile(os.path.join(folder, config)) and found:
            return os.path.join(folder, config), os.path.join(folder, found[0])
    return None, None


def checkpoints(run_dir):
    """A train.py run directory's checkpoints, oldest first."""
    return sorted(glob.glob(os.path.join(run_dir, "checkpoints", "step_*.pt")))


def _read(path):
    """-> (state dict with OpenAI's names, info) of any supported checkpoint file or folder. info: format, method,
    tokenizer, and "config" (ours) or "arch" (ModelConfig fields known beyond the tensor shapes)."""
    config_file, weights = _model_files(path)
    if os.path.isdir(path):
        found = [weights] if weights else checkpoints(path)
        if not found:
            raise ValueError(f"{path}: a folder without an OpenCLIP or Hugging Face model or train.py checkpoints")
        path = found[-1]
    if zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()):
        with warnings.catch_warnings():  # OpenAI's released .pt: TorchScript, float16
            warnings.simplefilter("ignore", DeprecationWarning)
            sd = torch.jit.load(path, map_location="cpu").state_dict()
        # the archive's, beside the weights
        scalars = ("input_resolution", "context_length", "vocab_size")
        return {k: v for k, v in sd.items() if k not in scalars}, dict(format="openai-torchscript")
    ckpt = read_file(path)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    sd = ckpt.get("state_dict", ckpt)
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path}: no state_dict; top-level keys: {sorted(map(str, ckpt))[:8]}")
    # ours; a hand-made file may hold only weights and config (tokenizer: by the vocabulary)
    if "config" in ckpt:
        unknown = ckpt["config"].keys() - vars(ModelConfig()).keys()
        if unknown:  # written by a modified model
            raise ValueError(f"{path}: its config has fields this model lacks: {sorted(unknown)}")
        config = ModelConfig(**ckpt["config"])
        info = {k: ckpt[k] for k in ("method", "tokenizer", "inv_tau", "beta", "step") if k in ckpt}
        return sd, {"tokenizer": "bytes" if config.vocab_size == 258 else "clip", **info, "format": "cloob",
                    "config": config}
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}
    # official CLOOB (OpenAI's towers): text under "transformer."
    if "transformer.token_embedding.weight" in sd:
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
        sd["logit_scale"] = sd.pop("logit_inv_tau")
        beta = sd.pop("logit_scale_hopfield").exp().item() if "logit_scale_hopfield" in sd else 8.0
        return sd, dict(format="cloob-official", method="cloob", beta=beta, inv_tau=sd["logit_scale"].exp().item())
    info = dict(format="openai-state-dict")
    if config_file:
        cfg = json.loads(pathlib.Path(config_file).read_text())
        if config_file.endswith("open_clip_config.json"):
            info.update(format="openclip-hub", arch=_openclip_architecture(cfg, config_file))
        else:
            sd, arch = _from_hf(sd, cfg, path)
            info.update(format="huggingface", arch=arch)
    return sd, info


def load_model(path, **overrides):
    """Any supported checkpoint file or folder -> (CLIP in float32, eval mode, on CPU; info dict with "format",
    "method", "tokenizer", "config" and, when known, "inv_tau", "beta"). Keyword arguments override ModelConfig
    fields (e.g. quick_gelu=False). A bare state dict records no activation or head width: OpenAI's are assumed
    (QuickGELU, 64-wide heads) and a warning says so."""
    sd, info = _read(path)  # float16 weights become float32 as they are copied into the model
    info = {"method": "clip", "tokenizer": "clip", **info}  # unless the file says otherwise
    try:  # overrides must be ModelConfig fields (else a TypeError)
        config = replace(info.pop("config", None) or infer_config(sd), **{**info.pop("arch", {}), **overrides})
    except KeyError as e:
        raise ValueError(f"{path}: not a CLIP/CLOOB state dict (no {e}); first keys: {list(sd)[:5]}") from None
    if info["format"] == "openai-state-dict" and "quick_gelu" not in overrides:
        warnings.warn(f"{path} records no architecture: assuming OpenAI's QuickGELU and 64-wide heads (OpenCLIP models "
                      f"not named -quickgelu use GELU: quick_gelu=False, --gelu; other heads: vision_heads= ...)")
    model = CLIP(config)
    try:
        model.load_state_dict(sd)
    # torch's message: a header, then one line per problem (size mismatch, missing, ...)
    except RuntimeError as e:
        problem = str(e).splitlines()[1].strip()[:300]
        raise ValueError(f"{path}: weights do not match the architecture: {problem}") from None
    return model.eval(), dict(info, config=config)


def tokenizer_for(config, name):
    """The tokenizer `name` at a model's context length; one whose ids are not the model's is refused."""
    tokenizer = Tokenizer(name, config.context_length)
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"{name} tokenizer: {tokenizer.vocab_size} ids; the model has {config.vocab_size}")
    return tokenizer


def save_checkpoint(path, model, tokenizer, method, inv_tau=None, beta=None, **state):
    """Write our checkpoint atomically (temp file + rename): a plain dict readable with weights_only=True, the weights
    under "state_dict" as OpenCLIP's loader expects them (open_clip.create_model(..., pretrained=path) reads it).
    `model`: the plain CLIP, not its DDP or torch.compile wrapper (whose names have module./_orig_mod. prefixes)."""
    ckpt = dict(state_dict=model.state_dict(), config=asdict(model.config), tokenizer=tokenizer, method=method,
                inv_tau=inv_tau, beta=beta, **state)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(ckpt, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)
