"""RAVLT, the Rank-Augmented Vision Linear Transformer, in one file.

Paper:   "Breaking the Low-Rank Dilemma of Linear Attention", Qihang Fan, Huaibo Huang, Ran He,
         CVPR 2025, arXiv:2411.07635. Official release: github.com/qhfan/RALA.

Linear attention replaces softmax(Q Kᵀ) V by φ(Q) (φ(K)ᵀ V): the d×d "KV buffer" φ(K)ᵀV is built
once, so cost grows linearly with the number of tokens N instead of quadratically. The price is
rank: the implied N×N attention matrix φ(Q) φ(K)ᵀ has rank ≤ d, and so do the output features.
RALA (Rank-Augmented Linear Attention) restores rank in two places:
  (a) the KV buffer: keys are re-weighted by α, a softmax over tokens driven by the mean query,
     so each image builds a differently weighted buffer ("query-aware key weights");
  (b) the output features: the attention output Y is multiplied element-wise by a gate o computed
     from the input, and rank(o ⊙ Y) is no longer bounded by the rank of the attention matrix.
RAVLT is a four-stage convolutional-transformer hybrid built on RALA (RALA in stages 1-2, where N
is large; softmax attention in stages 3-4, where N is small), in four sizes T/S/B/L.

Shapes: B batch, C channels, H×W feature map, N = H·W tokens (row-major), h heads, d = C/h head
dim. Maps are (B, C, H, W) between modules; inside attention each head's tensors are (B, h, d, N).

State-dict keys are the release's: its checkpoints load as they are. `python ravlt.py` lists the variants.
"""
import argparse
import contextlib
import functools
import math
import os
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ---- Config: one value per stage in every tuple --------------------------------------------------


@dataclass(frozen=True)
class RAVLTConfig:
    dims: tuple = (64, 128, 256, 512)  # channels C per stage
    depths: tuple = (2, 2, 6, 2)  # blocks per stage
    heads: tuple = (1, 2, 4, 8)  # attention heads h per stage (d = C / h)
    layer_scale_init: tuple = (1.0, 1.0, 1.0, 1.0)  # initial γ per stage
    attn: tuple = ("rala", "rala", "softmax", "softmax")  # attention kind per stage
    mlp_ratio: float = 3.5  # FFN hidden width = int(mlp_ratio * C)
    head_hidden: int = 1024  # width of the conv1×1 before pooling in the head
    drop_path_rate: float = 0.1  # stochastic depth, grows linearly from 0 over all blocks
    num_classes: int = 1000
    in_chans: int = 3


# ---- Small helpers -------------------------------------------------------------------------------


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (the release nests it as `.norm`)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C): normalise C, the last dim
        if torch.compiler.is_compiling():  # compiled: affine after the permute back, or sizes fail (pytorch#172204)
            x = F.layer_norm(x, x.shape[-1:], eps=self.norm.eps).permute(0, 3, 1, 2)
            return x * self.norm.weight[:, None, None] + self.norm.bias[:, None, None]  # (B, C, H, W)
        return self.norm(x).permute(0, 3, 1, 2)  # eager: LayerNorm's own affine, 2-6% faster to train (bench)


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample, rescale the survivors."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(1.0 - self.p)  # (B, 1, 1, 1)
        return x * (keep / (1.0 - self.p))  # (B, 1, 1, 1) rescaled, then one pass over x


