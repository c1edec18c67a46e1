"""
RAVLT, the Rank-Augmented Vision Linear Transformer, in one file.

Paper:   "Breaking the Low-Rank Dilemma of Linear Attention", Qihang Fan, Huaibo Huang, Ran He,
         CVPR 2025, arXiv:2411.07635. Official release: github.com/qhfan/RALA.

Linear attention replaces softmax(Q Kᵀ) V by φ(Q) (φ(K)ᵀ V): the d×d "KV buffer" φ(K)ᵀV is built
once, so cost grows linearly with the number of tokens N instead of quadratically. The price is
rank: the implied N×N attention matrix φ(Q) φ(K)ᵀ has rank ≤ d, and so do the output features.
RALA (Rank-Augmented Linear Attention) restores rank in two places:
  1. the KV buffer: keys are re-weighted by α, a softmax over tokens driven by the mean query,
     so each image builds a differently weighted buffer ("query-aware key weights");
  2. the output features: the attention output is multiplied element-wise by a gate o computed
     from the input, which is no longer confined to a rank-d subspace.
RAVLT is a four-stage convolutional-transformer hybrid built on RALA (RALA in stages 1-2, where N
is large; softmax attention in stages 3-4, where N is small), in four sizes T/S/B/L.

Shape legend: B batch, C channels, H×W feature map, N = H·W tokens (row-major), h heads,
d = C/h head dim. Maps stay (B, C, H, W) between modules, stored channels-last (each token's C
channels side by side, which convolutions and LayerNorm like best); inside attention each head's
tensors are (B, h, d, N) views of that same memory, so no permute ever copies.

State-dict keys are identical to the release's, so its checkpoints load as they are
(`load_checkpoint`). `python ravlt.py` prints the variant table (params, GMACs, attention kinds);
`python ravlt.py --bench` measures speed and memory (see README, "Speed").
"""
import argparse
import importlib.util
import math
import os
import platform
import sys
import time
import weakref
import zipfile
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

try:  # page-fault counts in the benchmark (Unix only)
    import resource
except ImportError:
    resource = None

# -----------------------------------------------------------------------------
# Config: one value per stage in every tuple


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


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ATTENTION_KINDS = ("rala", "softmax")

# -----------------------------------------------------------------------------
# Small helpers


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (the release nests it as `.norm`)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x):
        # The model runs channels-last (see RAVLT.forward_stages), so both permutes are free views
        # and LayerNorm's fused kernel reads each token's C channels contiguously.
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def conv_plus_identity(conv, x):
    """x + conv(x) for a depthwise 3×3 conv, as one conv whose kernel has 1 added at its centre.

    Saves a full read-write pass over x, the widest tensor of a block (inside the FFN).
    """
    identity = torch.zeros_like(conv.weight)  # (C, 1, 3, 3)
    identity[:, :, 1, 1] = 1.0
    return F.conv2d(x, conv.weight + identity, conv.bias, padding=1, groups=conv.groups)


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample, rescale the survivors."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(1.0 - self.p)  # (B, 1, 1, 1)
        return x * (keep / (1.0 - self.p))  # one pass over x, not two