class RoPE2d(nn.Module):
    """2D rotary position embedding. forward(H, W) gives (cos θ, sin θ), each (d/2, N): the angle by
    which channel pair (x_2i, x_2i+1) of token (r, c) turns, θ = r·ω for the first d/4 pairs (rows)
    and c·ω for the last d/4 (columns), with frequencies ω_m = 10000^(-m/(d/4-1)), m = 0 .. d/4-1."""

    def __init__(self, head_dim):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
        self.head_dim = head_dim
        # the release's buffer, each ω twice, kept for its state-dict key (forward reads only its device)
        self.register_buffer("angle", self.frequencies().repeat_interleave(2))  # (d/2,)

    def frequencies(self, device=None):
        # 1 / 10000^x rather than 10000^-x: the same bits as the release's buffer
        return 1.0 / 10000.0 ** torch.linspace(0, 1, self.head_dim // 4, device=device)  # (d/4,)

    def forward(self, H, W):
        # ω in float32, not from `angle`: a bf16 buffer would shift far angles by tenths of a radian
        omega = self.frequencies(self.angle.device)[:, None, None]  # (d/4, 1, 1)
        rows = torch.arange(H, device=omega.device, dtype=torch.float32)[:, None]  # (H, 1)
        cols = torch.arange(W, device=omega.device, dtype=torch.float32)[None, :]  # (1, W)
        theta = torch.cat(((omega * rows).expand(-1, H, W), (omega * cols).expand(-1, H, W))).flatten(1)
        return theta.cos(), theta.sin()  # (d/2, H, W) flattened to (d/2, N): token r·W + c


def rope(x, rot):
    """Rotate every channel pair of x (..., d, N) by its angle θ: the complex product
    (x_2i + i·x_2i+1)·e^{iθ} = (x_2i·cos θ - x_2i+1·sin θ) + i·(x_2i+1·cos θ + x_2i·sin θ),
    in real arithmetic, for which torch.compile generates fused code (complex ops it leaves to eager)."""
    cos, sin = rot  # (d/2, N) each
    x1, x2 = x.unflatten(-2, (-1, 2)).unbind(-2)  # (..., d/2, 2, N) -> 2 × (..., d/2, N): x_2i, x_2i+1
    out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -2)  # (..., d/2, 2, N), ≥ float32
    return out.flatten(-3, -2).to(x.dtype)  # (..., d, N)


def phi(x):
    """The linear-attention feature map φ(x) = ELU(x) + 1: positive, so the normaliser is > 0."""
    return F.elu(x) + 1.0


# ---- Attention: RALA (linear and explicit N×N forms) and softmax attention -----------------------


def rala(q, k, v, rot, eps=1e-6):
    """Rank-Augmented Linear Attention in O(N·d²) per head.

    | paper    | variable   | shape         | meaning                                          |
    |----------|------------|---------------|--------------------------------------------------|
    | Q, K, V  | q, k, v    | (B, h, d, N)  | per-head queries, keys, values                   |
    | φ(Q)     | phi_q      | (B, h, d, N)  | ELU + 1 of the queries (φ(K): phi_k)             |
    | q̄        | q_bar      | (B, h, d, 1)  | mean query of the image                          |
    | α        | alpha      | (B, h, 1, N)  | query-aware key weights, sum to 1 over N         |
    | K̃        | k_tilde    | (B, h, d, N)  | re-weighted keys φ(k_j)·α_j·N                    |
    | z        | z          | (B, h, 1, N)  | normaliser 1 / (φ(q_i)·mean_j K̃_j)               |
    | S        | kv         | (B, h, d, d)  | the KV buffer Σ_j RoPE(K̃_j)ᵀ v_j / N             |
    | Y        | y          | (B, h, d, N)  | output, before the gate o and LePE               |
    | e^{iθ}   | rot        | 2 × (d/2, N)  | RoPE's cos θ, sin θ per channel pair and token   |
    """
    N, d, dtype = q.shape[-1], q.shape[-2], v.dtype
    # float32 even under autocast: sums over N tokens and the 1/(…) normaliser need it (few FLOPs)
    with torch.autocast(q.device.type, enabled=False):
        phi_q, phi_k, v = phi(q.float()), phi(k.float()), v.float()  # (B, h, d, N)
        # 1. (a) KV-buffer rank augmentation: weight each key by how well it matches the mean query
        q_bar = phi_q.mean(-1, keepdim=True)  # (B, h, d, 1)
        alpha = torch.softmax(d ** -0.5 * q_bar.transpose(-2, -1) @ phi_k, dim=-1)  # (B, h, 1, N)
        k_tilde = phi_k * (alpha * N)  # (B, h, d, N); ×N keeps the mean weight at 1
        # 2. Normaliser from the un-rotated φ(q) (RoPE could make the dot products negative)
        z = 1.0 / (k_tilde.mean(-1, keepdim=True).transpose(-2, -1) @ phi_q + eps)  # (B, h, 1, N)
        # 3. Relative position: RoPE on both sides of the product
        q_rot, k_rot = rope(phi_q, rot), rope(k_tilde, rot)  # (B, h, d, N)
        # 4. The KV buffer, one d×d matrix per head. This contraction is the linear complexity.
        kv = k_rot @ v.transpose(-2, -1) / N  # (B, h, d, N) @ (B, h, N, d) -> (B, h, d, d)
        # 5. Every query reads the buffer, then is normalised; token-major rows: a channels-last map
        y = q_rot.transpose(-2, -1) @ kv * z.transpose(-2, -1)  # (B,h,N,d) @ (B,h,d,d) -> (B,h,N,d)
    return y.transpose(-2, -1).to(dtype)  # (B, h, d, N)


def softmax_attention(q, k, v, rot):
    """Y = softmax(d^-½ q kᵀ) v with RoPE on q, k (stages 3-4), by SDPA: it never stores the N×N matrix."""
    q, k = rope(q, rot), rope(k, rot)  # (B, h, d, N)
    # d contiguous: SDPA's fused kernels need it (its fallback, the math path, stores the N×N matrix)
    q, k, v = (t.transpose(-2, -1).contiguous() for t in (q, k, v))  # (B, h, N, d)
    return F.scaled_dot_product_attention(q, k, v).transpose(-2, -1)  # (B, h, N, d) -> (B, h, d, N)


def rala_matrix(q, k, rot, eps=1e-6):
    """RALA's N×N matrix A (B, h, N, N), Y = V Aᵀ, A_ij = z_i·RoPE(φ(q_i))·RoPE(K̃_j)/N (rows need not sum
    to 1), read off as rala's output for the identity as values. O(N²·d): for teaching and tests."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand(*q.shape[:2], -1, -1)  # (B, h, N, N)
    return rala(q, k, eye, rot, eps).transpose(-2, -1)  # (B, h, N, N)


def softmax_matrix(q, k, rot):
    """The explicit softmax attention matrix (B, h, N, N), for comparison with `rala_matrix`."""
    q, k = rope(q, rot), rope(k, rot)  # (B, h, d, N)
    return torch.softmax(q.transpose(-2, -1) @ k * q.shape[-2] ** -0.5, dim=-1)  # (B, h, N, N)


_CORES = {"rala": rala, "softmax": softmax_attention}


@functools.cache
def _compiled(kind):
    # one compiled core per kind for all layers; sizes dynamic from the start: stages' (h, N) differ
    return torch.compile(_CORES[kind], dynamic=True)


class Attention(nn.Module):
    """The frame both attention kinds share: proj(o ⊙ (Y + LePE(v))), q, k, v, o from one conv."""

    def __init__(self, dim, num_heads, kind="rala", compile_attn=None):
        super().__init__()
        if kind not in _CORES:
            raise ValueError(f"attn values must be from {tuple(_CORES)}, got {kind!r}")
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.kind, self.num_heads, self.compile_attn = kind, num_heads, compile_attn
        self.qkvo = nn.Conv2d(dim, 4 * dim, 1)  # channel groups q | k | v | o, heads major inside
        self.lepe = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)  # local positional term on v
        self.proj = nn.Conv2d(dim, dim, 1)

    def heads(self, x):
        B, C, H, W = x.shape
        q, k, v, o = self.qkvo(x).chunk(4, dim=1)  # (B, 4C, H, W) -> 4 × (B, C, H, W)
        q, k, v = (t.reshape(B, self.num_heads, -1, H * W) for t in (q, k, v))  # (B, h, d, N)
        # q, k copied out of the qkvo map: a compiled backward over varying sizes mis-strides views of it
        return q.contiguous(), k.contiguous(), v, o

    def forward(self, x, rot):
        B, C, H, W = x.shape
        use_compiled = x.is_cuda if self.compile_attn is None else self.compile_attn
        core = _compiled(self.kind) if use_compiled and not torch.compiler.is_compiling() else _CORES[self.kind]
        q, k, v, o = self.heads(x)
        y = core(q, k, v, rot)  # (B, h, d, N)
        # heads back to channels: (B, h, d, N) -> (B, N, h, d) -> (B, H, W, C) -> (B, C, H, W), channels-last
        y = y.permute(0, 3, 1, 2).reshape(B, H, W, C).permute(0, 3, 1, 2)
        y = y + self.lepe(v.reshape(B, C, H, W))  # (B, C, H, W)
        # (b) Output-feature rank augmentation: rank(o ⊙ Y) ≤ rank(o)·rank(Y), so the element-wise gate
        # frees the output from the rank of the (low-rank) attention matrix that produced Y
        return self.proj(o * y)

    @torch.no_grad()
    def attention_matrix(self, x, rot):
        """The N×N matrix this layer applies to v, (B, h, N, N): for inspection and teaching."""
        q, k, _, _ = self.heads(x)
        return rala_matrix(q, k, rot) if self.kind == "rala" else softmax_matrix(q, k, rot)


# ---- Blocks and stages ---------------------------------------------------------------------------


class FFN(nn.Module):
    """conv1×1 -> GELU -> (+ depthwise conv3×3) -> conv1×1."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        x = F.gelu(self.fc1(x))  # (B, hidden, H, W)
        return self.fc2(x + self.dwconv(x))  # (B, C, H, W); the depthwise conv mixes neighbours