class RoPE2d(nn.Module):
    """2D rotary position embedding. Each channel pair (2i, 2i+1) of a head is read as one complex
    number x_2i + i·x_2i+1; multiplying it by e^{iθ} rotates the pair by the angle θ. Pairs in
    the first half of the head turn with the token's row, pairs in the second half with its column.

    `angle` holds d/4 frequencies θ_m = 10000^(-m/(d/4-1)), each repeated twice: [θ0, θ0, θ1, ...]
    (the release's buffer). forward(H, W) returns the table of e^{iθ} as (cos θ, sin θ) pairs,
    (N, d/2, 2) float32, stored like the channel pairs it multiplies.
    """

    def __init__(self, head_dim):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
        # (d/2,): each θ twice, the release's buffer, kept for its state-dict key
        self.register_buffer("angle", self.frequencies(head_dim).repeat_interleave(2))

    @staticmethod
    def frequencies(head_dim, device=None):
        # 1 / 10000^x rather than 10000^-x: the same bits as the release's buffer
        return 1.0 / 10000.0 ** torch.linspace(0, 1, head_dim // 4, device=device)  # (d/4,)

    def forward(self, H, W):
        # θ and the angles in float32 even in a bf16/fp16 model (θ rounded to bf16 would shift the
        # angles by tenths of a radian far from the origin), so θ is recomputed, not read from `angle`
        theta = self.frequencies(2 * self.angle.shape[0], self.angle.device)  # (d/4,)
        rows = torch.arange(H, device=theta.device, dtype=torch.float32)
        cols = torch.arange(W, device=theta.device, dtype=torch.float32)
        ang_r = (rows[:, None] * theta)[:, None, :].expand(H, W, -1)  # (H, W, d/4)
        ang_c = (cols[:, None] * theta)[None, :, :].expand(H, W, -1)  # (H, W, d/4)
        angle = torch.cat([ang_r, ang_c], dim=-1).flatten(0, 1)  # (N, d/2): token n = r·W + c
        return torch.stack([angle.cos(), angle.sin()], dim=-1)  # (N, d/2, 2): e^{iθ} = cos θ + i·sin θ


def rope(x, rot):
    """Rotate every channel pair of x (..., d, N) by its angle, as a complex product:
    (x_2i + i·x_2i+1)·e^{iθ} gives out[2i] = x[2i]·cos θ - x[2i+1]·sin θ,
                                    out[2i+1] = x[2i+1]·cos θ + x[2i]·sin θ.
    rot is RoPE2d's table, (N, d/2, 2). Autograd differentiates it by itself (by e^{-iθ})."""
    dtype = torch.promote_types(x.dtype, torch.float32)  # bf16/fp16 rotate in float32, float64 stays
    xt = x.to(dtype).transpose(-2, -1)  # (..., N, d): a free view for the model's channels-last maps
    # Read as complex numbers, pairs must be adjacent in memory and start at even offsets
    if xt.stride(-1) != 1 or xt.storage_offset() % 2 or any(s % 2 for s in xt.stride()[:-1]):
        xt = xt.contiguous()
    pairs, rot = xt.unflatten(-1, (-1, 2)), rot.to(dtype)  # (..., N, d/2, 2): real, imaginary parts
    if torch.compiler.is_compiling():  # inductor emits no code for complex numbers: spell it out
        re, im, cos, sin = pairs[..., 0], pairs[..., 1], rot[..., 0], rot[..., 1]
        out = torch.stack((re * cos - im * sin, im * cos + re * sin), dim=-1)  # (..., N, d/2, 2)
    else:  # eager: one vectorised complex multiplication (the real form above is 7 kernels)
        product = torch.view_as_complex(pairs) * torch.view_as_complex(rot)  # (..., N, d/2) complex
        out = torch.view_as_real(product)  # (..., N, d/2, 2)
    return out.flatten(-2).to(x.dtype).transpose(-2, -1)  # (..., N, d) -> (..., d, N)


LOG2_E = math.log2(math.e)


class _Phi(torch.autograd.Function):
    # ELU(x) + 1 is exp(x) below 0 and x + 1 above, i.e. exp(min(x, 0)) + max(x, 0). Written so
    # for speed: torch's CPU exp calls MKL's vsExp (ATen/cpu/vml.h), which on the AMD machine of
    # README's figures ran ~4x slower than exp2, and F.elu slower still (the bench's "φ" line
    # compares), so on CPU e^m is 2^(m·log2 e); in bf16/fp16 rounding m·log2 e would cost too
    # much, and GPUs have a fast exp. The derivative is min(φ, 1), so backward keeps only φ,
    # which the attention keeps anyway (ELU's own backward would keep x as well).
    generate_vmap_rule = True  # element-wise, so torch.func.vmap can batch it by itself

    @staticmethod
    def forward(x):
        m = x.clamp(max=0)
        fast_exp2 = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
        exp_m = m.mul_(LOG2_E).exp2_() if fast_exp2 else m.exp_()
        return exp_m.add_(x.clamp(min=0))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * y.clamp(max=1.0)

    @staticmethod
    def jvp(ctx, x_dot):  # forward-mode AD (torch.func.jvp) with the same derivative
        (y,) = ctx.saved_tensors
        return x_dot * y.clamp(max=1.0)


def phi(x):
    """The linear-attention feature map φ(x) = ELU(x) + 1 (positive, so the normaliser is > 0)."""
    return _Phi.apply(x)


# -----------------------------------------------------------------------------
# Attention: RALA (linear and explicit N×N forms) and softmax attention


def rala(q, k, v, rot, eps=1e-6):
    """Rank-Augmented Linear Attention in O(N·d²) per head.

    | paper    | variable        | shape          | meaning                                    |
    |----------|-----------------|----------------|--------------------------------------------|
    | Q, K, V  | q, k, v         | (B, h, d, N)   | per-head queries, keys, values             |
    | φ(Q)     | phi_q           | (B, h, d, N)   | ELU + 1 of the queries                     |
    | q̄        | q_bar           | (B, h, d, 1)   | mean query of the image                    |
    | α        | alpha           | (B, h, 1, N)   | query-aware key weights, sum to 1 over N   |
    | K̃        | k_tilde         | (B, h, d, N)   | re-weighted keys φ(k_j)·α_j·N              |
    | z        | z               | (B, h, 1, N)   | normaliser 1 / (φ(q_i)·mean_j K̃_j)         |
    | S        | kv              | (B, h, d, d)   | the KV buffer Σ_j RoPE(K̃_j)ᵀ v_j / N       |
    | Y        | y               | (B, h, d, N)   | output, before the gate o and LePE         |
    | e^{iθ}   | rot             | (N, d/2, 2)    | RoPE's rotation of each channel pair       |
    """
    N = q.shape[-1]
    scale = q.shape[-2] ** -0.5
    dtype = v.dtype
    # Sums over N tokens and the 1/(…) normaliser lose too much precision in bf16/fp16,
    # so the whole core runs in float32 even under autocast (it is a small share of the FLOPs).
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = q.float(), k.float(), v.float()
        phi_q, phi_k = phi(q), phi(k)  # (B, h, d, N)
        # 1. KV-buffer rank augmentation: weight each key by how well it matches the mean query
        q_bar = phi_q.mean(-1, keepdim=True)  # (B, h, d, 1)
        alpha = torch.softmax(scale * q_bar.transpose(-2, -1) @ phi_k, dim=-1)  # (B, h, 1, N)
        k_tilde = phi_k * (alpha * N)  # (B, h, d, N); ×N keeps the mean weight at 1
        del phi_k  # free what is done: the N×d temporaries below set the layer's peak memory
        # 2. Normaliser from the un-rotated φ(q) (RoPE could make the dot product negative)
        z = 1.0 / (k_tilde.mean(-1, keepdim=True).transpose(-2, -1) @ phi_q + eps)  # (B, h, 1, N)
        # 3. Relative position enters through RoPE on both sides of the product, and
        # 4. the KV buffer: one d×d matrix per head. This contraction is the linear complexity.
        kv = rope(k_tilde, rot) @ v.transpose(-2, -1) / N  # (B,h,d,N) @ (B,h,N,d) -> (B,h,d,d)
        del k_tilde
        # 5. Read the buffer with every rotated query and normalise (in place: one temporary fewer).
        #    Token-major (N, d) rows, like SDPA's output, so the result is channels-last memory.
        q_rot = rope(phi_q, rot)  # (B, h, d, N)
        y = (q_rot.transpose(-2, -1) @ kv).mul_(z.transpose(-2, -1))  # (B,h,N,d) @ (B,h,d,d) -> (B,h,N,d)
    return y.transpose(-2, -1).to(dtype)  # (B, h, d, N)


def rala_matrix(q, k, rot, eps=1e-6):
    """The same RALA equations written as an explicit N×N attention matrix A, with Y = V Aᵀ.

    A_ij = z_i · RoPE(φ(q_i)) · RoPE(K̃_j) / N. O(N²·d): for teaching, rank analysis and tests.
    Rows need not sum to 1: z uses the un-rotated queries, A the rotated ones.
    """
    N, scale = q.shape[-1], q.shape[-2] ** -0.5
    with torch.autocast(q.device.type, enabled=False):
        q, k = q.float(), k.float()
        phi_q, phi_k = phi(q), phi(k)  # (B, h, d, N)
        alpha = torch.softmax(scale * phi_q.mean(-1, keepdim=True).transpose(-2, -1) @ phi_k, -1)
        k_tilde = phi_k * (alpha * N)  # (B, h, d, N)
        z = 1.0 / (k_tilde.mean(-1, keepdim=True).transpose(-2, -1) @ phi_q + eps)  # (B, h, 1, N)
        q_rot, k_rot = rope(phi_q, rot), rope(k_tilde, rot)  # (B, h, d, N)
        scores = q_rot.transpose(-2, -1) @ k_rot / N  # (B, h, N, d) @ (B, h, d, N) -> (B, h, N, N)
        return scores * z.transpose(-2, -1)  # (B, h, N, N), row i scaled by z_i


def softmax_attention(q, k, v, rot):
    """Softmax attention with RoPE on q and k (stages 3-4): Y = softmax(d^-½ q kᵀ) v."""
    q, k = rope(q, rot), rope(k, rot)  # (B, h, d, N)
    q, k, v = (t.transpose(-2, -1) for t in (q, k, v))  # (B, h, N, d)
    # SDPA's fused kernels never build the N×N matrix, but they need the head dim contiguous: true
    # for the model's channels-last views, not for a (B, h, d, N)-contiguous tensor (math fallback)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(-2, -1)  # (B, h, N, d) -> (B, h, d, N)


def softmax_matrix(q, k, rot):
    """The explicit softmax attention matrix (B, h, N, N), for comparison with `rala_matrix`."""
    q, k = rope(q, rot), rope(k, rot)  # (B, h, d, N)
    return torch.softmax(q.transpose(-2, -1) @ k * q.shape[-2] ** -0.5, dim=-1)  # (B, h, N, N)


_CORES = {"rala": rala, "softmax": softmax_attention}
_compiled_cores = {}


def _compiled(kind):
    # Compiled once per kind and shared by all layers; inductor fuses RALA's element-wise chain
    # (φ, α weighting, RoPE, normaliser) into a few kernels around the two matmuls.
    if kind not in _compiled_cores:
        _compiled_cores[kind] = torch.compile(_CORES[kind], dynamic=None)
    return _compiled_cores[kind]


class Attention(nn.Module):
    """The frame both attention kinds share: proj(o ⊙ (Y + LePE(v))), with q, k, v, o from one conv."""

    def __init__(self, dim, num_heads, kind="rala", compile_attn=None):
        super().__init__()
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"attention kind must be one of {ATTENTION_KINDS}, got {kind!r}")
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.kind, self.num_heads, self.compile_attn = kind, num_heads, compile_attn
        self.qkvo = nn.Conv2d(dim, 4 * dim, 1)  # channel groups q | k | v | o, heads major inside
        self.lepe = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)  # local positional term on v
        self.proj = nn.Conv2d(dim, dim, 1)

    def heads(self, x):
        """q, k, v, o from the one qkvo conv: q, k, v as (B, h, d, N) per head, o as (B, C, H, W)."""
        B, C, H, W = x.shape
        q, k, v, o = self.qkvo(x).chunk(4, dim=1)  # 4 × (B, C, H, W)
        q, k, v = (t.reshape(B, self.num_heads, C // self.num_heads, H * W) for t in (q, k, v))
        return q, k, v, o  # (B, h, d, N) ×3, (B, C, H, W)

    def forward(self, x, rot):
        B, C, H, W = x.shape
        use_compiled = x.is_cuda if self.compile_attn is None else self.compile_attn
        core = _compiled(self.kind) if use_compiled else _CORES[self.kind]
        q, k, v, o = self.heads(x)
        y = core(q, k, v, rot).reshape(B, C, H, W)  # (B, h, d, N) -> (B, C, H, W), heads major
        y = y + self.lepe(v.reshape(B, C, H, W))  # local positional term, from v
        # Output-feature rank augmentation: the element-wise gate o lifts Y out of its rank-d space.
        return self.proj(o * y)

    @torch.no_grad()
    def attention_matrix(self, x, rot):
        """The N×N matrix this layer applies to v, (B, h, N, N): for inspection and teaching."""
        q, k, _, _ = self.heads(x)
        return rala_matrix(q, k, rot) if self.kind == "rala" else softmax_matrix(q, k, rot)


# -----------------------------------------------------------------------------
# Blocks and stages


class FFN(nn.Module):
    """conv1×1 -> GELU -> (+ depthwise conv3×3) -> conv1×1."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        x = F.gelu(self.fc1(x))  # (B, F, H, W)
        return self.fc2(x + self.dwconv(x))  # (B, C, H, W)


class Block(nn.Module):
    """x += CPE(x); x += γ1·Attention(LN(x)); x += γ2·FFN(LN(x)), each branch with DropPath."""

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
        x = x + self.pos(x)  # not folded like the FFN's: the residual stream stays fp32 under autocast
        # addcmul computes x + γ·branch in one pass (DropPath commutes with the per-channel γ)
        x = torch.addcmul(x, self.gamma_1, self.drop_path(self.attn(self.norm1(x), rot)))
        return torch.addcmul(x, self.gamma_2, self.drop_path(self.ffn(self.norm2(x))))


class Downsample(nn.Module):
    """conv3×3 stride 2 + BatchNorm between stages: H, W -> ceil(H/2), ceil(W/2)."""

    def __init__(self, dim, out_dim):
        super().__init__()
        self.reduction = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x):
        return self.norm(self.reduction(x))


class Stage(nn.Module):
    """Blocks at one resolution; the RoPE tables are computed once per forward and shared."""

    def __init__(self, dim, out_dim, depth, num_heads, kind, mlp_ratio, drop_paths, layer_scale,
                 compile_attn):
        super().__init__()
        self.RoPE = RoPE2d(dim // num_heads)  # attribute name kept for the release's state-dict keys
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, kind, mlp_ratio, p, layer_scale, compile_attn) for p in drop_paths
        )
        self.downsample = Downsample(dim, out_dim) if out_dim else None

    def forward(self, x):
        rot = self.RoPE(*x.shape[-2:])  # (N, d/2, 2)
        for block in self.blocks:
            x = block(x, rot)
        return x


def stem(in_chans, dim):
    """Four conv3×3 + BN (GELU between): stride 4, in_chans -> dim. Indices match the release."""
    half = dim // 2
    return nn.Sequential(
        nn.Conv2d(in_chans, half, 3, 2, 1), nn.BatchNorm2d(half), nn.GELU(),
        nn.Conv2d(half, half, 3, 1, 1), nn.BatchNorm2d(half), nn.GELU(),
        nn.Conv2d(half, half, 3, 1, 1), nn.BatchNorm2d(half), nn.GELU(),
        nn.Conv2d(half, dim, 3, 2, 1), nn.BatchNorm2d(dim),
    )


# -----------------------------------------------------------------------------
# The model


class RAVLT(nn.Module):
    def __init__(self, cfg: RAVLTConfig, features_only=False, compile_attn=None, norm_eval=False,
                 out_norm=False):
        super().__init__()
        if out_norm and not features_only:
            raise ValueError("out_norm=True needs features_only=True")
        self.cfg, self.features_only, self.norm_eval = cfg, features_only, norm_eval
        self.num_classes, self.in_chans = cfg.num_classes, cfg.in_chans
        self.feature_channels = tuple(cfg.dims)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = stem(cfg.in_chans, cfg.dims[0])
        n = sum(cfg.depths)
        rates = [cfg.drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # linear from 0
        self.layers = nn.ModuleList()
        for i, depth in enumerate(cfg.depths):
            first = sum(cfg.depths[:i])
            self.layers.append(Stage(
                cfg.dims[i], cfg.dims[i + 1] if i + 1 < len(cfg.dims) else None, depth, cfg.heads[i],
                cfg.attn[i], cfg.mlp_ratio, rates[first:first + depth], cfg.layer_scale_init[i],
                compile_attn))
        self.num_features, self.head_hidden_size = cfg.dims[-1], cfg.head_hidden
        if out_norm:  # the release's COCO/ADE20K backbones: a LayerNorm on each stage output
            self.extra_norms = nn.ModuleList(LayerNorm2d(dim) for dim in cfg.dims)
        if not features_only:  # classification head: conv1×1 + BN + SiLU, pool, conv1×1
            self.proj = nn.Conv2d(cfg.dims[-1], cfg.head_hidden, 1)
            self.norm = nn.BatchNorm2d(cfg.head_hidden)
            self.act = nn.SiLU()
            self.reset_classifier(cfg.num_classes)
        self.apply(self._init_weights)
        # Weights in the activations' channels-last layout too, so that backward does not convert
        # every weight gradient between layouts (1×1 and 1-D parameters are unaffected).
        self.to(memory_format=torch.channels_last)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Conv2d):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def train(self, mode=True):
        # norm_eval: BatchNorm keeps its ImageNet statistics while a detector trains on 2 images
        # per GPU (as the release's detection backbone does); its affine weights still learn.
        super().train(mode)
        if self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def reset_classifier(self, num_classes):
        self.num_classes = num_classes
        self.head = nn.Conv2d(self.head_hidden_size, num_classes, 1) if num_classes else nn.Identity()
        self._init_weights(self.head)

    def _check_input(self, x):
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"RAVLT expects input of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")

    def forward_stages(self, x):
        """The four stage outputs (strides 4, 8, 16, 32, rounded up), taken before downsampling."""
        self._check_input(x)
        # Channels-last memory (shape unchanged): oneDNN convolutions run faster on it, and
        # LayerNorm over channels becomes a contiguous reduction.
        x = self.patch_embed.proj(x.contiguous(memory_format=torch.channels_last))  # (B, C1, H/4, W/4)
        features = []
        for stage in self.layers:
            x = stage(x)
            features.append(x)
            if stage.downsample is not None:
                x = stage.downsample(x)  # (B, C_{i+1}, H_i/2, W_i/2)
        return features

    def forward_features(self, x):
        return self.forward_stages(x)[-1]  # (B, C4, H/32, W/32)

    def forward_head(self, x, pre_logits=False):
        x = self.act(self.norm(self.proj(x)))  # (B, 1024, H/32, W/32)
        x = x.mean((2, 3), keepdim=True)  # (B, 1024, 1, 1)
        return x.flatten(1) if pre_logits else self.head(x).flatten(1)  # (B, 1024) or (B, classes)

    def forward(self, x):
        if self.features_only:  # [(B, C_i, H/2^(i+2), W/2^(i+2)) for i in 0..3]
            features = self.forward_stages(x)
            norms = getattr(self, "extra_norms", [nn.Identity()] * len(features))
            return [norm(f) for norm, f in zip(norms, features)]
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def attention_matrices(self, x, stage=0, block=0):
        """The (B, h, N, N) attention matrix that block `block` of stage `stage` applies to x."""
        if not (0 <= stage < len(self.layers) and 0 <= block < len(self.layers[stage].blocks)):
            raise ValueError(f"no block {block} in stage {stage}; depths are {self.cfg.depths}")
        attn, seen = self.layers[stage].blocks[block].attn, {}
        # run the real forward (eval mode: BatchNorm statistics untouched) and catch attn's input
        hook = attn.register_forward_pre_hook(lambda module, args: seen.setdefault("args", args))
        was_training = self.training
        try:
            self.eval().forward_stages(x)
        finally:
            hook.remove()
            self.train(was_training)
        return attn.attention_matrix(*seen["args"])


# -----------------------------------------------------------------------------
# Checkpoints


def read_checkpoint(path):
    """torch.load for checkpoints: a checkpoint is data, not code, so only tensors, containers and
    argparse.Namespace (the release's files hold one under `args`) may load (weights_only=True).
    A file that is not one raises ValueError saying why: a directory, empty, truncated, other data."""
    import zipfile

    try:
        with open(path, "rb") as f:  # FileNotFoundError for a missing file
            head = f.read(4)
    except IsADirectoryError:
        raise ValueError(f"checkpoint {path} is a directory, not a file") from None
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
        reason = unsafe[0] if unsafe else lines[0]  # weights_only's point is on one line of many
        raise ValueError(f"cannot read checkpoint {path}: {reason}") from None


def _state_dict(ckpt, name, use_ema):
    """The model weights inside a release .pth, a training checkpoint of ours, or a plain state dict."""
    if not isinstance(ckpt, dict):
        raise ValueError(f"{name} holds a {type(ckpt).__name__}, expected a dict")
    ckpt = _backbone_weights(ckpt)
    if use_ema and "model_ema" not in ckpt:
        raise ValueError(f"{name} has no 'model_ema' entry")
    sd = ckpt.get("model_ema" if use_ema else "model", ckpt)
    if not sd or not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{name} holds no state dict (keys: {list(ckpt)[:5]})")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}  # DDP, compile


def _backbone_weights(ckpt):
    """An mmdetection / mmsegmentation file (the release's COCO and ADE20K models) keeps its weights
    under `state_dict`, the backbone's prefixed `backbone.`: keep those, drop the neck's and heads'."""
    sd = ckpt.get("state_dict")
    if not isinstance(sd, dict) or not any(k.startswith("backbone.") for k in sd):
        return ckpt
    return {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}


def load_checkpoint(model, checkpoint, use_ema=False, new_head=True):
    """Load weights into `model` strictly; returns the model. `checkpoint`: a path, or a dict
    already read with `read_checkpoint` (so that a large file is read once).

    Accepts the release's RAVLT_{T,S,B,L}.pth (dict with `model`, `model_ema`, `optimizer`, ...,
    `args`), this project's training checkpoints, plain state dicts, and the backbone of the
    release's mmdetection / mmsegmentation files (features-only models). A features-only model
    ignores the classification head; a model with another number of classes (or none) keeps its own
    head, unless new_head=False, which refuses such a checkpoint (evaluation needs its head).
    Weights that do not fit raise ValueError: another variant's are named as such.
    """
    is_dict = isinstance(checkpoint, dict)
    name = "the checkpoint" if is_dict else f"checkpoint {checkpoint}"
    ckpt = checkpoint if is_dict else read_checkpoint(checkpoint)
    sd, own = _state_dict(ckpt, name, use_ema), model.state_dict()
    top = ("proj.", "norm.", "head.")  # the classifier, which a features-only model lacks

    def body(state):  # the backbone's shapes (out-norms aside: a detector's own addition)
        return {k: v.shape for k, v in state.items() if not k.startswith((*top, "extra_norms."))}

    arch = getattr(model, "pretrained_cfg", {}).get("architecture", "this model")
    if arch in VARIANTS and body(sd) != body(own):  # another variant? its name as recorded, or by shapes
        args = ckpt.get("args")
        args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
        config = ckpt.get("model_config") if isinstance(ckpt.get("model_config"), dict) else {}
        held = str(config.get("name") or args.get("model") or "").lower()  # ours, or the release's RAVLT_T
        if held not in VARIANTS:
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
            raise ValueError(f"{name} classifies {sd['head.weight'].shape[0]} classes, the model "
                             f"{model.num_classes}")
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        sd.update({k: v for k, v in own.items() if k.startswith("head.")})  # fine-tuning: new head
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
              for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"{label} ({len(items)}): {', '.join(items[:3])}" for label, items in
                 (("shape mismatch", shapes), ("missing", missing), ("unexpected", unexpected)) if items]
        raise ValueError(f"{name} does not fit {arch}; " + "; ".join(parts))
    model.load_state_dict(sd)
    return model


# -----------------------------------------------------------------------------
# Variants


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


RELEASED = ("ravlt_t", "ravlt_s", "ravlt_b", "ravlt_l")  # the variants with official checkpoints
HUB_URL = "https://huggingface.co/aldjalkdf/RAVLT/resolve/main/"  # the release's files
PRETRAINED = {name: f"RAVLT_{name[-1].upper()}.pth" for name in RELEASED}  # ImageNet-1k classifiers
DOWNSTREAM = [f"{model}_{size}_{schedule}.pth" for model, sizes, schedule in [  # COCO, ADE20K models
    ("retinanet", "tsbl", "1x_12_epoch"), ("maskrcnn", "tsbl", "1x_12_epoch"), ("fpn", "tsbl", "1x"),
    ("maskrcnn", "sbl", "3x_36_epoch"), ("Casmaskrcnn", "sbl", "3x_36_epoch"), ("uper", "sbl", "2x")]
    for size in sizes]


def download_checkpoint(name):
    """Local path of a release file: "ravlt_t" (RAVLT_T.pth, ImageNet-1k) or a DOWNSTREAM file name.
    Kept where torchvision keeps its weights, torch.hub.get_dir()/checkpoints ($TORCH_HOME/hub):
    downloaded once with a progress bar, then read from there without any network."""
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
            if not zipfile.is_zipfile(part):  # torch keeps a body cut short; a .pth zip ends whole
                os.remove(part)
                raise OSError("incomplete file")
            os.replace(part, path)  # only a whole file ever reaches `path`
        except OSError as e:  # offline, HTTP 404, ... (urllib's errors are OSErrors), disk full
            raise RuntimeError(f"cannot download {url} ({e}); put the file at {path} by hand") from None
    return path


def create_model(name, pretrained=None, features_only=False, compile_attn=None, norm_eval=False,
                 out_norm=False, **overrides):
    """Build a RAVLT variant: create_model("ravlt_t", num_classes=10, attn=("rala",) * 4).

    overrides: any RAVLTConfig field (num_classes, in_chans, drop_path_rate, attn, ...).
    compile_attn: None compiles the attention on CUDA only, True always (CPU via inductor), False never.
    pretrained: a checkpoint's path (see load_checkpoint), or True: the release's ImageNet-1k file
      (download_checkpoint), its `model` weights, which the release itself fine-tunes from (its
      main.py --finetune); its paper's accuracy is the best epoch of `model` and `model_ema` alike.
    features_only: forward returns the four stage maps (a backbone); norm_eval: BatchNorm frozen;
    out_norm (with features_only): a LayerNorm on each map, as the release's COCO/ADE20K backbones.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(VARIANTS)}")
    valid = {f.name for f in fields(RAVLTConfig)}
    if bad := sorted(set(overrides) - valid):
        raise ValueError(f"unknown option(s) {bad} for {name}; valid: {', '.join(sorted(valid))}")
    cfg = replace(VARIANTS[name], **overrides)
    stages = len(cfg.dims)
    for field in ("depths", "heads", "layer_scale_init"):
        if len(getattr(cfg, field)) != stages:
            raise ValueError(f"{field} needs one value per stage ({stages}), got {getattr(cfg, field)}")
    attn = tuple(cfg.attn)
    if len(attn) != stages or any(a not in ATTENTION_KINDS for a in attn):
        raise ValueError(f"attn must be {stages} values from {ATTENTION_KINDS}, got {attn}")
    path = download_checkpoint(name) if pretrained is True else pretrained
    model = RAVLT(replace(cfg, attn=attn), features_only, compile_attn, norm_eval, out_norm)
    model.pretrained_cfg = dict(
        architecture=name, num_classes=cfg.num_classes, input_size=(cfg.in_chans, 224, 224),
        pool_size=(7, 7), crop_pct=0.875, interpolation="bicubic", mean=IMAGENET_MEAN,
        std=IMAGENET_STD, first_conv="patch_embed.proj.0", classifier="head")
    if path:
        load_checkpoint(model, path)
    return model


def flop_counter():
    """torch's FlopCounterMode, with one formula for every fused SDPA kernel: which of them torch's
    counter knows differs between releases. Q Kᵀ and A V cost N·M·d multiply-adds each per head."""
    from torch.utils.flop_counter import FlopCounterMode

    def sdpa_flops(q, k, v, *args, **kwargs):  # shapes: q (B, h, N, d), k (B, h, M, d), v (B, h, M, dv)
        return 2 * math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])

    kernels = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
               "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
               "_scaled_dot_product_fused_attention_overrideable")
    sdpa = {getattr(torch.ops.aten, k): sdpa_flops for k in kernels if hasattr(torch.ops.aten, k)}
    return FlopCounterMode(display=False, custom_mapping=sdpa)


def count_macs(model, size=224, batch=1):
    """Multiply-accumulates of one forward (convolutions, matmuls, attention cores), 2 FLOPs each."""
    param = next(model.parameters())
    x = torch.zeros(batch, getattr(model, "in_chans", 3), size, size, device=param.device)
    was_training = model.training
    with flop_counter() as counter, torch.no_grad():
        model.eval()(x)
    model.train(was_training)
    return counter.get_total_flops() // 2


def variant_table(size=224):
    """Rows (name, params, GMACs at size×size, attention kind per stage) for every variant."""
    rows = []
    for name in VARIANTS:
        model = create_model(name, compile_attn=False)
        params = sum(p.numel() for p in model.parameters())
        rows.append((name, params, count_macs(model, size) / 1e9, "/".join(model.cfg.attn)))
    return rows


# -----------------------------------------------------------------------------
# Benchmark: `python ravlt.py --bench` (see README, "Speed")


def _machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # Linux names the CPU model here; elsewhere fall back to the platform module
        with open("/proc/cpuinfo") as f:
            return next(l.split(":")[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def _minor_faults():
    """Page faults of this process so far (first touches of memory the OS must map; nan off Unix)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else math.nan


def _measure(fns, device, repeats):
    """(best seconds per call, extra peak MB, page faults per call) of each fn. A warm-up call each
    (which also compiles) sets how many calls one timing spans (>= 50 ms, so that short calls are
    timed reliably); the timings of the fns are interleaved, so that a change of load on the
    machine hits all alike. Faults are averaged over all timed calls: a freed block that the
    allocator gave back to the OS is faulted in again, page by page, when reused (see README)."""
    def timed(fn, calls):
        torch.cuda.synchronize() if device.type == "cuda" else None
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize() if device.type == "cuda" else None
        return (time.perf_counter() - start) / calls

    calls = [max(1, math.ceil(0.05 / timed(fn, 1))) for fn in fns]
    best, faults = [math.inf] * len(fns), [0] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = _minor_faults()
            best[i] = min(best[i], timed(fn, calls[i]))
            faults[i] += _minor_faults() - start
    return [(t, _peak_mb(fn, device), f / (repeats * c)) for t, fn, f, c in zip(best, fns, faults, calls)]


class _LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensors created while active: each op's new output storages are counted
    until freed. Scratch buffers private to a kernel (oneDNN's, for one) are not seen."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.known = set()  # storages seen as inputs or outputs: counted once, or not at all

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        self.known.update(t.untyped_storage()._cdata for t in tensors)  # older tensors: not counted
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            storage = t.untyped_storage() if isinstance(t, torch.Tensor) else None
            if storage is not None and storage._cdata not in self.known:
                self.known.add(storage._cdata)
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, storage._cdata, storage.nbytes())
        return out

    def _free(self, key, nbytes):
        self.known.discard(key)
        self.live -= nbytes


def _peak_mb(fn, device):
    """Extra memory at the peak of one call of fn, in MB (tensors only; see _LiveTensorBytes)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with _LiveTensorBytes() as tracker:
        fn()
    return tracker.peak / 2**20


def bench(variants=("ravlt_t", "ravlt_s"), size=224, batch=16, train_batch=8,
          layer_sides=(14, 28, 56, 112), highres=((512, 512), (1024, 1024), (800, 1333)), repeats=3,
          device="cpu", compile=False, amp=False, release_file=None, sections=("models", "layer", "highres"),
          references=None):
    """Print speed and memory: whole models, the attention layer alone, and high-resolution backbones.
    references: optional {name: image model} timed like the variants, as a yardstick for GMAC/s."""
    device = torch.device(device)
    release = None
    if release_file:  # the official RALA.py, loaded from the user's copy (it needs timm, einops, fvcore)
        spec = importlib.util.spec_from_file_location("release_rala", release_file)
        release = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = release  # timm's model registry looks the module up there
        spec.loader.exec_module(release)

    def run(fn, grad=False):  # fn under the benchmark's precision, without autograd unless training
        def call():
            with torch.set_grad_enabled(grad), torch.autocast(device.type, torch.bfloat16, enabled=amp):
                return fn()
        return call

    def twin(name, **kw):  # the release's model (when given) and ours, with the same weights
        ref = getattr(release, "RAVLT_" + name[-1].upper())() if release and name in RELEASED else None
        ours = create_model(name, compile_attn=False, **kw)
        if ref is not None:
            ours.load_state_dict(ref.state_dict(), strict=not ours.features_only)
        return ref, ours

    print(f"{_machine(device)} | {torch.get_num_threads()} threads | torch {torch.__version__} | "
          f"{'bf16 autocast' if amp else 'fp32'} | best of {repeats} | MB: extra peak memory | "
          f"x: speed-up over each model's first row | faults: page faults per call (host memory)")
    if "models" in sections:
        print(f"\n{'model':<15}{'path':<12}{'GMACs':>6}{'infer img/s':>12}{'GMAC/s':>7}{'x':>6}{'MB':>6}"
              f"{'faults':>8}{'train img/s':>12}{'x':>6}{'MB':>6}{'faults':>8}")
        x = torch.randn(batch, 3, size, size, device=device)
        xt, target = x[:train_batch], torch.randint(0, 1000, (train_batch,), device=device)

        def time_models(name, paths, macs):  # one row per path: inference, then training step
            infer, train = [], []
            for model in paths.values():
                model.to(device)
                opt = torch.optim.AdamW(model.parameters())

                def train_step(model=model, opt=opt):  # forward + backward + AdamW
                    F.cross_entropy(model.train()(xt), target).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                infer.append(run(lambda model=model: model.eval()(x)))
                train.append(run(train_step, grad=True))
            rows = zip(paths, _measure(infer, device, repeats), _measure(train, device, repeats))
            for i, (path, (t_inf, mb_inf, pf_inf), (t_train, mb_train, pf_train)) in enumerate(rows):
                if i == 0:
                    base_inf, base_train = t_inf, t_train
                print(f"{name:<15}{path:<12}{macs:>6.2f}{batch / t_inf:>12.1f}{macs * batch / t_inf:>7.0f}"
                      f"{base_inf / t_inf:>6.2f}{mb_inf:>6.0f}{pf_inf:>8.0f}{train_batch / t_train:>12.2f}"
                      f"{base_train / t_train:>6.2f}{mb_train:>6.0f}{pf_train:>8.0f}")

        for name in variants:
            ref, ours = twin(name)
            paths = {"release": ref, "eager": ours} if ref is not None else {"eager": ours}
            if compile:
                paths["compiled"] = create_model(name, compile_attn=True)
                paths["compiled"].load_state_dict(ours.state_dict())
            time_models(name, paths, count_macs(ours, size) / 1e9)
        for name, model in (references or {}).items():  # e.g. a convnet of similar cost (README)
            model = model.to(memory_format=torch.channels_last)
            time_models(name, {"reference": model}, count_macs(model, size) / 1e9)

    if "layer" in sections:
        print(f"\nattention layer alone (C=64, 1 head, batch 1, inference): ms | extra peak MB | faults")
        print(f"{'side':>5}{'tokens':>8}{'RALA':>22}{'softmax (SDPA)':>22}"
              + ("          release RALA  x (release / ours)" if release else ""))
        cl = torch.channels_last
        for side in layer_sides:
            xl = torch.randn(1, side, side, 64, device=device).permute(0, 3, 1, 2)  # channels-last
            # the layers as the model runs them: channels-last weights, like the activations
            rala_layer = Attention(64, 1, "rala", compile_attn=False).to(device, memory_format=cl)
            softmax_layer = Attention(64, 1, "softmax", compile_attn=False).to(device, memory_format=cl)
            rot = RoPE2d(64).to(device)(side, side)  # (N, d/2, 2)
            calls = [run(lambda: rala_layer(xl, rot)), run(lambda: softmax_layer(xl, rot))]
            if release:  # the release's layer, same weights; it takes (x, sin, cos) from its own RoPE
                rel_layer = release.GateLinearAttentionNoSilu(64, 1).to(device)
                rel_layer.load_state_dict(rala_layer.state_dict())
                rel_sin, rel_cos = release.RoPE(64, 1).to(device)((side, side))
                calls.append(run(lambda: rel_layer(xl, rel_sin, rel_cos)))
            results = _measure(calls, device, repeats)
            print(f"{side:>5}{side * side:>8}"
                  + "".join(f"{t * 1e3:>9.2f} |{mb:>4.0f} |{pf:>5.0f}" for t, mb, pf in results)
                  + (f"{results[2][0] / results[0][0]:>8.2f}" if release else ""))
        # the exponential's speed varies across machines and builds (see _Phi); this makes it visible
        xl = torch.randn(1, 64, max(layer_sides) ** 2, device=device)  # (1, C, N) at the largest side
        fns = [lambda: F.elu(xl) + 1, lambda: phi(xl), lambda: torch.exp(xl), lambda: torch.exp2(xl)]
        ms = [t * 1e3 for t, _, _ in _measure([run(fn) for fn in fns], device, repeats)]
        print(f"φ on the largest map: F.elu(x) + 1 {ms[0]:.2f} ms, ravlt.phi {ms[1]:.2f} ms; "
              f"torch.exp {ms[2]:.2f} ms, torch.exp2 {ms[3]:.2f} ms")

    if "highres" in sections:
        ref, hybrid = twin(variants[0], features_only=True)
        linear = create_model(variants[0], features_only=True, compile_attn=False, attn=("rala",) * 4)
        linear.load_state_dict(hybrid.state_dict())
        backbones = [hybrid.eval().to(device), linear.eval().to(device)]
        if ref is not None:  # the release's backbone: its stem and four stages
            ref.eval().to(device)
            backbones.append(nn.Sequential(ref.patch_embed, *ref.layers))
        print(f"\nhigh resolution, batch 1, inference, {variants[0]} backbone (features_only): "
              "s | extra peak MB | faults")
        print(f"{'input':>10}{'hybrid':>22}{'fully linear':>22}"
              + ("              release" if ref is not None else ""))
        for h, w in highres:
            xh = torch.randn(1, 3, h, w, device=device)
            results = _measure([run(lambda b=b: b(xh)) for b in backbones], device, repeats)
            print(f"{h}x{w}".rjust(10) + "".join(f"{t:>8.3f} |{mb:>4.0f} |{pf:>6.0f}" for t, mb, pf in results))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Print the RAVLT variant table; --bench: speed, memory.")
    parser.add_argument("--input-size", type=int, default=224, help="image side in pixels (default 224)")
    parser.add_argument("--bench", action="store_true", help="measure speed and memory (see README)")
    parser.add_argument("--quick", action="store_true", help="with --bench: tiny sizes, a smoke test")
    parser.add_argument("--variants", nargs="+", default=["ravlt_t", "ravlt_s"], choices=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=16, help="inference batch (training uses half)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (best kept)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true",
                        help="also time compile_attn=True (always on CUDA)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--sections", nargs="+", default=["models", "layer", "highres"],
                        choices=["models", "layer", "highres"], help="parts of the benchmark to run")
    parser.add_argument("--release-file", help="path of the release's RALA.py, to time it side by side"
                        " on the same weights (needs timm, einops and fvcore installed)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.bench:
        compile = args.compile or args.device.startswith("cuda")
        if args.quick:  # every code path once, in seconds
            bench(("ravlt_nano",), 64, 2, 2, (8, 16), ((64, 64), (96, 128)), 1, args.device, compile,
                  args.amp, args.release_file, args.sections)
        else:
            bench(args.variants, args.input_size, args.batch, max(1, args.batch // 2),
                  repeats=args.repeats, device=args.device, compile=compile, amp=args.amp,
                  release_file=args.release_file, sections=args.sections)
        return
    print(f"{'model':<11} {'params':>12} {'GMACs@' + str(args.input_size):>10}  attention (stages 1-4)")
    for name, params, gmacs, kinds in variant_table(args.input_size):
        print(f"{name:<11} {params:>12,} {gmacs:>10.3f}  {kinds}")


if __name__ == "__main__":
    main()