class Block(nn.Module):
    """x += CPE(x); x += γ1·Attention(LN(x)); x += γ2·FFN(LN(x)), the last two with DropPath."""

    def __init__(self, dim, num_heads, kind, mlp_ratio, drop_path, layer_scale, compile_attn):
        super().__init__()
        self.pos = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)  # conditional position encoding
        self.norm1 = LayerNorm2d(dim)
        self.attn = Attention(dim, num_heads, kind, compile_attn)
        self.norm2 = LayerNorm2d(dim)
        self.ffn = FFN(dim, int(mlp_ratio * dim))
        self.gamma_1 = nn.Parameter(torch.full((1, dim, 1, 1), float(layer_scale)))
        self.gamma_2 = nn.Parameter(torch.full((1, dim, 1, 1), float(layer_scale)))
        self.drop_path = DropPath(drop_path)

    def forward(self, x, rot):
        x = x + self.pos(x)
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x), rot))
        return x + self.drop_path(self.gamma_2 * self.ffn(self.norm2(x)))


class Stage(nn.Module):
    """Blocks at one resolution; the RoPE rotations are computed once per forward and shared."""

    def __init__(self, dim, out_dim, num_heads, kind, mlp_ratio, drop_paths, layer_scale, compile_attn):
        super().__init__()
        self.RoPE = RoPE2d(dim // num_heads)  # attribute name kept for the release's state-dict keys
        self.blocks = nn.ModuleList(Block(dim, num_heads, kind, mlp_ratio, p, layer_scale, compile_attn)
                                    for p in drop_paths)  # one block per drop-path rate
        # to the next stage (RAVLT.forward_stages calls it): conv3×3 stride 2 + BN, H -> ceil(H/2)
        self.downsample = None if not out_dim else nn.Sequential(OrderedDict(  # the release's key names
            reduction=nn.Conv2d(dim, out_dim, 3, stride=2, padding=1), norm=nn.BatchNorm2d(out_dim)))
        self.grad_checkpointing = False

    def forward(self, x):
        rot = self.RoPE(*x.shape[-2:])  # (cos θ, sin θ), each (d/2, N)
        for block in self.blocks:  # checkpointed: activations recomputed in backward, not kept
            recompute = self.grad_checkpointing and torch.is_grad_enabled()
            x = checkpoint(block, x, rot, use_reentrant=False) if recompute else block(x, rot)
        return x


def stem(in_chans, dim):
    """Four conv3×3 + BN (GELU between): stride 4, in_chans -> dim. Indices match the release."""
    half = dim // 2
    return nn.Sequential(
        nn.Conv2d(in_chans, half, 3, 2, 1), nn.BatchNorm2d(half), nn.GELU(),
        nn.Conv2d(half, half, 3, 1, 1), nn.BatchNorm2d(half), nn.GELU(),
        nn.Conv2d(half, half, 3, 1, 1), nn.BatchNorm2d(half), nn.GELU(),
        nn.Conv2d(half, dim, 3, 2, 1), nn.BatchNorm2d(dim))


# ---- The model -----------------------------------------------------------------------------------


class FeatureInfo(list):  # timm's `feature_info`: per output map a dict of channels, stride, module

    def channels(self):
        return [info["num_chs"] for info in self]

    def reduction(self):
        return [info["reduction"] for info in self]


class RAVLT(nn.Module):
    """Stem (stride 4), four stages with downsampling between them, then the classifier head."""
    memory_format = torch.channels_last  # a pixel's C values side by side (shapes unchanged): faster convolutions

    def __init__(self, cfg, features_only=False, compile_attn=None, norm_eval=False, out_norm=False):
        super().__init__()
        if out_norm and not features_only:
            raise ValueError("out_norm=True needs features_only=True")
        self.cfg, self.features_only, self.norm_eval = cfg, features_only, norm_eval
        self.num_classes, self.in_chans = cfg.num_classes, cfg.in_chans
        self.feature_info = FeatureInfo(dict(num_chs=dim, reduction=2 ** (i + 2), module=("extra_norms" if out_norm
                                        else "layers") + f".{i}") for i, dim in enumerate(cfg.dims))
        self.patch_embed = nn.Module()  # a namespace, so that the keys read patch_embed.proj.*
        self.patch_embed.proj = stem(cfg.in_chans, cfg.dims[0])
        n = sum(cfg.depths)  # stochastic depth: the drop-path rate grows linearly from 0 over all n blocks
        rates = [cfg.drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        out_dims = [*cfg.dims[1:], None]  # each stage downsamples to the next one's width, the last not
        self.layers = nn.ModuleList(
            Stage(cfg.dims[i], out_dims[i], cfg.heads[i], cfg.attn[i], cfg.mlp_ratio,
                  rates[sum(cfg.depths[:i]):sum(cfg.depths[:i + 1])], cfg.layer_scale_init[i], compile_attn)
            for i in range(len(cfg.dims)))
        self.num_features, self.head_hidden_size = cfg.dims[-1], cfg.head_hidden
        if out_norm:  # the release's COCO/ADE20K backbones: a LayerNorm on each stage output
            self.extra_norms = nn.ModuleList(LayerNorm2d(dim) for dim in cfg.dims)
        if not features_only:  # classification head: conv1×1 + BN + SiLU, pool, conv1×1
            self.proj = nn.Conv2d(cfg.dims[-1], cfg.head_hidden, 1)
            self.norm, self.act = nn.BatchNorm2d(cfg.head_hidden), nn.SiLU()
            self.reset_classifier(cfg.num_classes)
        self.apply(self._init_weights)
        self.to(memory_format=self.memory_format)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Conv2d):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)  # every conv here has one

    def train(self, mode=True):
        # norm_eval: BatchNorm statistics stay fixed while a detector trains on 2 images per GPU
        super().train(mode)
        for m in self.modules() if self.norm_eval else ():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def set_grad_checkpointing(self, enable=True):
        for stage in self.layers:  # less activation memory for one more forward per block in training
            stage.grad_checkpointing = enable

    def reset_classifier(self, num_classes):
        self.num_classes = num_classes
        self.head = nn.Conv2d(self.head_hidden_size, num_classes, 1) if num_classes else nn.Identity()
        self._init_weights(self.head)

    def forward_stages(self, x):
        """The four stage outputs (strides 4, 8, 16, 32, rounded up), taken before downsampling."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"RAVLT expects input of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        x = self.patch_embed.proj(x.contiguous(memory_format=self.memory_format))  # (B, C1, H/4, W/4)
        features = []
        for stage in self.layers:
            features.append(x := stage(x))  # (B, C_i, H_i, W_i)
            if stage.downsample is not None:
                x = stage.downsample(x)  # (B, C_{i+1}, H_i/2, W_i/2)
        return features

    def forward_features(self, x):
        return self.forward_stages(x)[-1]  # (B, C4, H/32, W/32)

    def forward_head(self, x, pre_logits=False):
        x = self.act(self.norm(self.proj(x)))  # (B, head_hidden, H/32, W/32)
        x = x.mean((2, 3), keepdim=True)  # (B, head_hidden, 1, 1)
        return x.flatten(1) if pre_logits else self.head(x).flatten(1)  # (B, head_hidden) or (B, classes)

    def forward(self, x):
        if self.features_only:  # [(B, C_i, H/2^(i+1), W/2^(i+1)) for i in 1..4]
            features = self.forward_stages(x)
            norms = getattr(self, "extra_norms", None)  # out_norm=True: the release's detection LNs
            return features if norms is None else [norm(f) for norm, f in zip(norms, features)]
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def attention_matrices(self, x, stage=0, block=0):
        """The (B, h, N, N) attention matrix that block `block` of stage `stage` applies to x."""
        if not (0 <= stage < len(self.layers) and 0 <= block < len(self.layers[stage].blocks)):
            raise ValueError(f"no block {block} in stage {stage}; depths are {self.cfg.depths}")
        attn, seen = self.layers[stage].blocks[block].attn, {}
        # run the real forward (eval mode: BatchNorm statistics untouched) and catch attn's input
        hook = attn.register_forward_pre_hook(lambda module, args: seen.update(args=args))
        was_training = self.training
        try:
            self.eval().forward_stages(x)
        finally:
            hook.remove()
            self.train(was_training)
        return attn.attention_matrix(*seen["args"])


# ---- Checkpoints ---------------------------------------------------------------------------------


def read_checkpoint(path):
    """torch.load(weights_only=True): a checkpoint is data, not code. Other files: ValueError saying why."""
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path} is a directory, not a file")
    with open(path, "rb") as f:  # FileNotFoundError for a missing file
        head = f.read(4)
    if not head:
        raise ValueError(f"checkpoint {path} is empty (0 bytes)")
    if not head.startswith((b"PK", b"\x80")):  # torch.save writes a zip (before torch 1.6, a pickle)
        raise ValueError(f"{path} is not a checkpoint: it begins with {head!r}, torch.save's with b'PK'")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):  # the archive's end is missing
            raise ValueError(f"checkpoint {path} is truncated: its saving or copying stopped early") from None
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        unsafe = [line.split(". ")[0] for line in lines if line.startswith("WeightsUnpickler error:")]
        raise ValueError(f"cannot read checkpoint {path}: {(unsafe or lines)[0]}") from None


def _state_dict(ckpt, name, use_ema):
    """The weights in a release .pth (`model`, `model_ema`, ...), a training checkpoint of ours, a state
    dict, or the backbone (`state_dict`, `backbone.*`) of the release's mmdetection / mmseg files."""
    if not isinstance(ckpt, dict):
        raise ValueError(f"{name} holds a {type(ckpt).__name__}, expected a dict")
    mm = ckpt.get("state_dict")
    if isinstance(mm, dict) and any(k.startswith("backbone.") for k in mm):
        ckpt = {k.removeprefix("backbone."): v for k, v in mm.items() if k.startswith("backbone.")}
    if use_ema and "model_ema" not in ckpt:
        raise ValueError(f"{name} has no 'model_ema' entry")
    sd = ckpt.get("model_ema" if use_ema else "model", ckpt)
    if not sd or not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{name} holds no state dict (keys: {list(ckpt)[:5]})")
    unwrap = lambda k: k.removeprefix("_orig_mod.").removeprefix("module.").removeprefix("_orig_mod.")
    return {unwrap(k): v for k, v in sd.items()}  # DDP's and torch.compile's prefixes, in either order


def adapt_input_conv(weight, in_chans):
    """RGB kernels (out, 3, k, k) for in_chans inputs, timm's rule: for 1 their sum (a gray image gives
    what the RGB model gives on it repeated in R, G, B); for C, repeated, cut to C and scaled by 3/C."""
    if in_chans == 1:
        return weight.sum(1, keepdim=True)
    return weight.repeat(1, math.ceil(in_chans / 3), 1, 1)[:, :in_chans] * (3 / in_chans)


def load_checkpoint(model, checkpoint, use_ema=False, new_head=True):
    """Load weights into `model` strictly and return it. `checkpoint`: a path or a dict, any file
    `_state_dict` reads. Another class count's classifier gives way to the model's own head (fine-tuning)
    unless new_head=False. Misfits raise ValueError; another variant's weights are named."""
    name = "the checkpoint" if isinstance(checkpoint, dict) else f"checkpoint {checkpoint}"
    ckpt = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    sd, own = _state_dict(ckpt, name, use_ema), model.state_dict()
    first = "patch_embed.proj.0.weight"  # RGB weights into a model of other input channels (in_chans)
    if sd.get(first, own[first]).shape[1] == 3 and own[first].shape[1] != 3:
        sd = {**sd, first: adapt_input_conv(sd[first], own[first].shape[1])}
    top = ("proj.", "norm.", "head.")  # the classifier, which a features-only model lacks

    def body(state):  # the backbone's shapes (out-norms aside: a detector's own addition)
        return {k: v.shape for k, v in state.items() if not k.startswith((*top, "extra_norms."))}

    arch = getattr(model, "pretrained_cfg", {}).get("architecture", "this model")
    if arch in VARIANTS and body(sd) != body(own):  # another variant's weights? name it by their shapes
        with torch.device("meta"):  # shapes only, no memory
            held = next((v for v in VARIANTS if body(create_model(v).state_dict()) == body(sd)), None)
        if held and held != arch:
            raise ValueError(f"{name} holds {held} weights, the model is {arch}")
    if model.features_only:  # no head; the out-norms (out_norm=True) from the file when it has them
        norms = {k: v for k, v in own.items() if k.startswith("extra_norms.")}
        sd = {**norms, **{k: v for k, v in sd.items() if not k.startswith(top)
                          and (k in norms or not k.startswith("extra_norms."))}}
    elif "head.weight" in sd and sd["head.weight"].shape[0] != model.num_classes:
        if not new_head:
            raise ValueError(f"{name} classifies {sd['head.weight'].shape[0]} classes, the model {model.num_classes}")
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        sd.update({k: v for k, v in own.items() if k.startswith("head.")})  # fine-tuning: new head
    problems = {"shape mismatch": [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
                                   for k, v in own.items() if k in sd and sd[k].shape != v.shape],
                "missing": [k for k in own if k not in sd], "unexpected": [k for k in sd if k not in own]}
    if any(problems.values()):
        raise ValueError(f"{name} does not fit {arch}; " + "; ".join(
            f"{label} ({len(keys)}): {', '.join(keys[:3])}" for label, keys in problems.items() if keys))
    model.load_state_dict(sd)
    return model


# ---- Variants ------------------------------------------------------------------------------------


VARIANTS = {
    "ravlt_t": RAVLTConfig(),
    "ravlt_s": RAVLTConfig(dims=(64, 128, 320, 512), depths=(3, 5, 9, 3), heads=(1, 2, 5, 8),
                           drop_path_rate=0.15),
    "ravlt_b": RAVLTConfig(dims=(96, 192, 384, 512), depths=(4, 6, 12, 6), heads=(1, 2, 6, 8),
                           layer_scale_init=(1.0, 1.0, 1e-6, 1e-6), drop_path_rate=0.4),
    "ravlt_l": RAVLTConfig(dims=(96, 192, 448, 640), depths=(4, 7, 19, 8), heads=(1, 2, 7, 10),
                           layer_scale_init=(1e-6,) * 4, drop_path_rate=0.55),
    # not a released model: a 0.3M-parameter RAVLT with every code path, for fast tests
    "ravlt_nano": RAVLTConfig(dims=(16, 32, 64, 64), depths=(1, 1, 2, 1), heads=(1, 2, 4, 4),
                              head_hidden=64, drop_path_rate=0.0),
}


HUB_URL = "https://huggingface.co/aldjalkdf/RAVLT/resolve/main/"  # the release's files
PRETRAINED = {name: f"RAVLT_{name[-1].upper()}.pth" for name in VARIANTS if name != "ravlt_nano"}  # ImageNet-1k
DOWNSTREAM = [f"{model}_{size}_{schedule}.pth" for model, sizes, schedule in [  # COCO, ADE20K models
    ("retinanet", "tsbl", "1x_12_epoch"), ("maskrcnn", "tsbl", "1x_12_epoch"), ("fpn", "tsbl", "1x"),
    ("maskrcnn", "sbl", "3x_36_epoch"), ("Casmaskrcnn", "sbl", "3x_36_epoch"), ("uper", "sbl", "2x")]
    for size in sizes]


def download_checkpoint(name):
    """Local path of a release file, "ravlt_t" (RAVLT_T.pth) or a DOWNSTREAM name: downloaded once into
    torch.hub.get_dir()/checkpoints, where torchvision keeps its weights, then read offline."""
    file = PRETRAINED.get(name, name)
    if file not in (*PRETRAINED.values(), *DOWNSTREAM):
        raise ValueError(f"{name!r} has no released weights; released: {', '.join(PRETRAINED)} "
                         "and the files in ravlt.DOWNSTREAM")
    path = os.path.join(torch.hub.get_dir(), "checkpoints", file)
    if not os.path.exists(path):
        url, part = HUB_URL + file, f"{path}.{os.getpid()}.part"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, part, progress=True)
            if not zipfile.is_zipfile(part):  # a cut-short download goes unnoticed; a whole .pth is a zip
                os.remove(part)
                raise OSError("incomplete file")
            os.replace(part, path)  # only a whole file ever reaches `path`
        except OSError as e:  # offline, HTTP 404, ... (urllib's errors are OSErrors), disk full
            raise RuntimeError(f"cannot download {url} ({e}); put the file at {path} by hand") from None
    return path


def create_model(name, pretrained=None, features_only=False, compile_attn=None, norm_eval=False,
                 out_norm=False, grad_checkpointing=False, **overrides):
    """Build a RAVLT variant: create_model("ravlt_t", num_classes=10, attn=("rala",) * 4), overrides being
    any RAVLTConfig fields. compile_attn: None compiles the attention core on CUDA only, True always (CPU
    via inductor), False never; inside torch.compile(model) the plain core is traced with the rest.
    pretrained: a path, or True for the release's ImageNet-1k file (its `model` weights); a new classifier
      if num_classes is given and differs, the first conv adapted to in_chans. features_only: the four
    stage maps (a backbone); norm_eval: BatchNorm frozen; out_norm (with features_only): the release's
    COCO/ADE20K LayerNorm on each map; grad_checkpointing: see RAVLT.set_grad_checkpointing."""
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(VARIANTS)}")
    if bad := sorted(set(overrides) - {f.name for f in fields(RAVLTConfig)}):
        raise ValueError(f"unknown option(s) {bad} for {name}; valid: {', '.join(f.name for f in fields(RAVLTConfig))}")
    cfg = replace(VARIANTS[name], **overrides)
    cfg, stages = replace(cfg, attn=tuple(cfg.attn)), len(cfg.dims)  # attn: a list is welcome too
    for field in ("depths", "heads", "layer_scale_init", "attn"):
        if len(getattr(cfg, field)) != stages:
            raise ValueError(f"{field} needs one value per stage ({stages}), got {getattr(cfg, field)}")
    path = download_checkpoint(name) if pretrained is True else pretrained
    model = RAVLT(cfg, features_only, compile_attn, norm_eval, out_norm)
    model.set_grad_checkpointing(grad_checkpointing)
    model.pretrained_cfg = dict(
        architecture=name, num_classes=cfg.num_classes, input_size=(cfg.in_chans, 224, 224),
        pool_size=(7, 7), crop_pct=0.875, interpolation="bicubic", mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225), first_conv="patch_embed.proj.0", classifier="head")  # ImageNet's
    if path:
        load_checkpoint(model, path, new_head="num_classes" in overrides)
    return model


@contextlib.contextmanager
def flop_counter():
    """torch's FlopCounterMode, with SDPA on its math path: two matrix products, which the counter
    knows (which fused SDPA kernels it knows differs between torch releases)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        yield counter


def count_macs(model, size=224, batch=1):
    """Multiply-accumulates of one forward (convolutions, matmuls, attention cores), 2 FLOPs each."""
    x = torch.zeros(batch, getattr(model, "in_chans", 3), size, size, device=next(model.parameters()).device)
    was_training = model.training
    with flop_counter() as counter, torch.no_grad():
        model.eval()(x)
    model.train(was_training)
    return counter.get_total_flops() // 2


def main(argv=None):
    parser = argparse.ArgumentParser(description="Print the RAVLT variant table (parameters, GMACs).")
    parser.add_argument("--input-size", type=int, default=224, help="image side in pixels (default 224)")
    args = parser.parse_args(argv)
    if args.input_size < 1:
        parser.error(f"--input-size must be a positive number of pixels, got {args.input_size}")
    print(f"{'model':<11} {'params':>12} {'GMACs@' + str(args.input_size):>10}  attention (stages 1-4)")
    for name in VARIANTS:
        model = create_model(name, compile_attn=False)
        params, gmacs = sum(p.numel() for p in model.parameters()), count_macs(model, args.input_size) / 1e9
        print(f"{name:<11} {params:>12,} {gmacs:>10.3f}  {'/'.join(model.cfg.attn)}")


if __name__ == "__main__":
    main()
