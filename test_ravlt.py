# ---- ravlt.py: the model ----
# Fast CPU tests of RALA and RAVLT. Oracles are written here from the spec's equations, independently
# of ravlt.py's (B, h, d, N) layout: tokens-major (B, h, N, d) tensors and explicit rotation matrices.
import argparse
import ast
import datetime
import importlib.util
import json
import math
import os
import pickle
import platform
import re
import statistics
import subprocess
import sys
import time
import urllib.error
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

import bench.__main__ as bench
import ravlt
import train

ROOT = Path(__file__).resolve().parent
torch.manual_seed(0)
# Tests that compile, start processes, train whole runs or execute the notebook are marked slow:
# `-m "not slow"` gives the quick suite (README). The top level has no pytest.ini to register
# the marker in, so pytest's unknown-marker warning is silenced for this file's one custom marker.
warnings.filterwarnings("ignore", category=pytest.PytestUnknownMarkWarning)
slow = pytest.mark.slow

# Parameter counts and GMACs (224×224) of the released code, from the spec.
RELEASE_PARAMS = {"ravlt_t": 14_897_768, "ravlt_s": 25_591_208, "ravlt_b": 48_241_288,
                  "ravlt_l": 95_242_440}
RELEASE_GMACS = {"ravlt_t": 2.613, "ravlt_s": 4.878, "ravlt_b": 10.580, "ravlt_l": 17.209}


def randomize_(model, seed=0):
    """Weights large enough that every branch (α, z, RoPE, gate, LePE, BN stats) moves the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 4:
                p.copy_(torch.randn(p.shape, generator=g) / math.prod(p.shape[1:]) ** 0.5)
            elif "gamma" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 0.7 + 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.2)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return model


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# --- independent oracles, straight from the spec (tokens-major layout) ---

def spec_rope(x, H, W):
    """2D RoPE by explicit 2×2 rotations: x (B, h, N, d), token n = r·W + c."""
    d = x.shape[-1]
    theta = torch.tensor([10000.0 ** (-m / max(d // 4 - 1, 1)) for m in range(d // 4)],
                         dtype=torch.float64)
    out = torch.empty_like(x, dtype=torch.float64)
    xd = x.double()
    for n in range(H * W):
        r, c = divmod(n, W)
        for i in range(d // 2):  # pair (2i, 2i+1); first d/2 channels use rows, last d/2 columns
            m = (i % (d // 4))
            a = (r if i < d // 4 else c) * theta[m]
            rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]],
                               dtype=torch.float64)
            out[..., n, 2 * i:2 * i + 2] = xd[..., n, 2 * i:2 * i + 2] @ rot.T
    return out


def spec_rala(q, k, v, H, W):
    """RALA steps 1-5 of the spec, q/k/v (B, h, N, d) in float64, with its two 1/√N factors."""
    q, k, v = q.double(), k.double(), v.double()
    N, d = q.shape[-2], q.shape[-1]
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    q_bar = phi_q.mean(-2, keepdim=True)  # (B, h, 1, d)
    alpha = torch.softmax(d ** -0.5 * (q_bar * phi_k).sum(-1), dim=-1)  # (B, h, N)
    k_w = phi_k * alpha[..., None] * N
    z = 1 / ((phi_q * k_w.mean(-2, keepdim=True)).sum(-1, keepdim=True) + 1e-6)  # (B, h, N, 1)
    q_r, k_r = spec_rope(phi_q, H, W), spec_rope(k_w, H, W)
    S = (k_r / N ** 0.5).transpose(-2, -1) @ (v / N ** 0.5)  # (B, h, d, d)
    return (q_r @ S) * z  # (B, h, N, d)


def spec_softmax(q, k, v, H, W):
    q_r, k_r = spec_rope(q, H, W), spec_rope(k, H, W)
    a = torch.softmax(q_r @ k_r.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
    return a @ v.double()


def heads_first(x):
    """(B, h, N, d) -> ravlt.py's (B, h, d, N)."""
    return x.transpose(-2, -1)


@pytest.fixture(scope="module")
def qkv():
    B, h, H, W, d = 2, 2, 5, 7, 8
    g = torch.Generator().manual_seed(1)
    return [torch.randn(B, h, H * W, d, generator=g) for _ in range(3)], (H, W)


def test_rope_tables_follow_spec():
    rope = ravlt.RoPE2d(16)
    d4 = 4
    expected = torch.tensor([10000.0 ** (-m / (d4 - 1)) for m in range(d4)]).repeat_interleave(2)
    torch.testing.assert_close(rope.angle, expected)
    x = torch.randn(1, 1, 3 * 4, 16)
    cos, sin = rot = rope(3, 4)  # cos θ and sin θ per channel pair and token
    assert cos.shape == sin.shape == (8, 12) and cos.dtype == sin.dtype == torch.float32
    torch.testing.assert_close(cos ** 2 + sin ** 2, torch.ones(8, 12))
    # token (r, c) = (2, 3) is number 2·4 + 3: pair 1 turns by r·ω_1, pair 5 (columns) by c·ω_1
    omega_1 = 10000.0 ** (-1 / 3)
    torch.testing.assert_close(sin[1, 11], torch.tensor(math.sin(2 * omega_1)))
    torch.testing.assert_close(sin[5, 11], torch.tensor(math.sin(3 * omega_1)))
    torch.testing.assert_close(ravlt.rope(heads_first(x), rot),
                               heads_first(spec_rope(x, 3, 4)).float(), atol=1e-5, rtol=1e-5)


def test_rala_linear_form_equals_spec_equations(qkv):
    (q, k, v), (H, W) = qkv
    rot = ravlt.RoPE2d(q.shape[-1])(H, W)
    y = ravlt.rala(heads_first(q), heads_first(k), heads_first(v), rot)  # (B, h, d, N)
    torch.testing.assert_close(y.double(), heads_first(spec_rala(q, k, v, H, W)), atol=1e-5, rtol=1e-4)


def test_rala_explicit_matrix_equals_linear_form(qkv):
    (q, k, v), (H, W) = qkv
    rot = ravlt.RoPE2d(q.shape[-1])(H, W)
    q, k, v = heads_first(q), heads_first(k), heads_first(v)
    A = ravlt.rala_matrix(q, k, rot)  # (B, h, N, N)
    assert A.shape == (2, 2, H * W, H * W)
    torch.testing.assert_close(v @ A.transpose(-2, -1), ravlt.rala(q, k, v, rot), atol=1e-5, rtol=1e-4)
    # the linear-attention matrix has rank <= d however many tokens there are (float32 noise aside)
    sigma = torch.linalg.svdvals(A[0, 0].double())
    assert sigma[q.shape[-2]] / sigma[0] < 1e-5 < sigma[q.shape[-2] - 1] / sigma[0]


def test_softmax_attention_equals_spec_and_explicit_matrix(qkv):
    (q, k, v), (H, W) = qkv
    rot = ravlt.RoPE2d(q.shape[-1])(H, W)
    y = ravlt.softmax_attention(heads_first(q), heads_first(k), heads_first(v), rot)
    torch.testing.assert_close(y.double(), heads_first(spec_softmax(q, k, v, H, W)), atol=1e-5, rtol=1e-4)
    A = ravlt.softmax_matrix(heads_first(q), heads_first(k), rot)
    torch.testing.assert_close(heads_first(v) @ A.transpose(-2, -1), y, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(A.sum(-1), torch.ones(A.shape[:-1]))


@pytest.mark.parametrize("channels_last", [True, False])
def test_softmax_attention_never_stores_the_n_by_n_matrix(channels_last):
    # SDPA's fused kernel needs d contiguous in (B, h, N, d); its math fallback stores h·N² floats
    layer = ravlt.Attention(64, 2, "softmax", compile_attn=False)
    x, rot = torch.randn(1, 64, 32, 32), ravlt.RoPE2d(32)(32, 32)  # N = 1024 tokens: N×N×2 heads is 8 MiB
    if channels_last:  # as in RAVLT
        layer, x = layer.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    with torch.no_grad(), bench.LiveTensorBytes() as tracker:
        layer(x, rot)
    assert tracker.peak < 2 * 1024 * 1024 * 4 / 2


@pytest.mark.parametrize("kind", ["rala", "softmax"])
def test_attention_frame_gate_lepe_and_head_major_channels(kind):
    """proj(o ⊙ (Y + LePE(v))) with q | k | v | o channel groups, head-major, rebuilt by hand."""
    B, C, h, H, W = 2, 16, 2, 6, 5
    d = C // h
    attn = randomize_(ravlt.Attention(C, h, kind)).eval()
    x = torch.randn(B, C, H, W)
    rot = ravlt.RoPE2d(d)(H, W)
    q, k, v, o = F.conv2d(x, attn.qkvo.weight, attn.qkvo.bias).split(C, dim=1)
    tokens = [t.flatten(2).unflatten(1, (h, d)).transpose(-2, -1) for t in (q, k, v)]  # (B, h, N, d)
    y = (spec_rala if kind == "rala" else spec_softmax)(*tokens, H, W)
    y = y.transpose(-2, -1).reshape(B, C, H, W).float()  # heads back to channels, head-major
    lepe = F.conv2d(v, attn.lepe.weight, attn.lepe.bias, padding=2, groups=C)
    expected = F.conv2d(o * (y + lepe), attn.proj.weight, attn.proj.bias)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, rot), expected, atol=1e-4, rtol=1e-4)
        A = attn.attention_matrix(x, rot)
    assert A.shape == (B, h, H * W, H * W)


def test_model_attention_matrices_are_those_of_the_real_forward():
    model = randomize_(ravlt.create_model("ravlt_nano")).train()
    x = torch.randn(1, 3, 64, 64)
    stats = model.patch_embed.proj[1].running_mean.clone()
    with torch.no_grad():  # stage 0, block 0 by hand: stem, CPE, LayerNorm, then the attention
        model.eval()
        h = model.patch_embed.proj(x)
        blk = model.layers[0].blocks[0]
        h = h + blk.pos(h)
        expected = blk.attn.attention_matrix(blk.norm1(h), model.layers[0].RoPE(16, 16))
        model.train()
    torch.testing.assert_close(model.attention_matrices(x, stage=0, block=0), expected)
    assert model.training and torch.equal(model.patch_embed.proj[1].running_mean, stats)
    A = model.attention_matrices(x, stage=3, block=0)  # softmax stage, 2×2 tokens
    assert A.shape == (1, 4, 4, 4)
    with pytest.raises(ValueError, match=r"no block 5 in stage 3; depths are \(1, 1, 2, 1\)"):
        model.attention_matrices(x, stage=3, block=5)


def test_rope_tables_stay_accurate_in_a_bf16_model():
    rot32 = ravlt.RoPE2d(64)(64, 64)
    rot16 = ravlt.RoPE2d(64).bfloat16()(64, 64)  # angles up to 63 rad: bf16 steps would be 0.25
    for t16, t32 in zip(rot16, rot32):
        assert t16.dtype == torch.float32 and torch.equal(t16, t32)


def test_state_dict_keys_are_the_release_layout():
    model = ravlt.create_model("ravlt_t")
    cfg = model.cfg
    keys = {f"patch_embed.proj.{i}.{p}" for i in (0, 3, 6, 9) for p in ("weight", "bias")}
    keys |= {f"patch_embed.proj.{i}.{p}" for i in (1, 4, 7, 10)
             for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    block = ["pos", "attn.qkvo", "attn.lepe", "attn.proj", "norm1.norm", "norm2.norm", "ffn.fc1",
             "ffn.dwconv", "ffn.fc2"]
    for i, depth in enumerate(cfg.depths):
        keys.add(f"layers.{i}.RoPE.angle")
        for j in range(depth):
            keys |= {f"layers.{i}.blocks.{j}.{m}.{p}" for m in block for p in ("weight", "bias")}
            keys |= {f"layers.{i}.blocks.{j}.gamma_1", f"layers.{i}.blocks.{j}.gamma_2"}
        if i < 3:
            keys |= {f"layers.{i}.downsample.reduction.{p}" for p in ("weight", "bias")}
            keys |= {f"layers.{i}.downsample.norm.{p}" for p in
                     ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    keys |= {f"{m}.{p}" for m in ("proj", "head") for p in ("weight", "bias")}
    keys |= {f"norm.{p}" for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    sd = model.state_dict()
    assert set(sd) == keys
    assert sd["layers.2.blocks.0.gamma_1"].shape == (1, 256, 1, 1)
    assert sd["layers.0.blocks.0.ffn.fc1.weight"].shape == (224, 64, 1, 1)  # int(3.5 · 64)
    assert sd["layers.1.RoPE.angle"].shape == (32,)  # d/2 for d = 128/2


@pytest.mark.parametrize("name", list(RELEASE_PARAMS))
def test_parameter_count_equals_release(name):
    model = ravlt.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == RELEASE_PARAMS[name]


def analytic_macs(model, size):
    """MACs from the architecture alone, without torch's flop counter: every convolution's
    Cout·(Cin/groups)·k·k per output pixel (hooks read the real output sizes), plus per head
    2·N·d + 2·N·d² for RALA (α, z, KV buffer, read-out) and 2·N²·d for softmax (Q Kᵀ, A V)."""
    total, hooks = [0], []

    def conv(m, inputs, out):
        total[0] += out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]

    def attention(m, inputs, out):  # the core
        B, C, H, W = inputs[0].shape
        h, N = m.num_heads, H * W
        d = C // h
        total[0] += B * h * (2 * N * d + 2 * N * d * d if m.kind == "rala" else 2 * N * N * d)

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv))
        elif isinstance(m, ravlt.Attention):
            hooks.append(m.register_forward_hook(attention))
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return total[0]


# count_macs of every variant at 224×224: equal to the architecture's own count, and rounded,
# to the spec's GMACs of the released code (the same on every torch from the floor up)
MACS_224 = {"ravlt_t": 2_613_312_000, "ravlt_s": 4_878_388_352, "ravlt_b": 10_579_554_816,
            "ravlt_l": 17_208_927_104}


@pytest.mark.parametrize("name", ["ravlt_t", *(pytest.param(n, marks=slow) for n in ("ravlt_s", "ravlt_b", "ravlt_l"))])
def test_macs_equal_release_count(name):
    model = ravlt.create_model(name).train()
    macs = ravlt.count_macs(model)
    assert model.training  # counting leaves the model as it was
    assert macs == MACS_224[name] == analytic_macs(model, 224)
    assert round(macs / 1e9, 3) == RELEASE_GMACS[name]


def test_fully_linear_model_cost_grows_linearly_with_pixels():
    """4× the pixels costs exactly 4× for an all-RALA backbone, more for the hybrid (softmax is N²)."""
    linear = ravlt.create_model("ravlt_nano", attn=("rala",) * 4, features_only=True)
    hybrid = ravlt.create_model("ravlt_nano", features_only=True)
    counts = [ravlt.count_macs(linear, 256), ravlt.count_macs(linear, 512)]
    assert counts == [105_854_976, 423_419_904] == [analytic_macs(linear, s) for s in (256, 512)]
    assert counts[1] == 4 * counts[0]
    assert ravlt.count_macs(hybrid, 512) / ravlt.count_macs(hybrid, 256) > 5


@pytest.mark.parametrize("size", [(32, 32), (97, 131), (33, 47)])
def test_any_input_size_gives_logits_and_ceil_strides(size):
    model = ravlt.create_model("ravlt_nano", num_classes=7).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        feats = model.forward_stages(x)
    for i, f in enumerate(feats):
        stride = 2 ** (i + 2)
        assert f.shape == (2, model.feature_info.channels()[i], -(-size[0] // stride), -(-size[1] // stride))


@pytest.mark.parametrize("shape", [(3, 64, 64), (2, 1, 64, 64), (2, 4, 64, 64), (1, 2, 3, 64, 64)])
def test_wrong_input_raises_clear_error(shape):
    model = ravlt.create_model("ravlt_nano")
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 3, H, W\)"):
        model(torch.randn(*shape))


def test_create_model_rejects_bad_names_and_options():
    with pytest.raises(ValueError, match="ravlt_t, ravlt_s, ravlt_b, ravlt_l"):
        ravlt.create_model("ravlt_xl")
    with pytest.raises(ValueError, match="unknown option"):
        ravlt.create_model("ravlt_t", num_class=10)
    with pytest.raises(ValueError, match="attn values must be from"):
        ravlt.create_model("ravlt_t", attn=("rala", "linear", "softmax", "softmax"))
    with pytest.raises(ValueError, match=r"attn needs one value per stage \(4\)"):
        ravlt.create_model("ravlt_t", attn=("rala",) * 3)
    with pytest.raises(ValueError, match=r"depths needs one value per stage \(4\)"):
        ravlt.create_model("ravlt_t", depths=(1, 1, 2))
    with pytest.raises(ValueError, match="heads needs one value per stage"):
        ravlt.create_model("ravlt_t", heads=(1, 2, 4))


def test_timm_conventions():
    model = ravlt.create_model("ravlt_nano").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap = model.forward_features(x)
        assert fmap.shape == (2, 64, 2, 2)
        pooled = model.forward_head(fmap, pre_logits=True)
        assert pooled.shape == (2, model.head_hidden_size)
        logits = model(x)
        torch.testing.assert_close(logits, F.conv2d(pooled[..., None, None], model.head.weight,
                                                    model.head.bias).flatten(1))
        model.reset_classifier(5)
        assert model(x).shape == (2, 5)
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pooled)
    cfg = ravlt.create_model("ravlt_t").pretrained_cfg
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert (cfg["interpolation"], cfg["crop_pct"], cfg["input_size"]) == ("bicubic", 0.875, (3, 224, 224))


def test_features_only_returns_four_stage_maps():
    full = randomize_(ravlt.create_model("ravlt_t")).eval()
    backbone = ravlt.create_model("ravlt_t", features_only=True).eval()
    assert backbone.feature_info.channels() == [64, 128, 256, 512]
    assert not any(k.startswith(("head.", "proj.", "norm.")) for k in backbone.state_dict())
    backbone.load_state_dict({k: v for k, v in full.state_dict().items() if k in backbone.state_dict()})
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        feats = backbone(x)
        assert [f.shape[1:] for f in feats] == [(64, 24, 16), (128, 12, 8), (256, 6, 4), (512, 3, 2)]
        for a, b in zip(feats, full.forward_stages(x)):
            torch.testing.assert_close(a, b)


def test_drop_path_rates_grow_linearly_over_all_blocks():
    model = ravlt.create_model("ravlt_s", drop_path_rate=0.3)  # depths (3, 5, 9, 3): 20 blocks
    rates = [block.drop_path.p for stage in model.layers for block in stage.blocks]
    assert [len(stage.blocks) for stage in model.layers] == [3, 5, 9, 3]
    assert rates == pytest.approx(torch.linspace(0, 0.3, 20).tolist(), abs=1e-7)


def test_backward_gives_every_parameter_a_finite_gradient():
    model = ravlt.create_model("ravlt_nano", drop_path_rate=0.1)
    model(torch.randn(2, 3, 48, 40)).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@slow
def test_compiled_attention_equals_eager_on_cpu():
    x = torch.randn(2, 3, 64, 48)
    eager = randomize_(ravlt.create_model("ravlt_nano", compile_attn=False)).eval()
    compiled = ravlt.create_model("ravlt_nano", compile_attn=True).eval()
    compiled.load_state_dict(eager.state_dict())
    with torch.no_grad():
        a, b = eager(x), compiled(x)
    assert rel_err(b, a) < 1e-4
    assert ravlt._compiled.cache_info().currsize, "the compiled path was not taken"


@slow
def test_compiled_attention_gives_eager_gradients_over_five_sizes():
    # on CUDA the compiled cores are the default for training, detectors' varying image sizes included:
    # their backward (inductor's) gives eager's gradients, and five sizes cost at most two
    # compilations of each core (dynamic sizes from the start; one more where the heads are one)
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    ravlt._compiled.cache_clear()
    counters.clear()
    eager = randomize_(ravlt.create_model("ravlt_nano", compile_attn=False, drop_path_rate=0.0))
    compiled = ravlt.create_model("ravlt_nano", compile_attn=True, drop_path_rate=0.0)
    compiled.load_state_dict(eager.state_dict())
    for size in ((96, 80), (80, 112), (112, 72), (72, 96), (120, 88)):
        x, grads = torch.randn(2, 3, *size), []
        for model in (eager, compiled):
            model.zero_grad()
            F.cross_entropy(model.train()(x), torch.tensor([1, 7])).backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert rel_err(grads[1], grads[0]) < 1e-5, size
    assert ravlt._compiled.cache_info().currsize == 2  # RALA and softmax cores
    assert counters["stats"]["unique_graphs"] <= 2 * 2


# --- torch.compile of the whole model: one graph, all code generated, eager's numbers ---
# The tests run CPU inductor; a GPU run traces the same graphs (dynamo and AOT autograd are device-blind).

def compiled_calls(code):
    """The kernels a wrapper that inductor generated calls besides its own: extern_kernels.* and
    torch.ops.* (an op inductor cannot generate code for runs as such a fallback)."""
    body = code[code.index("def call("):]
    return [name for line in body.splitlines() if not line.lstrip().startswith("#")
            for name in re.findall(r"\b(extern_kernels\.\w+|torch\.ops\.[\w.]+)\(", line)]


@slow
@pytest.mark.parametrize("name", list(ravlt.VARIANTS))
def test_whole_model_is_one_graph(name):
    # zero graph breaks, every variant and form: classifier, backbones with and without out-norms,
    # fully linear, eval and training mode, and with the compiled cores (compile_attn) inside
    forms = [dict(), dict(features_only=True), dict(features_only=True, out_norm=True), dict(attn=("rala",) * 4)]
    forms += [dict(compile_attn=True), dict(grad_checkpointing=True)] if name == "ravlt_nano" else []
    x = torch.randn(2, 3, 64, 48)
    for kwargs in forms:
        model = ravlt.create_model(name, **{"compile_attn": False, **kwargs})
        for mode in (False, True):
            torch._dynamo.reset()
            explanation = torch._dynamo.explain(model.train(mode))(x)
            assert explanation.graph_break_count == 0, (kwargs, explanation.break_reasons)
            assert explanation.graph_count == 1, kwargs


@slow
def test_whole_model_compiled_equals_eager_and_is_all_generated_code():
    from torch._inductor.utils import run_and_get_code
    torch.manual_seed(0)
    x, target = torch.randn(2, 3, 64, 48), torch.tensor([1, 7])
    eager = randomize_(ravlt.create_model("ravlt_nano", compile_attn=False, drop_path_rate=0.0))
    model = ravlt.create_model("ravlt_nano", compile_attn=False, drop_path_rate=0.0)
    model.load_state_dict(eager.state_dict())
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), eager.eval()(x), rtol=1e-5, atol=1e-5)
    states = []
    for net in (eager, compiled):  # one training step each: forward, backward, AdamW
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)

        def step(net=net, opt=opt):
            loss = F.cross_entropy(net.train()(x), target)
            loss.backward()
            opt.step()
            return loss

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss, codes = run_and_get_code(step)
        grads = torch.cat([p.grad.flatten() for p in net.parameters()])
        states.append((loss.detach(), grads, torch.cat([p.detach().flatten() for p in net.parameters()]),
                       codes, caught))
    (loss0, grads0, params0, _, _), (loss1, grads1, params1, codes, caught) = states
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert rel_err(grads1, grads0) < 1e-5
    # AdamW's first step is about lr·sign(gradient): where a gradient is round-off (a conv bias
    # before BatchNorm: zero in exact arithmetic) either sign is right, so those elements are skipped
    real = grads0.abs() > 1e-4 * grads0.abs().max()
    torch.testing.assert_close(params1[real], params0[real], rtol=1e-5, atol=1e-6)
    # forward and backward are generated code, but for convolutions, matrix products and attention
    assert len(codes) == 2  # one forward, one backward
    calls = {call for code in codes for call in compiled_calls(code)}
    allowed = r"extern_kernels\.(convolution|bmm|mm|addmm)|torch\.ops\.aten\.(convolution_backward|" \
              r"_scaled_dot_product_\w+)\.default"
    assert calls and not [c for c in calls if not re.fullmatch(allowed, c)], calls
    assert not [w for w in caught if "complex" in str(w.message)]


@slow
def test_whole_model_compiles_twice_over_five_sizes():
    # the second size makes height and width dynamic: later sizes reuse that graph
    from torch._dynamo.testing import CompileCounterWithBackend
    model = randomize_(ravlt.create_model("ravlt_nano", compile_attn=False)).eval()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        for size in ((64, 64), (96, 80), (80, 112), (112, 72), (72, 96)):
            x = torch.randn(2, 3, *size)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 2


# RAVLT-T in bf16 only (fp16 convolutions are slow on CPU) and among the slow tests (14 s on 2 cores)
@pytest.mark.parametrize("name, dtype", [("ravlt_nano", torch.bfloat16), ("ravlt_nano", torch.float16),
                                         pytest.param("ravlt_t", torch.bfloat16, marks=pytest.mark.slow)])
def test_fully_linear_model_is_finite_at_1024_under_autocast(name, dtype):
    # stage 1 has N = 65,536 tokens: N itself overflows fp16, so this needs the float32 core
    model = ravlt.create_model(name, attn=("rala",) * 4).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        out = model(torch.randn(1, 3, 1024, 1024))
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_rala_keeps_float32_inside_autocast(qkv):
    (q, k, v), (H, W) = qkv
    rot = ravlt.RoPE2d(q.shape[-1])(H, W)
    q, k, v = (heads_first(t) for t in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ravlt.rala(q.bfloat16(), k.bfloat16(), v.bfloat16(), rot)
    ref = ravlt.rala(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), rot)
    assert y.dtype == torch.bfloat16
    # only the final cast is in bf16: error is one bf16 rounding, not an accumulation of them
    assert rel_err(y.float(), ref) < 2 ** -8


# --- checkpoints ---

def release_style_checkpoint(path, weights, ema_weights=None):
    """A .pth laid out as the release's: model / model_ema / optimizer / epoch / args (a Namespace)."""
    torch.save({"model": weights, "model_ema": weights if ema_weights is None else ema_weights,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]}, "epoch": 299,
                "args": argparse.Namespace(model="RAVLT_T", lr=1e-3, output_dir="out"),
                "max_accuracy": 82.6}, path)


def test_load_release_style_checkpoint_and_plain_state_dicts(tmp_path):
    src = randomize_(ravlt.create_model("ravlt_nano")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = src(x)
    release_style_checkpoint(tmp_path / "release.pth", src.state_dict())
    torch.save(src.state_dict(), tmp_path / "plain.pth")
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, tmp_path / "ddp.pth")
    # wrappers' state dicts, in either order: torch.compile adds "_orig_mod.", DataParallel "module."
    wrapped = {"compiled.pth": torch.compile(src), "compiled_dp.pth": torch.compile(nn.DataParallel(src)),
               "dp_compiled.pth": nn.DataParallel(torch.compile(src))}
    for name, wrapper in wrapped.items():
        torch.save(wrapper.state_dict(), tmp_path / name)
    for name in ("release.pth", "plain.pth", "ddp.pth", *wrapped):
        model = ravlt.create_model("ravlt_nano", pretrained=tmp_path / name).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected)


def test_load_checkpoint_picks_ema_weights(tmp_path):
    a, b = randomize_(ravlt.create_model("ravlt_nano"), 1), randomize_(ravlt.create_model("ravlt_nano"), 2)
    torch.save({"model": a.state_dict(), "model_ema": b.state_dict()}, tmp_path / "ck.pth")
    model = ravlt.load_checkpoint(ravlt.create_model("ravlt_nano"), tmp_path / "ck.pth", use_ema=True)
    torch.testing.assert_close(model.head.weight, b.head.weight)
    model = ravlt.load_checkpoint(ravlt.create_model("ravlt_nano"), tmp_path / "ck.pth")
    torch.testing.assert_close(model.head.weight, a.head.weight)


def shapes_only(name, **overrides):
    """A variant's model (on the meta device) and state dict (one shared zero per tensor), at no cost."""
    with torch.device("meta"):
        model = ravlt.create_model(name, **overrides)
    return model, {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in model.state_dict().items()}


def test_checkpoint_of_another_variant_names_both_variants(tmp_path):
    # a plain state dict: the variant is found by its shapes; ours and the release's: by their records
    torch.save(shapes_only("ravlt_t")[1], tmp_path / "t.pth")
    nano = shapes_only("ravlt_nano", num_classes=3)[1]
    torch.save({"model": nano, "model_config": {"name": "ravlt_nano"}}, tmp_path / "ours.pth")
    torch.save({"model": nano, "args": argparse.Namespace(model="RAVLT_NANO")}, tmp_path / "release.pth")
    for file, held, asked in [("t.pth", "ravlt_t", "ravlt_s"), ("t.pth", "ravlt_t", "ravlt_nano"),
                              ("ours.pth", "ravlt_nano", "ravlt_t"), ("release.pth", "ravlt_nano", "ravlt_b")]:
        with pytest.raises(ValueError, match=f"{file} holds {held} weights, the model is {asked}$"):
            ravlt.load_checkpoint(shapes_only(asked, num_classes=3)[0], tmp_path / file)
    with pytest.raises(ValueError, match="t.pth holds ravlt_t weights, the model is ravlt_nano$"):
        ravlt.create_model("ravlt_nano", pretrained=tmp_path / "t.pth")
    # the same variant with other shapes (here 1 input channel): the keys that differ are named
    torch.save(ravlt.create_model("ravlt_nano", in_chans=1).state_dict(), tmp_path / "gray.pth")
    with pytest.raises(ValueError) as err:
        ravlt.load_checkpoint(ravlt.create_model("ravlt_nano"), tmp_path / "gray.pth")
    assert str(err.value).endswith("does not fit ravlt_nano; shape mismatch (1): patch_embed.proj.0.weight: "
                                   "checkpoint (8, 1, 3, 3) vs model (8, 3, 3, 3)")


def broken_checkpoints(tmp):
    """{file: words of its error}: each way a file can fail to be a checkpoint, with its own line."""
    torch.save(ravlt.create_model("ravlt_nano").state_dict(), tmp / "whole.pth")
    whole = (tmp / "whole.pth").read_bytes()
    (tmp / "truncated.pth").write_bytes(whole[:len(whole) // 2])  # as if the copy stopped half-way
    (tmp / "empty.pth").write_bytes(b"")
    (tmp / "page.pth").write_bytes(b"<!DOCTYPE html><html>Sign in</html>")  # a download gone wrong
    os.makedirs(tmp / "folder.pth")
    return {"truncated.pth": "is truncated", "empty.pth": "is empty (0 bytes)",
            "page.pth": "page.pth is not a checkpoint: it begins with b'<!DO'",
            "folder.pth": "is a directory, not a file"}


def test_unreadable_or_unsafe_checkpoints_are_refused(tmp_path):
    for file, words in broken_checkpoints(tmp_path).items():
        for load in (ravlt.read_checkpoint, lambda p: ravlt.create_model("ravlt_nano", pretrained=p)):
            with pytest.raises(ValueError, match=re.escape(words)):
                load(tmp_path / file)
    torch.save({"step": 3}, tmp_path / "no_weights.pth")
    with pytest.raises(ValueError, match="holds no state dict"):
        ravlt.load_checkpoint(ravlt.create_model("ravlt_nano"), tmp_path / "no_weights.pth")
    # arbitrary pickled objects are code, not data: weights_only refuses them
    torch.save({"model": {}, "hook": Path("x")}, tmp_path / "code.pth")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        ravlt.load_checkpoint(ravlt.create_model("ravlt_nano"), tmp_path / "code.pth")
    with pytest.raises(FileNotFoundError):
        ravlt.load_checkpoint(ravlt.create_model("ravlt_nano"), tmp_path / "missing.pth")


def test_pretrained_weights_into_other_class_count_and_backbone(tmp_path):
    src = randomize_(ravlt.create_model("ravlt_nano"))
    release_style_checkpoint(tmp_path / "ck.pth", src.state_dict())
    finetune = ravlt.create_model("ravlt_nano", num_classes=10, pretrained=tmp_path / "ck.pth")
    assert finetune.head.weight.shape[0] == 10
    with pytest.raises(ValueError, match="classifies 1000 classes, the model 10"):
        ravlt.load_checkpoint(ravlt.create_model("ravlt_nano", num_classes=10), tmp_path / "ck.pth",
                              new_head=False)
    torch.testing.assert_close(finetune.proj.weight, src.proj.weight)
    pooled = ravlt.create_model("ravlt_nano", num_classes=0, pretrained=tmp_path / "ck.pth").eval()
    with torch.no_grad():  # no classifier: the pooled features of the source model
        x = torch.randn(1, 3, 64, 64)
        torch.testing.assert_close(pooled(x), src.eval().forward_head(src.forward_features(x), True))
    # a dict already read is accepted too (train.py reads a large file once)
    ckpt = ravlt.read_checkpoint(tmp_path / "ck.pth")
    torch.testing.assert_close(ravlt.load_checkpoint(ravlt.create_model("ravlt_nano"), ckpt).head.weight,
                               src.head.weight)
    backbone = ravlt.create_model("ravlt_nano", features_only=True, pretrained=tmp_path / "ck.pth")
    torch.testing.assert_close(backbone.layers[3].blocks[0].attn.qkvo.weight,
                               src.layers[3].blocks[0].attn.qkvo.weight)


# --- the release's weights by name: torch's hub cache, download, mmdetection/mmsegmentation files ---

@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty torch hub cache under a temporary TORCH_HOME; its checkpoints/ folder is returned."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    assert Path(torch.hub.get_dir()) == tmp_path / "torch_home" / "hub"
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def nano_release_file(path, seed=1):
    """A ravlt_nano-shaped file in the release's layout, whose `model` and `model_ema` differ."""
    a, b = randomize_(ravlt.create_model("ravlt_nano"), seed), randomize_(ravlt.create_model("ravlt_nano"), 9)
    os.makedirs(path.parent, exist_ok=True)
    release_style_checkpoint(path, a.state_dict(), b.state_dict())
    return a.eval()


def test_pretrained_weights_into_other_input_channels(tmp_path):
    src = nano_release_file(tmp_path / "rgb.pth")  # RGB weights
    stem = src.state_dict()["patch_embed.proj.0.weight"]  # (8, 3, 3, 3)
    gray = ravlt.create_model("ravlt_nano", pretrained=tmp_path / "rgb.pth", in_chans=1).eval()
    x = torch.randn(2, 1, 48, 40)
    with torch.no_grad():  # a gray image: what the RGB model gives on it repeated in R, G and B
        torch.testing.assert_close(gray(x), src(x.expand(-1, 3, -1, -1)), rtol=1e-5, atol=1e-5)
    for c in (2, 4, 7):  # channel i takes the RGB kernel i mod 3, scaled by 3/C; the rest loads as is
        model = ravlt.create_model("ravlt_nano", pretrained=tmp_path / "rgb.pth", in_chans=c)
        expected = torch.stack([stem[:, i % 3] * 3 / c for i in range(c)], 1)
        torch.testing.assert_close(model.state_dict()["patch_embed.proj.0.weight"], expected)
        assert torch.equal(model.state_dict()["head.weight"], src.state_dict()["head.weight"])
    torch.save(gray.state_dict(), tmp_path / "gray.pth")  # 1-channel weights fit no RGB model
    with pytest.raises(ValueError, match=r"shape mismatch \(1\): patch_embed.proj.0.weight: checkpoint "
                                         r"\(8, 1, 3, 3\) vs model \(8, 3, 3, 3\)"):
        ravlt.create_model("ravlt_nano", pretrained=tmp_path / "gray.pth")


def test_grad_checkpointing_same_loss_and_gradients_fewer_activations():
    torch.manual_seed(0)
    x, target = torch.randn(2, 3, 64, 48), torch.tensor([1, 7])
    plain = randomize_(ravlt.create_model("ravlt_nano", drop_path_rate=0.2))
    recompute = ravlt.create_model("ravlt_nano", drop_path_rate=0.2, grad_checkpointing=True)
    recompute.load_state_dict(plain.state_dict())
    results = []
    for model in (plain, recompute):
        calls = []  # forward calls of the blocks' FFNs: once each, or again in backward when recomputed
        hooks = [b.ffn.register_forward_hook(lambda *a: calls.append(1)) for s in model.layers for b in s.blocks]
        torch.manual_seed(3)  # the same drop-path masks: recomputation replays the random state
        loss = F.cross_entropy(model.train()(x), target)
        forward_calls = len(calls)
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()]),
                        forward_calls, len(calls)))
        for hook in hooks:
            hook.remove()
    (loss0, grads0, fwd0, all0), (loss1, grads1, fwd1, all1) = results
    blocks = sum(plain.cfg.depths)
    assert torch.equal(loss1, loss0) and rel_err(grads1, grads0) < 1e-6
    assert (fwd0, all0, fwd1, all1) == (blocks, blocks, blocks, 2 * blocks)
    with torch.no_grad():  # nothing to recompute without gradients
        torch.testing.assert_close(recompute.eval()(x), plain.eval()(x))


@pytest.mark.parametrize("out_norm", [False, True])
def test_feature_info_matches_the_maps(out_norm):
    model = ravlt.create_model("ravlt_nano", features_only=True, out_norm=out_norm)
    info = model.feature_info
    assert info.channels() == [16, 32, 64, 64] and info.reduction() == [4, 8, 16, 32]
    modules = dict(model.named_modules())
    x = torch.randn(2, 3, 97, 61)  # odd sizes: each map is ceil(size / reduction)
    with torch.no_grad():
        maps = model(x)
    for f, entry in zip(maps, info, strict=True):
        assert f.shape == (2, entry["num_chs"], -(-97 // entry["reduction"]), -(-61 // entry["reduction"]))
        assert entry["module"] in modules and entry["module"].startswith("extra_norms" if out_norm else "layers")


def test_pretrained_true_reads_torch_hub_cache_without_network(hub_cache, tmp_path, monkeypatch):
    # served as ravlt_nano's "release": the table maps the name to RAVLT_T.pth, already in the cache
    monkeypatch.setitem(ravlt.PRETRAINED, "ravlt_nano", "RAVLT_T.pth")
    monkeypatch.setattr(ravlt, "HUB_URL", (tmp_path / "offline").as_uri() + "/")  # any download fails
    src = nano_release_file(hub_cache / "RAVLT_T.pth")
    x = torch.randn(2, 3, 32, 32)
    model = ravlt.create_model("ravlt_nano", pretrained=True).eval()
    by_path = ravlt.create_model("ravlt_nano", pretrained=hub_cache / "RAVLT_T.pth").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x))  # the file's `model`, not its `model_ema`
        torch.testing.assert_close(model(x), by_path(x))
    finetune = ravlt.create_model("ravlt_nano", pretrained=True, num_classes=5)
    assert finetune.head.weight.shape[0] == 5
    torch.testing.assert_close(finetune.proj.weight, src.proj.weight)
    assert os.listdir(hub_cache) == ["RAVLT_T.pth"]


def test_pretrained_true_without_released_weights_is_refused():
    with pytest.raises(ValueError, match="'ravlt_nano' has no released weights; released: ravlt_t"):
        ravlt.create_model("ravlt_nano", pretrained=True)
    with pytest.raises(ValueError, match="no released weights"):
        ravlt.download_checkpoint("RAVLT_X.pth")


def test_download_checkpoint_through_file_url(hub_cache, tmp_path, monkeypatch):
    server = tmp_path / "server"
    nano_release_file(server / "maskrcnn_t_1x_12_epoch.pth")
    monkeypatch.setattr(ravlt, "HUB_URL", server.as_uri() + "/")
    path = ravlt.download_checkpoint("maskrcnn_t_1x_12_epoch.pth")  # torch.hub.download_url_to_file
    assert Path(path) == hub_cache / "maskrcnn_t_1x_12_epoch.pth"
    assert Path(path).read_bytes() == (server / "maskrcnn_t_1x_12_epoch.pth").read_bytes()
    assert os.listdir(hub_cache) == ["maskrcnn_t_1x_12_epoch.pth"]  # no temporary file left
    os.remove(server / "maskrcnn_t_1x_12_epoch.pth")  # from now on only the cache has it
    assert ravlt.download_checkpoint("maskrcnn_t_1x_12_epoch.pth") == path


def test_download_failure_or_cut_short_leaves_no_file(hub_cache, tmp_path, monkeypatch):
    import http.server
    import threading

    nano_release_file(tmp_path / "whole.pth")
    body = (tmp_path / "whole.pth").read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # RAVLT_T.pth: the connection drops halfway; anything else: 404
            if self.path.endswith("RAVLT_T.pth"):
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/files/"
        monkeypatch.setattr(ravlt, "HUB_URL", url)
        for name, file, reason in [("ravlt_t", "RAVLT_T.pth", "incomplete"),
                                   ("ravlt_s", "RAVLT_S.pth", "404")]:
            with pytest.raises(RuntimeError) as err:
                ravlt.create_model(name, pretrained=True)
            msg = str(err.value)
            assert f"cannot download {url}{file}" in msg and reason in msg, msg
            assert f"put the file at {hub_cache / file} by hand" in msg and "\n" not in msg, msg
            assert os.listdir(hub_cache) == [], name  # neither the file nor a temporary one
    finally:
        server.shutdown()
        server.server_close()


def test_mmdetection_file_loads_backbone_and_out_norms(tmp_path):
    src = randomize_(ravlt.create_model("ravlt_nano", features_only=True, out_norm=True), 3).eval()
    # the keys of the release's detection/segmentation backbones (extra_norms[i] = LayerNorm2d)
    assert {k for k in src.state_dict() if k.startswith("extra_norms.")} == {
        f"extra_norms.{i}.norm.{w}" for i in range(4) for w in ("weight", "bias")}
    weights = {"backbone." + k: v for k, v in src.state_dict().items()}
    weights.update({"neck.lateral_convs.0.conv.weight": torch.randn(8, 16, 1, 1),
                    "roi_head.bbox_head.fc_cls.weight": torch.randn(81, 8)})
    torch.save({"meta": {"epoch": 12, "CLASSES": ("person", "car")}, "state_dict": weights,
                "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "maskrcnn.pth")
    x = torch.randn(1, 3, 32, 32)
    normed = ravlt.create_model("ravlt_nano", features_only=True, out_norm=True,
                                pretrained=tmp_path / "maskrcnn.pth").eval()
    plain = ravlt.create_model("ravlt_nano", features_only=True, pretrained=tmp_path / "maskrcnn.pth").eval()
    with torch.no_grad():
        expected, stages = src(x), src.forward_stages(x)
        for a, b in zip(normed(x), expected, strict=True):
            torch.testing.assert_close(a, b)
        for a, b in zip(plain(x), stages, strict=True):  # without out_norm: the raw stage maps
            torch.testing.assert_close(a, b)
        # an ImageNet file has no out-norms: they stay LayerNorms at their initial weights
        release_style_checkpoint(tmp_path / "imagenet.pth", plain.state_dict())
        fresh = ravlt.create_model("ravlt_nano", features_only=True, out_norm=True,
                                   pretrained=tmp_path / "imagenet.pth").eval()
        assert all(torch.equal(n.norm.weight, torch.ones_like(n.norm.weight)) for n in fresh.extra_norms)
        for a, b in zip(fresh(x), stages, strict=True):
            torch.testing.assert_close(a, F.layer_norm(b.permute(0, 2, 3, 1), b.shape[1:2], eps=1e-6)
                                       .permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="missing"):  # a detector's file has no classifier
        ravlt.create_model("ravlt_nano", pretrained=tmp_path / "maskrcnn.pth")
    with pytest.raises(ValueError, match="out_norm=True needs features_only=True"):
        ravlt.create_model("ravlt_nano", out_norm=True)


# --- the file itself ---

def test_ravlt_py_imports_torch_only():
    tree = ast.parse((ROOT / "ravlt.py").read_text())
    roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    roots |= {node.module.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.module}
    assert roots - set(sys.stdlib_module_names) == {"torch"}


@slow
def test_cli_prints_variant_table():
    out = subprocess.run([sys.executable, str(ROOT / "ravlt.py"), "--input-size", "64"], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=120).stdout
    for name in ("ravlt_t", "ravlt_s", "ravlt_b", "ravlt_l"):
        line = next(l for l in out.splitlines() if l.startswith(name + " "))
        assert f"{RELEASE_PARAMS[name]:,}" in line and "rala/rala/softmax/softmax" in line


# --- the release itself, when you have it (needs timm, einops, fvcore; never vendored here) ---

@pytest.mark.skipif(not os.environ.get("RAVLT_RELEASE_FILE"),
                    reason="set RAVLT_RELEASE_FILE=path/to/qhfan/RALA/classfication/RALA.py")
@pytest.mark.parametrize("name", ["ravlt_t", "ravlt_s", "ravlt_b", "ravlt_l"])
def test_same_logits_as_release(name, tmp_path):
    if "release_rala" not in sys.modules:  # timm's model registry wants the module registered
        spec = importlib.util.spec_from_file_location("release_rala", os.environ["RAVLT_RELEASE_FILE"])
        sys.modules["release_rala"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["release_rala"])
    release = sys.modules["release_rala"]
    ref = randomize_(getattr(release, name.upper())()).eval()
    release_style_checkpoint(tmp_path / "release.pth", ref.state_dict())
    ours = ravlt.create_model(name, pretrained=tmp_path / "release.pth").eval()
    for size in [(224, 224), (97, 131)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            err = rel_err(ours(x), ref(x))
        print(f"{name} {size}: max relative logit difference {err:.1e}")
        assert err <= 1e-4


# ---- backbone: detection and segmentation (README "Use as a backbone") ----
README = Path(__file__).with_name("README.md")
DETECTORS = ("faster_rcnn", "mask_rcnn", "retinanet")


def readme_python_blocks(heading):
    """The ```python blocks of one README section (up to the next heading of the same level)."""
    text = README.read_text(encoding="utf-8")
    start = re.search(rf"^(#+) {re.escape(heading)}\s*$", text, re.M)
    assert start, f"README.md has no section {heading!r}"
    rest = text[start.end():]
    end = re.search(rf"^#{{1,{len(start.group(1))}}} ", rest, re.M)
    section = rest[:end.start()] if end else rest
    return re.findall(r"^```python\n(.*?)^```", section, re.M | re.S)


@pytest.fixture(scope="module")
def backbone_readme(tmp_path_factory):
    """Run the README's backbone code as written, next to a RAVLT_T.pth in the release's format.

    The checkpoint is a random classification model with random BatchNorm statistics, so every
    loaded tensor shows in the outputs. Returns the namespace the code built, plus `full_model`.
    """
    torch.manual_seed(0)
    full = ravlt.create_model("ravlt_t").eval()
    for m in full.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    folder = tmp_path_factory.mktemp("backbone")
    release_style_checkpoint(folder / "RAVLT_T.pth", full.state_dict())
    blocks = readme_python_blocks("Use as a backbone")
    assert len(blocks) >= 2, "expected the FPN helper with the detectors, and the segmentation example"
    namespace = {"__name__": "readme_backbone"}
    cwd = os.getcwd()
    os.chdir(folder)  # the README loads "RAVLT_T.pth" from the working directory
    try:
        for code in blocks:
            exec(compile(code, str(README), "exec"), namespace)
    finally:
        os.chdir(cwd)
    namespace["full_model"] = full
    return namespace


def _stage_sizes(h, w):
    return [(math.ceil(h / 2 ** (i + 2)), math.ceil(w / 2 ** (i + 2))) for i in range(4)]


def test_backbone_loads_classification_checkpoint(backbone_readme):
    ns = backbone_readme
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = ns["full_model"].forward_stages(x)
        for name in (*DETECTORS, "segmenter"):
            body = ns[name].backbone.body
            assert body.features_only and body.norm_eval
            for got, want in zip(body.eval()(x), expected):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # fully linear: same weights, so stages 1-2 (RALA in both) agree and stages 3-4 do not
        linear = ns["linear_backbone"].body.eval()(x)
    assert ns["linear_backbone"].body.cfg.attn == ("rala",) * 4
    torch.testing.assert_close(linear[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear[1], expected[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(linear[2], expected[2], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("model", ["faster_rcnn", "linear_backbone"])
def test_backbone_strides_round_up_and_bf16_autocast(backbone_readme, model):
    fpn = backbone_readme[model] if model == "linear_backbone" else backbone_readme[model].backbone
    body = fpn.body
    x = torch.randn(1, 3, 100, 133)  # non-square, not a multiple of 32
    with torch.no_grad():
        feats = body.eval()(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats_bf16 = body(x)
    assert [f.shape[1] for f in feats] == body.feature_info.channels() == [64, 128, 256, 512]
    assert [tuple(f.shape[-2:]) for f in feats] == _stage_sizes(100, 133)
    errors = [((g.float() - f).norm() / f.norm()).item() for f, g in zip(feats, feats_bf16)]
    assert all(torch.isfinite(g).all() for g in feats_bf16)
    assert 0 < max(errors) < 0.05, errors  # bf16 did run, and stays close to float32


def test_backbone_fpn_levels(backbone_readme):
    ns = backbone_readme
    x = torch.randn(1, 3, 100, 133)
    sizes = _stage_sizes(100, 133)
    p6 = (math.ceil(sizes[3][0] / 2), math.ceil(sizes[3][1] / 2))
    p7 = (math.ceil(p6[0] / 2), math.ceil(p6[1] / 2))
    expected = {
        "faster_rcnn": dict(zip(["0", "1", "2", "3", "pool"], sizes + [p6])),
        "retinanet": dict(zip(["1", "2", "3", "p6", "p7"], sizes[1:] + [p6, p7])),
        "segmenter": dict(zip(["0", "1", "2", "3"], sizes)),
    }
    with torch.no_grad():
        for name, levels in expected.items():
            out = ns[name].backbone.eval()(x)
            assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == levels, name
            assert all(v.shape[1] == 256 for v in out.values())
    with pytest.raises(ValueError, match="extra must be"):
        ns["RAVLTFPN"]("ravlt_nano", extra="p6")
    assert ns["RAVLTFPN"]("ravlt_nano", norm_eval=False, extra=None).body.norm_eval is False


def _boxes_and_masks(image):
    H, W = image.shape[-2:]
    boxes = torch.tensor([[4.0, 6.0, W / 2, H / 2], [W / 3, H / 4, W - 2.0, H - 3.0]])
    masks = torch.zeros(2, H, W, dtype=torch.uint8)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
        mask[y0:y1, x0:x1] = 1
    return dict(boxes=boxes, labels=torch.tensor([1, 2]), masks=masks)


# torchvision's defaults (800-pixel images, 2000 proposals, 512 sampled RoIs, 100 detections) make
# the heads, not the backbone, the cost on a CPU: the tests re-wrap the README's backbones smaller.
SMALL_RCNN = dict(min_size=96, max_size=128, rpn_pre_nms_top_n_train=200,
                  rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_train=100,
                  rpn_post_nms_top_n_test=50, box_batch_size_per_image=32,
                  box_detections_per_img=10, box_score_thresh=0.0)
SMALL_RETINANET = dict(min_size=96, max_size=128, topk_candidates=50, detections_per_img=10,
                       score_thresh=0.0)


@pytest.mark.parametrize("name", DETECTORS)
def test_backbone_detector_trains_and_detects(backbone_readme, name):
    torch.manual_seed(0)
    readme_detector = backbone_readme[name]
    small = SMALL_RETINANET if name == "retinanet" else SMALL_RCNN
    # score_thresh 0: random heads score every box below the default 0.05; keep them to check them
    detector = type(readme_detector)(readme_detector.backbone, num_classes=91, **small)
    images = [torch.rand(3, 96, 128), torch.rand(3, 112, 84)]
    targets = [_boxes_and_masks(image) for image in images]
    body = detector.backbone.body
    stats = {k: v.clone() for k, v in body.state_dict().items() if "running" in k}

    detector.train()
    losses = detector(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    detector.zero_grad()
    loss.backward()
    grad = body.patch_embed.proj[0].weight.grad  # the first layer of the backbone
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # norm_eval: the training step left the backbone's BatchNorm statistics as loaded
    assert all(torch.equal(body.state_dict()[k], v) for k, v in stats.items())

    detector.eval()
    with torch.no_grad():
        detections = detector(images)
    assert len(detections) == len(images)
    for det, image in zip(detections, images):
        H, W = image.shape[-2:]
        n = len(det["boxes"])
        assert n > 0 and det["boxes"].shape == (n, 4) and det["scores"].shape == (n,)
        assert det["labels"].shape == (n,) and ((det["labels"] >= 1) & (det["labels"] < 91)).all()
        boxes = det["boxes"]  # in the input image's own pixels, not the resized ones
        assert (boxes >= 0).all() and (boxes[:, 0::2] <= W).all() and (boxes[:, 1::2] <= H).all()
        if name == "mask_rcnn":
            assert det["masks"].shape == (n, 1, H, W)


def test_backbone_semantic_fpn_output_size_and_backward(backbone_readme):
    torch.manual_seed(0)
    segmenter = backbone_readme["segmenter"].train()
    images = torch.randn(2, 3, 100, 133)
    logits = segmenter(images)
    assert logits.shape == (2, 150, 100, 133)
    labels = torch.randint(0, 150, (2, 100, 133))
    labels[:, :10] = 255  # ignored pixels, as in ADE20K's label maps
    segmenter.zero_grad()
    F.cross_entropy(logits, labels, ignore_index=255).backward()
    for p in (segmenter.backbone.body.patch_embed.proj[0].weight, segmenter.classifier[1].weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_backbone_norm_eval_keeps_batchnorm_statistics():
    x = torch.randn(2, 3, 64, 64)
    for norm_eval in (True, False):
        torch.manual_seed(0)
        model = ravlt.create_model("ravlt_nano", features_only=True, norm_eval=norm_eval).train()
        before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
        sum(f.mean() for f in model(x)).backward()
        changed = [k for k, v in before.items() if not torch.equal(model.state_dict()[k], v)]
        assert (changed == []) == norm_eval, (norm_eval, changed)
        assert model.training  # only the BatchNorm layers are held in eval mode
        assert model.patch_embed.proj[1].weight.grad.abs().sum() > 0  # their weights still learn
        if norm_eval:  # ravlt_nano has no drop-path, so train mode must compute what eval mode does
            with torch.no_grad():
                for a, b in zip(model(x), model.eval()(x)):
                    torch.testing.assert_close(a, b)


# ---- train.py: training runs, exact resume, evaluation, torchrun, bad input ----
REPO = os.path.dirname(os.path.abspath(train.__file__))
# ravlt_nano on 32×32 images, batch 4, one CPU process without data workers: a few seconds per run
TINY = ["--model", "ravlt_nano", "--device", "cpu", "--workers", "0", "--batch-size", "4", "--amp", "none"]
FAKE = ["--dataset", "fake", "--fake-samples", "16", "--input-size", "32"]  # 16 train, 4 val images
LOG_FIELDS = {"epoch", "train_loss", "val_loss", "val_acc1", "val_acc5", "lr", "img_per_s", "epoch_time"}


def run_train(out, *extra, base=TINY):
    # one thread: faster for a model this small, and steadier when the cores are shared
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = train.get_args_parser().parse_args(base + ["--output-dir", str(out), *map(str, extra)])
        return train.main(args)
    finally:
        torch.set_num_threads(threads)


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# Two epochs on fake data with the full recipe (MixUp/CutMix, RandAugment, erasing, repeated
# augmentation, EMA): one warm-up epoch of 4 steps, then 4 cosine steps; shared by several tests.
FAKE_RUN = FAKE + ["--epochs", 2, "--warmup-epochs", 1, "--lr", 0.512]  # peak lr 0.512·4/512 = 4e-3


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fake_run")
    run_train(out, *FAKE_RUN)
    return out, read_log(out), load_ckpt(out / "checkpoint.pth")


def test_train_fake_log_and_checkpoint(fake_run):
    out, log, ckpt = fake_run
    assert [row["epoch"] for row in log] == [1, 2]
    for row in log:
        assert LOG_FIELDS <= row.keys() and {"ema_val_loss", "ema_val_acc1"} <= row.keys()
        assert math.isfinite(row["train_loss"]) and row["img_per_s"] > 0 and row["epoch_time"] > 0
        assert (row["val_acc1"] * 4 / 100) == pytest.approx(round(row["val_acc1"] * 4 / 100))  # 4 val images
    # lr of each epoch's last step: linear warm-up from 1e-6 over steps 0-3, then cosine over steps 4-7
    peak = 0.512 * 4 / 512
    assert log[0]["lr"] == pytest.approx(1e-6 + (peak - 1e-6) * 3 / 4, rel=1e-6)
    assert log[1]["lr"] == pytest.approx(1e-5 + (peak - 1e-5) * (1 + math.cos(math.pi * 3 / 4)) / 2, rel=1e-6)
    # the checkpoint holds everything needed to continue, loads as plain data, and ravlt reads it
    assert set(train.TRAIN_STATE) | {"model_ema", "args", "model_config"} <= ckpt.keys()
    assert ckpt["epoch"] == 2 and ckpt["sampler"] == {"seed": 0, "next_epoch": 2}
    assert ckpt["args"]["dataset"] == "fake" and ckpt["args"]["model_ema"] is True
    assert ckpt["model_config"]["name"] == "ravlt_nano" and ckpt["model_config"]["num_classes"] == 1000
    assert not os.path.exists(out / "checkpoint.pth.tmp")
    for use_ema in (False, True):
        model = ravlt.load_checkpoint(ravlt.create_model("ravlt_nano"), out / "checkpoint.pth", use_ema)
        expected = ckpt["model_ema" if use_ema else "model"]
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert not torch.equal(ckpt["model"]["head.weight"], ckpt["model_ema"]["head.weight"])


def test_train_resume_is_exact(fake_run, tmp_path, monkeypatch, capsys):
    _, log, ckpt = fake_run
    real_epoch, calls = train.train_one_epoch, []

    def crash_in_epoch_2(*args, **kwargs):  # as an image that cannot be decoded would
        calls.append(1)
        if len(calls) == 2:
            raise train.UnreadableImage("cannot decode image x.png (broken)")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", crash_in_epoch_2)
    with pytest.raises(SystemExit):
        run_train(tmp_path, *FAKE_RUN)
    monkeypatch.undo()
    err = capsys.readouterr().err  # the message points to the epoch saved
    assert err.endswith("train.py: error: cannot decode image x.png (broken); fix or delete it, then continue "
                        f"with --resume {tmp_path / 'checkpoint.pth'}\n")
    assert read_log(tmp_path)[0]["train_loss"] == log[0]["train_loss"]
    run_train(tmp_path, *FAKE_RUN, "--resume", tmp_path / "checkpoint.pth")
    resumed = read_log(tmp_path)
    assert [row["epoch"] for row in resumed] == [1, 2]
    assert abs(resumed[1]["train_loss"] - log[1]["train_loss"]) <= 1e-4
    assert resumed[1]["val_loss"] == pytest.approx(log[1]["val_loss"], abs=1e-6)
    final = load_ckpt(tmp_path / "checkpoint.pth")
    for key in ("model", "model_ema"):
        assert all(torch.equal(v, ckpt[key][k]) for k, v in final[key].items()), key


@slow
def test_train_compile_runs_and_resumes(fake_run, tmp_path):
    # --compile: the whole model compiled, for training and for evaluation; epoch 1 in one run, epoch 2
    # in a resumed one, again compiled, follow the eager run; the checkpoint keeps the model's own keys
    _, log, ckpt = fake_run
    run_train(tmp_path, *FAKE_RUN, "--compile", "--epochs", 1)
    first = load_ckpt(tmp_path / "checkpoint.pth")
    assert first["model"].keys() == ckpt["model"].keys() and first["model_ema"].keys() == ckpt["model_ema"].keys()
    run_train(tmp_path, *FAKE_RUN, "--compile", "--resume", tmp_path / "checkpoint.pth")
    compiled = read_log(tmp_path)
    assert [row["epoch"] for row in compiled] == [1, 2]
    for row, eager in zip(compiled, log):
        for key in ("train_loss", "val_loss", "ema_val_loss", "lr"):
            assert row[key] == pytest.approx(eager[key], rel=1e-3), key


def test_train_eval_only_ours_and_release_format(fake_run, tmp_path):
    out, log, ckpt = fake_run
    ours = run_train(tmp_path, *FAKE, "--eval-only", "--resume", out / "checkpoint.pth")
    for key in ("val_loss", "val_acc1", "val_acc5", "ema_val_loss", "ema_val_acc1", "ema_val_acc5"):
        assert ours[key] == pytest.approx(log[-1][key], abs=1e-5), key
    # the release's layout, with the two weight sets swapped: the two results must swap
    release_style_checkpoint(tmp_path / "RAVLT_release.pth", ckpt["model_ema"], ckpt["model"])
    theirs = run_train(tmp_path, *FAKE, "--eval-only", "--resume", tmp_path / "RAVLT_release.pth")
    assert theirs["val_loss"] == pytest.approx(ours["ema_val_loss"], abs=1e-6)
    assert theirs["ema_val_loss"] == pytest.approx(ours["val_loss"], abs=1e-6)


def test_train_eval_only_takes_model_and_data_from_the_checkpoint(fake_run, tmp_path, capsys):
    out, log, _ = fake_run
    # no --model, --dataset, --fake-samples, --input-size: the defaults would be ravlt_t on CIFAR-10 at 32 px
    results = run_train(tmp_path, "--eval-only", "--resume", out / "checkpoint.pth",
                        base=["--device", "cpu", "--workers", "0", "--amp", "none"])
    for key in ("val_loss", "val_acc1", "val_acc5", "ema_val_loss", "ema_val_acc1", "ema_val_acc5"):
        assert results[key] == pytest.approx(log[-1][key], abs=1e-5), key
    *_, human, last = capsys.readouterr().out.strip().splitlines()
    assert json.loads(last) == results
    parts = [f"{name} top-1 {results[p + 'acc1']:.2f}%, top-5 {results[p + 'acc5']:.2f}%, loss "
             f"{results[p + 'loss']:.4f}" for name, p in (("weights", "val_"), ("EMA", "ema_val_"))]
    assert human == f"{out / 'checkpoint.pth'} on fake val (4 images): " + "; ".join(parts)
    assert os.listdir(tmp_path) == []  # evaluation writes nothing


def test_train_rerun_keeps_the_run_in_its_folder(fake_run, capsys):
    out, _, _ = fake_run
    before = {name: (out / name).read_bytes() for name in ("checkpoint.pth", "log.jsonl")}
    with pytest.raises(SystemExit) as exit_info:
        run_train(out, *FAKE_RUN)  # the same command again, without --resume
    (line,) = visible_lines(capsys.readouterr().err)
    assert exit_info.value.code == 2
    assert line == (f"train.py: error: --output-dir {out} holds a run of ravlt_nano at epoch 2: continue it "
                    f"with --resume {out / 'checkpoint.pth'}, or give another --output-dir")
    assert {name: (out / name).read_bytes() for name in before} == before


@pytest.mark.parametrize("held", [torch.zeros(2), {"model": {}}], ids=["tensor", "state-dict-only"])
def test_train_refuses_a_folder_holding_another_checkpoint(tmp_path, capsys, held):
    os.makedirs(tmp_path / "out")
    torch.save(held, tmp_path / "out" / "checkpoint.pth")
    before = (tmp_path / "out" / "checkpoint.pth").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        run_train(tmp_path / "out", *FAKE)
    (line,) = visible_lines(capsys.readouterr().err)
    assert exit_info.value.code == 2
    assert line == (f"train.py: error: --output-dir {tmp_path / 'out'} holds a checkpoint.pth that train.py "
                    "did not write: move it, or give another --output-dir")
    assert (tmp_path / "out" / "checkpoint.pth").read_bytes() == before


def test_train_resume_refuses_other_data_or_global_batch(fake_run, tmp_path, capsys):
    out, _, _ = fake_run
    cases = {("--batch-size", 8): "--batch-size: {} was trained with global batch 4, this run global batch 8",
             ("--dataset", "cifar10"): "--dataset: {} was trained with fake, this run cifar10",
             ("--fake-samples", 32): "--fake-samples: {} was trained with 16, this run 32"}
    for flag, words in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            run_train(tmp_path / "out", *FAKE_RUN, *flag, "--resume", out / "checkpoint.pth")
        (line,) = visible_lines(capsys.readouterr().err)
        assert exit_info.value.code == 2, flag
        assert line.startswith("train.py: error: " + words.format(out / "checkpoint.pth") + "; "), line
    assert os.listdir(tmp_path) == []


# every part off, 8 fake images: 2 steps per epoch, the first epoch a warm-up
SCHEDULE = FAKE + ["--fake-samples", 8, "--lr", 0.512, "--warmup-epochs", 1, "--no-model-ema",
                   "--no-repeated-aug", "--aa", "none", "--mixup", 0, "--cutmix", 0, "--reprob", 0]


def test_train_longer_resume_continues_on_the_longer_cosine(fake_run, tmp_path):
    out, log, _ = fake_run  # 2 epochs of 4 steps, the first a warm-up; now a third
    run_train(tmp_path, *FAKE_RUN, "--epochs", 3, "--resume", out / "checkpoint.pth")
    (row,) = read_log(tmp_path)
    peak = 0.512 * 4 / 512  # last step of epoch 3: step 11 of 12, 7/8 into the 8 steps of cosine
    assert row["epoch"] == 3
    assert row["lr"] == pytest.approx(1e-5 + (peak - 1e-5) * (1 + math.cos(math.pi * 7 / 8)) / 2, rel=1e-9)


@slow  # three runs, eight epochs
def test_train_longer_resume_follows_the_straight_schedule(tmp_path):
    run_train(tmp_path / "run", *SCHEDULE, "--epochs", 2)
    run_train(tmp_path / "run", *SCHEDULE, "--epochs", 4, "--resume", tmp_path / "run" / "checkpoint.pth")
    run_train(tmp_path / "straight", *SCHEDULE, "--epochs", 4)
    extended, straight = read_log(tmp_path / "run"), read_log(tmp_path / "straight")
    assert [row["epoch"] for row in extended] == [row["epoch"] for row in straight] == [1, 2, 3, 4]
    assert extended[0]["lr"] == straight[0]["lr"]  # warm-up: the same steps, whatever the length
    assert extended[1]["lr"] != pytest.approx(straight[1]["lr"], rel=1e-3)  # epoch 2 ended a 2-epoch cosine
    for resumed, unbroken in zip(extended[2:], straight[2:]):  # then the 4-epoch one, as if never stopped
        assert resumed["lr"] == pytest.approx(unbroken["lr"], rel=1e-9, abs=0)


def test_train_run_stopped_by_bad_input_leaves_no_folder(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):  # below torchvision's download, which makes the data folder first
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    torch.save({"model": shapes_only("ravlt_t")[1]}, tmp_path / "ravlt_t.pth")
    cifar = ["--dataset", "cifar10", "--data-path", tmp_path / "new" / "data"]
    cases = {"cifar offline": (cifar, "could not get CIFAR10"),
             "batch larger than the data": ([*FAKE, "--fake-samples", 2], "fewer than --batch-size"),
             "weights of another variant": ([*FAKE, "--pretrained", tmp_path / "ravlt_t.pth"], "holds ravlt_t"),
             "the same, found before the data": ([*cifar, "--pretrained", tmp_path / "ravlt_t.pth"], "holds ravlt_t")}
    for name, (argv, words) in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            run_train(tmp_path / "runs" / "out", *argv)
        (line,) = visible_lines(capsys.readouterr().err)
        assert exit_info.value.code == 2 and words in line, (name, line)
        assert os.listdir(tmp_path) == ["ravlt_t.pth"], name  # no runs/out, no new/data


def test_train_pretrained_fine_tunes_into_another_class_count(tmp_path, hub_cache, monkeypatch):
    src = nano_release_file(tmp_path / "RAVLT_nano.pth")  # 1000 classes; the folder has 3
    make_image_folder(tmp_path / "data")
    folder = ["--dataset", "imagenet", "--data-path", tmp_path / "data", "--input-size", 32, "--epochs", 1,
              "--no-repeated-aug", "--no-model-ema", "--warmup-epochs", 1]
    run_train(tmp_path / "out", *folder, "--pretrained", tmp_path / "RAVLT_nano.pth")
    tuned = load_ckpt(tmp_path / "out" / "checkpoint.pth")["model"]
    assert tuned["head.weight"].shape == (3, 64, 1, 1)
    # a warm-up epoch (lr ≤ 4e-6) moves each weight by ~1e-5: the rest starts from the file's `model`
    for k, v in src.named_parameters():
        if not k.startswith("head."):
            assert (tuned[k] - v).abs().max() < 1e-3, k
    # no PATH: the release's file for --model, from torch's hub cache
    monkeypatch.setitem(ravlt.PRETRAINED, "ravlt_nano", "RAVLT_T.pth")
    os.makedirs(hub_cache)
    os.replace(tmp_path / "RAVLT_nano.pth", hub_cache / "RAVLT_T.pth")
    run_train(tmp_path / "out2", "--pretrained", *folder)  # a flag right after it: no PATH
    assert torch.equal(load_ckpt(tmp_path / "out2" / "checkpoint.pth")["model"]["proj.weight"],
                       tuned["proj.weight"])  # the same start and seed: the same run


def test_train_pretrained_bad_input(tmp_path, capsys):
    torch.save({"model": {}}, tmp_path / "ck.pth")
    cases = [(["--pretrained", "--resume", tmp_path / "ck.pth"], "give one"),
             (["--pretrained"], "'ravlt_nano' has no released weights; released: ravlt_t"),
             (["--pretrained", tmp_path / "none.pth"], "no such file")]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_train(tmp_path / "out", *FAKE, *argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
        assert err.startswith("train.py: error: --pretrained") and expected in err, err


def make_image_folder(root, classes=("cat", "dog", "fox"), per_split=(("train", 4), ("val", 2)), gray=False):
    g = torch.Generator().manual_seed(0)
    for split, n in per_split:
        for c in classes:
            os.makedirs(root / split / c)
            for i in range(n):
                h, w = 30 + 4 * i, 40  # mixed sizes, as real folders have
                pixels = torch.randint(0, 256, (h, w) if gray else (h, w, 3), generator=g, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(root / split / c / f"{i}.png")


def test_train_pretrained_on_gray_images(tmp_path, capsys):
    src = nano_release_file(tmp_path / "RAVLT_nano.pth").state_dict()["patch_embed.proj.0.weight"]
    make_image_folder(tmp_path / "xray", gray=True)
    folder = ["--dataset", "imagenet", "--data-path", tmp_path / "xray", "--input-size", 32]
    run_train(tmp_path / "out", *folder, "--epochs", 1, "--no-repeated-aug", "--no-model-ema",
              "--warmup-epochs", 1, "--in-chans", 1, "--pretrained", tmp_path / "RAVLT_nano.pth")
    stem = load_ckpt(tmp_path / "out" / "checkpoint.pth")["model"]["patch_embed.proj.0.weight"]
    assert stem.shape == (8, 1, 3, 3)  # from the summed RGB kernels; a warm-up epoch moves it by ~1e-5
    assert (stem - src.sum(1, keepdim=True)).abs().max() < 1e-3
    # evaluation takes the channel count from the checkpoint, like the model and the data
    result = run_train(tmp_path / "eval", "--eval-only", "--resume", tmp_path / "out" / "checkpoint.pth")
    assert result["val_acc5"] == 100.0
    with pytest.raises(SystemExit) as exit_info:
        run_train(tmp_path / "out2", *folder, "--in-chans", 2)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "train.py: error: argument --in-chans: expected 1 or 3, got '2'"


def test_train_on_png_image_folder(tmp_path):
    make_image_folder(tmp_path / "pets")
    run_train(tmp_path / "out", "--dataset", "imagenet", "--data-path", tmp_path / "pets",
              "--input-size", 32, "--epochs", 1, "--aa", "trivialaugment")
    (row,) = read_log(tmp_path / "out")
    ckpt = load_ckpt(tmp_path / "out" / "checkpoint.pth")
    assert ckpt["model"]["head.weight"].shape[0] == 3  # class count from the folder
    assert row["val_acc5"] == 100.0  # top-5 of 3 classes always holds the label
    assert (row["val_acc1"] * 6 / 100) == pytest.approx(round(row["val_acc1"] * 6 / 100))  # 6 val images


def make_cifar10(root, n_train=10, n_test=4):
    folder = root / "cifar-10-batches-py"
    os.makedirs(folder)
    g = torch.Generator().manual_seed(0)

    def batch(n):
        data = torch.randint(0, 256, (n, 3 * 32 * 32), generator=g, dtype=torch.uint8).numpy()
        return {"data": data, "labels": torch.randint(0, 10, (n,), generator=g).tolist()}

    files = {f"data_batch_{i}": batch(n_train // 5) for i in range(1, 6)}
    files.update(test_batch=batch(n_test), **{"batches.meta": {"label_names": [f"c{i}" for i in range(10)]}})
    for name, content in files.items():
        with open(folder / name, "wb") as f:
            pickle.dump(content, f)


def test_train_cifar_preset(tmp_path, monkeypatch):
    make_cifar10(tmp_path / "data")
    # our files are not the real ones, so skip torchvision's md5 check of them
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    run_train(tmp_path / "out", "--dataset", "cifar10", "--data-path", tmp_path / "data", "--epochs", 1)
    ckpt = load_ckpt(tmp_path / "out" / "checkpoint.pth")
    preset = {k: ckpt["args"][k] for k in ("input_size", "repeated_aug", "model_ema", "lr", "warmup_epochs")}
    assert preset == dict(input_size=32, repeated_aug=False, model_ema=False, lr=2e-3, warmup_epochs=5)
    assert "model_ema" not in ckpt and ckpt["model"]["head.weight"].shape[0] == 10
    (row,) = read_log(tmp_path / "out")
    assert (row["val_acc1"] * 4 / 100) == pytest.approx(round(row["val_acc1"] * 4 / 100))  # 4 test images


@slow
def test_train_torchrun_two_processes_gloo(tmp_path):
    # DDP with gradient checkpointing (blocks recomputed in backward), which must compose with it
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "train.py", *TINY, *FAKE, "--epochs", "1", "--grad-checkpointing", "--output-dir", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("epoch 1/1:") == 1 and "2 process(es)" in proc.stdout  # rank 0 alone prints
    (row,) = read_log(out)
    ckpt = load_ckpt(out / "checkpoint.pth")
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    # the sharded, all-reduced evaluation equals a single process evaluating the same weights
    single = run_train(tmp_path / "single", *FAKE, "--eval-only", "--resume", out / "checkpoint.pth")
    for key in ("val_loss", "val_acc1", "ema_val_loss", "ema_val_acc1"):
        assert row[key] == pytest.approx(single[key], abs=1e-5), key


def test_train_off_values_build_nothing():
    """Each documented 'off' value removes its part (and builds nothing that would refuse it)."""
    def parse(*extra):
        return train.get_args_parser().parse_args(TINY + FAKE + [str(a) for a in extra])

    def names(compose):
        return [type(t).__name__ for t in compose.transforms] if compose is not None else []

    assert names(train.build_mix(parse(), 10)) == ["MixUp", "CutMix"]
    assert names(train.build_mix(parse("--mixup", 0), 10)) == ["CutMix"]
    assert names(train.build_mix(parse("--cutmix", 0), 10)) == ["MixUp"]
    assert train.build_mix(parse("--mixup", 0, "--cutmix", 0), 10) is None
    cfg = ravlt.create_model("ravlt_nano").pretrained_cfg
    default = names(train.build_transforms(parse(), cfg)[0])
    assert "RandAugment" in default and "RandomErasing" in default
    off = names(train.build_transforms(parse("--aa", "none", "--color-jitter", 0, "--reprob", 0), cfg)[0])
    assert off == [n for n in default if n not in ("RandAugment", "RandomErasing")]
    jitter = names(train.build_transforms(parse("--aa", "none", "--reprob", 0), cfg)[0])
    assert jitter == off[:2] + ["ColorJitter"] + off[2:]  # colour jitter only without a policy


# every switch that has an "off" value, all off in one short run: it must train, and say so
ALL_OFF = ["--mixup", 0, "--cutmix", 0, "--reprob", 0, "--smoothing", 0, "--aa", "none",
           "--color-jitter", 0, "--drop-path", 0, "--no-model-ema", "--no-repeated-aug",
           "--warmup-epochs", 0, "--weight-decay", 0]


def test_train_with_every_part_off(tmp_path):
    row = run_train(tmp_path, *FAKE, "--epochs", 1, *ALL_OFF)
    ckpt = load_ckpt(tmp_path / "checkpoint.pth")
    assert math.isfinite(row["train_loss"]) and "model_ema" not in ckpt
    assert ckpt["model_config"]["drop_path_rate"] == 0
    assert {k: ckpt["args"][k] for k in ("mixup", "cutmix", "reprob", "smoothing", "aa")} == dict(
        mixup=0, cutmix=0, reprob=0, smoothing=0, aa="none")


@pytest.mark.parametrize("flag", [["--mixup", 0], ["--cutmix", 0], ["--reprob", 0], ["--smoothing", 0],
                                  ["--aa", "none"], ["--drop-path", 0], ["--no-model-ema"],
                                  ["--no-repeated-aug"], ["--warmup-epochs", 0], ["--clip-grad", 1.0]],
                         ids=lambda f: " ".join(map(str, f)))
def test_train_each_part_off_alone(tmp_path, flag):
    row = run_train(tmp_path, *FAKE, "--epochs", 1, *flag)
    assert math.isfinite(row["train_loss"])


@slow
def test_train_torchrun_pretrained_from_hub_cache(tmp_path):
    # the real name: RAVLT_T.pth planted in TORCH_HOME's hub cache; process 0 "downloads" (finds it)
    # while process 1 waits, then both read it; no network is needed for a cached file
    src = randomize_(ravlt.create_model("ravlt_t"))
    os.makedirs(tmp_path / "home" / "hub" / "checkpoints")
    release_style_checkpoint(tmp_path / "home" / "hub" / "checkpoints" / "RAVLT_T.pth", src.state_dict(),
                             ravlt.create_model("ravlt_t").state_dict())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           *TINY, *FAKE, "--model", "ravlt_t", "--epochs", "1", "--pretrained",
           "--output-dir", str(tmp_path / "out")]
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_HOME=str(tmp_path / "home"))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"weights from {tmp_path / 'home' / 'hub' / 'checkpoints' / 'RAVLT_T.pth'}" in proc.stdout
    tuned = load_ckpt(tmp_path / "out" / "checkpoint.pth")["model"]
    for k, v in src.named_parameters():  # one warm-up epoch (lr ≤ 4e-6) from the file's `model`
        assert (tuned[k] - v).abs().max() < 1e-3, k


def bad_input_cases(tmp):
    """(arguments, text the one-line error must contain) for each kind of bad input."""
    checkpoints = broken_checkpoints(tmp)
    make_image_folder(tmp / "bad_train")
    make_image_folder(tmp / "bad_val")
    (tmp / "bad_train" / "train" / "dog" / "x.png").write_bytes(bytes(range(256)))  # not an image
    png = (tmp / "bad_val" / "val" / "fox" / "1.png").read_bytes()
    (tmp / "bad_val" / "val" / "fox" / "1.png").write_bytes(png[:len(png) // 2])  # cut off half-way
    (tmp / "a_file").write_text("")
    torch.save({"model": shapes_only("ravlt_t")[1]}, tmp / "ravlt_t.pth")
    os.makedirs(tmp / "empty" / "train")
    os.makedirs(tmp / "empty" / "val")
    os.makedirs(tmp / "no_images" / "train" / "cat")
    os.makedirs(tmp / "no_images" / "val" / "cat")
    (tmp / "garbage.pth").write_bytes(b"this is not a checkpoint")
    torch.save({"model": {}, "made": datetime.date(2024, 1, 1)}, tmp / "code.pth")  # needs unpickling code
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, tmp / "foreign.pth")
    nano10 = ravlt.create_model("ravlt_nano", num_classes=10).state_dict()
    torch.save({"model": nano10}, tmp / "ten_classes.pth")
    torch.save({"model": ravlt.create_model("ravlt_nano", num_classes=1000).state_dict(), "epoch": 3},
               tmp / "weights_only.pth")
    return {
        "unknown model": (["--model", "ravlt_x"], "ravlt_x"),
        "imagenet without path": (["--dataset", "imagenet"], "--data-path"),
        "missing folder": (["--dataset", "imagenet", "--data-path", tmp / "nope"], "no folder"),
        "empty folder": (["--dataset", "imagenet", "--data-path", tmp / "empty"], "class folder"),
        "no images": (["--dataset", "imagenet", "--data-path", tmp / "no_images"], "no valid file"),
        "missing checkpoint": ([*FAKE, "--resume", tmp / "none.pth"], "no such file"),
        "unreadable checkpoint": ([*FAKE, "--resume", tmp / "garbage.pth"], "is not a checkpoint"),
        **{f"checkpoint {file}": ([*FAKE, "--resume", tmp / file], text) for file, text in checkpoints.items()},
        "empty checkpoint, eval": ([*FAKE, "--eval-only", "--resume", tmp / "empty.pth"], "is empty"),
        "other variant": ([*FAKE, "--eval-only", "--resume", tmp / "ravlt_t.pth"],
                          "holds ravlt_t weights, the model is ravlt_nano"),
        "checkpoint with code": ([*FAKE, "--resume", tmp / "code.pth"],
                                 "code.pth: WeightsUnpickler error: Unsupported global: GLOBAL datetime.date"),
        "foreign checkpoint": ([*FAKE, "--eval-only", "--resume", tmp / "foreign.pth"], "does not fit"),
        "other class count": ([*FAKE, "--eval-only", "--resume", tmp / "ten_classes.pth"], "10 classes"),
        "weights only, resumed": ([*FAKE, "--resume", tmp / "weights_only.pth"], "not a train.py checkpoint"),
        "eval without checkpoint": ([*FAKE, "--eval-only"], "--resume"),
        "unknown policy": (["--aa", "rand-x"], "unknown policy"),
        "output dir is a file": ([*FAKE, "--output-dir", tmp / "a_file"], "a_file is a file, not a folder"),
        "output dir impossible": ([*FAKE, "--output-dir", tmp / "a_file" / "out"], "cannot be created"),
        # the train set's broken file is met in epoch 1 (every image, once), the val set's in its evaluation
        "undecodable train image": (["--dataset", "imagenet", "--data-path", tmp / "bad_train", "--input-size",
                                     32, "--no-repeated-aug"],
                                    "x.png (not in a format PIL reads); fix or delete it, then run again"),
        "truncated val image": (["--dataset", "imagenet", "--data-path", tmp / "bad_val", "--input-size", 32],
                                "1.png (image file is truncated"),
    }


def test_train_bad_input_one_line_exit_2(tmp_path, capsys, monkeypatch):
    # offline: CIFAR's download fails -> say where to put the files
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    cases = bad_input_cases(tmp_path)
    cases["cifar offline"] = (["--data-path", tmp_path / "cifar"], "cifar-10-python.tar.gz")
    for name, (argv, expected) in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            run_train(tmp_path / "out", *argv)
        err = capsys.readouterr().err
        lines = visible_lines(err)
        assert exit_info.value.code == 2, name
        assert len(lines) == 1 and "Traceback" not in err, (name, err)
        assert lines[0].startswith("train.py: error:") and expected in lines[0], (name, err)
    assert not os.path.exists(tmp_path / "out" / "checkpoint.pth")  # no case trained an epoch


def visible_lines(err):
    """stderr as a terminal shows it: a line rewritten with \\r (tqdm's bar) shows its last text."""
    return [text for line in err.split("\n") if (text := line.split("\r")[-1].strip())]


# a bad value of each flag that takes one, and the allowed range its error must name; every flag
# with a type is listed (checked below), so that a new flag cannot go without its range check
FLAG_RANGES = {
    "--drop-path": (["1", "-0.1"], "a number in [0, 1)"),
    "--input-size": (["0", "-3", "2.5"], "an integer >= 1"),
    "--fake-samples": (["0"], "an integer >= 1"),
    "--workers": (["-1", "two"], "an integer >= 0"),
    "--epochs": (["0"], "an integer >= 1"),
    "--batch-size": (["0", "1e3"], "an integer >= 1"),
    "--lr": (["-1", "0", "nan", "inf"], "a number > 0"),
    "--min-lr": (["-1e-5"], "a number >= 0"),
    "--warmup-lr": (["0"], "a number > 0"),
    "--warmup-epochs": (["-1"], "an integer >= 0"),
    "--weight-decay": (["-0.05"], "a number >= 0"),
    "--clip-grad": (["0", "-1"], "a number > 0"),
    "--smoothing": (["1.5", "-0.1"], "a number in [0, 1]"),
    "--mixup": (["-0.8"], "a number >= 0"),
    "--cutmix": (["-1"], "a number >= 0"),
    "--aa": (["rand-m11-n2"], "unknown policy"),
    "--color-jitter": (["-0.4"], "a number >= 0"),
    "--reprob": (["1.25"], "a number in [0, 1]"),
    "--model-ema-decay": (["1.1", "-1"], "a number in [0, 1]"),
    "--seed": (["-1", str(2**32)], "an integer in [0, 2^32)"),
    "--in-chans": (["2", "0", "x"], "1 or 3"),
}


def test_train_every_flag_checks_its_range(capsys):
    parser = train.get_args_parser()
    assert {a.option_strings[0] for a in parser._actions if a.type is not None} == set(FLAG_RANGES)
    for flag, (values, allowed) in FLAG_RANGES.items():
        for value in values:
            with pytest.raises(SystemExit) as exit_info:
                train.main(parser.parse_args([f"{flag}={value}"]))  # = lets argparse take -1e-5
            err = capsys.readouterr().err
            assert exit_info.value.code == 2 and "Traceback" not in err, (flag, value)
            assert err == f"train.py: error: argument {flag}: expected {allowed}, got {value!r}\n" or (
                flag == "--aa" and err.startswith(f"train.py: error: argument --aa: unknown policy '{value}'"))
    # the edges of each range are accepted, and the value typed is the value used
    edges = {"--drop-path": 0.0, "--workers": 0, "--warmup-epochs": 0, "--min-lr": 0.0, "--mixup": 0.0,
             "--smoothing": 1.0, "--reprob": 0.0, "--model-ema-decay": 1.0, "--seed": 2**32 - 1, "--epochs": 1}
    args = parser.parse_args([text for flag, value in edges.items() for text in (flag, str(value))])
    assert {flag: getattr(args, flag[2:].replace("-", "_")) for flag in edges} == edges


def test_train_default_workers_fit_the_machine():
    for preset, most in (("imagenet", 8), ("cifar", 4)):
        workers = train.PRESETS[preset]["workers"]
        assert 1 <= workers <= most
        with warnings.catch_warnings():  # DataLoader warns of more workers than this process's cores
            warnings.simplefilter("error")
            torch.utils.data.DataLoader([0], num_workers=workers).check_worker_number_rationality()


@slow
def test_train_bad_input_as_a_process(tmp_path):
    """As a user meets it: one line and exit code 2, no traceback, also from a data-loading process;
    an image that breaks epoch 2 leaves epoch 1's checkpoint, which --resume continues once it is gone."""
    def train_py(*argv):
        cmd = [sys.executable, "train.py", *TINY, "--output-dir", str(tmp_path / "out"), *map(str, argv)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=300,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        proc.stderr = proc.stderr.decode()  # not text=True, which would turn tqdm's \r into \n
        return proc

    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "foreign.pth")
    make_image_folder(tmp_path / "pets", per_split=(("train", 4), ("val", 1)))  # 12 train images: 3 steps
    pets = ["--dataset", "imagenet", "--data-path", tmp_path / "pets", "--input-size", 32, "--no-repeated-aug"]
    run_train(tmp_path / "out", *pets, "--epochs", 1)
    saved = (tmp_path / "out" / "checkpoint.pth").read_bytes()
    os.remove(tmp_path / "pets" / "train" / "dog" / "0.png")
    (tmp_path / "pets" / "train" / "dog" / "x.png").write_bytes(bytes(range(256)))  # still 12 images
    resume = ["--resume", tmp_path / "out" / "checkpoint.pth"]
    cases = {  # arguments: words of the one line
        (*FAKE, "--lr", "-1"): "argument --lr: expected a number > 0, got '-1'",
        (*FAKE, "--eval-only", "--resume", tmp_path / "foreign.pth"): "does not fit ravlt_nano; missing "
            "(162): patch_embed.proj.0.weight, patch_embed.proj.0.bias, patch_embed.proj.1.weight; unexpected "
            "(1): fc.weight",
        (*pets, "--epochs", 2, "--workers", 1, *resume):  # met by a worker, in epoch 2
            f"cannot decode image {tmp_path / 'pets' / 'train' / 'dog' / 'x.png'} (not in a format PIL reads); "
            f"fix or delete it, then continue with --resume {tmp_path / 'out' / 'checkpoint.pth'}",
    }
    for argv, words in cases.items():
        proc = train_py(*argv)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        (line,) = visible_lines(proc.stderr)
        assert line.startswith("train.py: error: ") and line.endswith(words), proc.stderr
    assert (tmp_path / "out" / "checkpoint.pth").read_bytes() == saved  # epoch 1's, untouched
    os.remove(tmp_path / "pets" / "train" / "dog" / "x.png")
    run_train(tmp_path / "out", *pets, "--epochs", 2, *resume)
    assert [row["epoch"] for row in read_log(tmp_path / "out")] == [1, 2]


def test_train_repeat_aug_sampler_spreads_copies():
    # 3 processes, 9 images: an epoch takes the first 3 shuffled images, 3 copies each, one per process
    shards = [list(train.RepeatAugSampler(9, 3, rank, seed=5)) for rank in range(3)]
    assert all(len(s) == 3 for s in shards) and len(set(shards[0])) == 3
    assert sorted(shards[0]) == sorted(shards[1]) == sorted(shards[2])
    sampler = train.RepeatAugSampler(9, 3, 0, seed=5)
    sampler.set_epoch(1)
    assert list(sampler) != shards[0]  # a new order each epoch


def test_train_eval_transform_uses_crop_pct():
    args = train.get_args_parser().parse_args(["--dataset", "fake", "--input-size", "224"])
    cfg = ravlt.create_model("ravlt_nano").pretrained_cfg
    train_tf, val_tf = train.build_transforms(args, cfg)
    image = Image.fromarray(torch.randint(0, 256, (300, 400, 3), dtype=torch.uint8).numpy())
    F = torchvision.transforms.functional
    bicubic = torchvision.transforms.InterpolationMode.BICUBIC
    expected = F.center_crop(F.resize(image, int(224 / cfg["crop_pct"]), bicubic), 224)  # 256, then 224
    expected = F.normalize(F.to_tensor(expected), cfg["mean"], cfg["std"])
    assert torch.allclose(val_tf(image), expected, atol=1e-6)
    assert train_tf(image).shape == (3, 224, 224)
    (augment,) = [t for t in train_tf.transforms if isinstance(t, torchvision.transforms.v2.RandAugment)]
    assert (augment.num_ops, augment.magnitude, augment.num_magnitude_bins) == (2, 9, 11)


# ---- tutorial notebook ----
TUTORIAL = Path(__file__).resolve().parent / "tutorial.ipynb"


def _png_size(b64):
    import base64

    head = base64.b64decode(b64)[:24]  # PNG signature, then the IHDR chunk: width, height
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _png_dpi(b64):
    import base64

    png = base64.b64decode(b64)
    at = png.find(b"pHYs")  # the chunk matplotlib writes: pixels per unit along x and y, then the unit
    assert at > 0, "a figure without its resolution"
    per_unit, unit = int.from_bytes(png[at + 4:at + 8], "big"), png[at + 12]
    assert unit == 1, "pHYs unit is not the metre"
    return per_unit * 0.0254  # dots per inch


@slow
def test_tutorial_notebook_runs_top_to_bottom():
    """Execute tutorial.ipynb in a fresh kernel of this interpreter, from the repo root, in memory
    (the file is not rewritten). Any error, including a failed assertion against ravlt.py, fails it."""
    # imported here so that a missing notebook dependency fails this test, not the whole file
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(TUTORIAL, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    markdown = [c.source for c in nb.cells if c.cell_type == "markdown"]
    # committed with its outputs, from one clean top-to-bottom run
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert sum("$" in m for m in markdown) >= 10
    # at least 5 exercises, each followed by its solution
    exercises = [i for i, m in enumerate(markdown) if re.search(r"\*\*Exercise \d+", m)]
    solutions = [i for i, m in enumerate(markdown) if re.search(r"<summary><b>Solution \d+", m)]
    assert len(exercises) >= 5 and len(solutions) == len(exercises)
    assert all(e <= s for e, s in zip(exercises, solutions))
    # committed figures readable on a projector: at least 800 px wide and 150 dpi, none huge
    committed = [o["data"]["image/png"] for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(committed) >= 6
    for png in committed:
        width, height = _png_size(png)
        assert 800 <= width <= 2400 and height <= 1600, (width, height)
        assert _png_dpi(png) >= 149.5, _png_dpi(png)

    # "python3" may resolve to a kernel spec of another interpreter: the first cell (added in memory)
    # checks that the kernel runs in this environment, with this torch
    check = f"import sys, torch; assert sys.prefix == {sys.prefix!r}, sys.prefix; assert torch.__version__ == {torch.__version__!r}"
    nb.cells.insert(0, nbformat.v4.new_code_cell(check))
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(TUTORIAL.parent)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError at the first failing cell
    assert time.perf_counter() - start < 300, "the tutorial must run in under 5 minutes"
    figures = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(figures) == len(committed)


# ---- speed: the fast forms stay exact, bf16 stays close, the benchmark runs ----
@pytest.mark.parametrize("channels_last", [False, True])
def test_rope_equals_rotation_matrices(channels_last):
    torch.manual_seed(0)
    B, h, d, H, W = 2, 2, 8, 3, 5
    x = torch.randn(B, H, W, h * d) if channels_last else torch.randn(B, h * d, H, W)
    x = (x.permute(0, 3, 1, 2) if channels_last else x).reshape(B, h, d, H * W)  # (B, h, d, N)
    rot = ravlt.RoPE2d(d)(H, W)
    oracle = heads_first(spec_rope(heads_first(x), H, W))  # the model section's 2×2 rotations
    torch.testing.assert_close(ravlt.rope(x, rot).double(), oracle, rtol=1e-5, atol=1e-5)


def test_rope_keeps_float64_and_takes_any_layout():
    # float64 stays float64 (gradcheck needs it); any strides and offsets give the same numbers
    torch.manual_seed(0)
    d, H, W = 8, 3, 4
    rot = ravlt.RoPE2d(d)(H, W)
    x = torch.randn(2, d, H * W, dtype=torch.float64, requires_grad=True)
    assert ravlt.rope(x, rot).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda t: ravlt.rope(t, rot), (x,))
    base = torch.randn(1, 1, H * W, d + 1)
    odd = base[..., 1:].transpose(-2, -1)  # (1, 1, d, N) starting at an odd offset
    torch.testing.assert_close(ravlt.rope(odd, rot), ravlt.rope(odd.contiguous(), rot))
    oracle = heads_first(spec_rope(heads_first(odd), H, W))
    torch.testing.assert_close(ravlt.rope(odd, rot).double(), oracle, rtol=1e-5, atol=1e-5)


def test_rope_gradient_is_the_inverse_rotation():
    # rope is an orthogonal map per token, so the gradient of <rope(x), g> w.r.t. x is the inverse
    # rotation of g: rotating it back by the same angles gives g again.
    torch.manual_seed(0)
    d, H, W = 8, 4, 3
    x = torch.randn(1, 1, d, H * W, requires_grad=True)
    g = torch.randn(1, 1, d, H * W)
    rot = ravlt.RoPE2d(d)(H, W)
    (ravlt.rope(x, rot) * g).sum().backward()
    torch.testing.assert_close(ravlt.rope(x.grad, rot), g, rtol=1e-5, atol=1e-5)


def test_rala_gradients_match_the_explicit_matrix_form():
    # autograd through the linear form must agree with autograd through Y = V Aᵀ
    torch.manual_seed(0)
    B, h, d, H, W = 2, 2, 8, 4, 5
    q, k, v = (torch.randn(B, h, d, H * W, requires_grad=True) for _ in range(3))
    rot = ravlt.RoPE2d(d)(H, W)
    g = torch.randn(B, h, d, H * W)
    grads_fast = torch.autograd.grad((ravlt.rala(q, k, v, rot) * g).sum(), (q, k, v))
    y_matrix = (ravlt.rala_matrix(q, k, rot) @ v.transpose(-2, -1)).transpose(-2, -1)
    grads_matrix = torch.autograd.grad((y_matrix * g).sum(), (q, k, v))
    for fast, ref in zip(grads_fast, grads_matrix):
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind,heads", [("rala", 1), ("rala", 2), ("softmax", 2)])
def test_attention_is_the_same_in_both_memory_layouts(kind, heads):
    # The model runs channels-last; a contiguous (NCHW) input must give the same numbers.
    torch.manual_seed(0)
    attn = ravlt.Attention(16, heads, kind, compile_attn=False)
    x = torch.randn(2, 16, 6, 7)
    rot = ravlt.RoPE2d(16 // heads)(6, 7)
    y_nchw = attn(x, rot)
    y_cl = attn(x.contiguous(memory_format=torch.channels_last), rot)
    torch.testing.assert_close(y_cl, y_nchw, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_stays_within_one_percent_of_fp32():
    torch.manual_seed(0)
    model = ravlt.create_model("ravlt_t", compile_attn=False).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert (low.float() - ref).norm() / ref.norm() < 1e-2


def test_count_macs_agrees_with_torchvision_published_counts():
    # torchvision publishes each model's multiply-accumulates (its "_ops", in G); count_macs is
    # what the variant table and the benchmark's GMAC/s rest on.
    from torchvision import models
    for build, weights in ((models.resnet50, models.ResNet50_Weights),
                           (models.convnext_tiny, models.ConvNeXt_Tiny_Weights)):
        published = weights.IMAGENET1K_V1.meta["_ops"]
        assert ravlt.count_macs(build(), 224) / 1e9 == pytest.approx(published, abs=5e-4)


def test_bench_times_reference_models(capsys):
    from torchvision.models import convnext_tiny
    bench.bench(("ravlt_nano",), 64, 2, 2, repeats=1, sections=("models",),
                references={"convnext_tiny": convnext_tiny()})
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    row = next(r for r in rows if r[:2] == ["convnext_tiny", "reference"])
    assert float(row[2]) == pytest.approx(ravlt.count_macs(convnext_tiny(), 64) / 1e9, abs=0.005)
    assert float(row[3]) > 0 and float(row[6]) > 0  # inference and training img/s


def test_live_tensor_bytes_counts_new_tensors_only():
    old = torch.ones(1000, 1000)  # made before: not counted, nor are its views

    def fn():
        a = torch.ones(1000, 250)  # 1 MB
        b = a * 2  # 1 MB more: 2 MB live
        del a
        c = b + old[:1000, :250]  # 2 MB live again: b and c
        return c.view(-1), old.view(-1)

    with bench.LiveTensorBytes() as tracker:
        fn()
    assert tracker.peak == 2 * 1000 * 250 * 4
    assert tracker.live == 0  # everything made inside was freed


def test_bench_quick_runs_and_prints_every_section(capsys):
    bench.main(["--quick", "--device", "cpu", "--sections", "models", "ablation", "layer", "highres"])
    out = capsys.readouterr().out
    assert "torch " + torch.__version__ in out
    rows = [line.split() for line in out.splitlines()]
    model_row = next(r for r in rows if r[:2] == ["ravlt_nano", "ravlt.py"])
    assert float(model_row[3]) > 0 and float(model_row[6]) > 0  # inference and training img/s
    ablation = [" ".join(r[1:4]) for r in rows if r[:1] == ["ravlt_nano"]][1:]
    assert [a.split(" 0.")[0] for a in ablation] == ["as is", "no channels-last", "complex RoPE",
                                                    "LN affine outside", "q, k as"]
    layer_rows = [r for r in rows if r[:2] in (["8", "64"], ["16", "256"])]
    assert len(layer_rows) == 2  # RALA and softmax at two sizes
    assert any(r[:1] == ["96x128"] for r in rows)  # the high-resolution table
    scaling = next(line for line in out.splitlines() if line.startswith("64x64 -> 96x128"))
    assert "(3.00× the pixels), time ×: hybrid " in scaling and ", fully linear " in scaling


def test_bench_ratio_is_taken_within_rounds():
    # round 2 ran on a machine twice as slow: both of its timings doubled, their ratio did not
    ours, theirs = [1.0, 2.0, 1.0], [2.0, 4.0, 2.2]
    assert bench.ratio(theirs, ours) == 2.0  # the median of 2.0, 2.0, 2.2
    assert statistics.median(theirs) / statistics.median(ours) == 2.2  # what a ratio of medians says


@slow  # two fresh processes
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_bench_reuse_freed_memory_ends_fresh_pages_for_large_tensors():
    script = """if True:  # in a fresh process: the setting holds for the whole process
        import ctypes, resource, statistics, sys, torch, bench.__main__ as bench
        ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages, as on most machines
        if sys.argv[1] == "reuse":
            bench.reuse_freed_memory()
        x, counts = torch.ones(2**24), []  # 64 MiB
        for _ in range(24):  # page faults of each of 24 computations that make a 64 MiB tensor
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            (x * 2).exp_()
            counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        print(statistics.median(counts[-8:]))  # once the heap has settled"""
    faults = {}
    for mode in ("default", "reuse"):
        out = subprocess.run([sys.executable, "-c", script, mode], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        faults[mode] = float(out.stdout)
    assert faults["default"] >= 2**26 / 4096  # fresh pages every time: one fault per 4 KiB
    assert faults["reuse"] < faults["default"] / 10


def test_bench_tables_pair_the_right_timings(monkeypatch, capsys):
    # fake timings, no model runs: call j of round r "takes" (j + 1)·(r + 1) s, so each printed
    # ratio is known; the release is a RAVLT of ours
    def fake_measure(fns, device, repeats):
        return [[(j + 1.0) * (r + 1) for r in range(repeats)] for j in range(len(fns))], [0.0] * len(fns)

    release = argparse.Namespace(RAVLT_T=lambda: ravlt.create_model("ravlt_t", compile_attn=False))
    monkeypatch.setattr(bench, "measure", fake_measure)
    monkeypatch.setattr(bench, "load_release", lambda path: release)
    bench.bench(("ravlt_t",), 32, 16, 8, highres=((32, 32), (64, 64), (32, 64)), repeats=3,
                sections=("models", "highres"), release_file="RALA.py")
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    # models: release, then ours: 2 s and 4 s (medians of the rounds) for a batch of 16, or 8 in training
    row = {r[1]: r[3:] for r in rows if r[:1] == ["ravlt_t"]}
    assert row["release"] == ["8.0", "1.00", "0", "4.00", "1.00", "0"]
    assert row["ravlt.py"] == ["4.0", "0.50", "0", "2.00", "0.50", "0"]
    # high resolution: size-major calls, hybrid, fully linear, release at each size
    assert next(r for r in rows if r[:1] == ["32x32"]) == ["32x32", "2.000", "|", "0", "4.000", "|", "0",
                                                         "6.000", "|", "0", "3.00"]
    assert next(r for r in rows if r[:1] == ["64x64"])[-1] == "1.50"  # 6 s / 4 s
    assert next(r for r in rows if r[:1] == ["32x64"])[-1] == "1.29"  # 9 s / 7 s
    assert ["hybrid", "4.00,", "fully", "linear", "2.50,", "release", "2.00"] == \
        next(r for r in rows if r[:3] == ["32x32", "->", "64x64"])[-7:]  # 4/1, 5/2, 6/3


def test_bench_refuses_zero_rounds(capsys):
    for flag in ("--repeats", "--batch"):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(["--quick", flag, "0"])
        assert exit_info.value.code == 2 and "must be at least 1" in capsys.readouterr().err


@slow  # compiles nano for inference and a training step
def test_bench_profile_splits_the_time_by_kind_of_op(capsys):
    torch._dynamo.reset()  # as in a fresh process: earlier tests' graphs filled RAVLT.forward's recompile limit
    bench.main(["--quick", "--device", "cpu", "--sections", "profile"])
    lines = capsys.readouterr().out.splitlines()
    for path in ("ravlt.py (eager)", "torch.compile(model)"):  # rows: inference, then a training step
        assert sum(line.startswith(path) for line in lines) == 2
    rows = [[float(v) for v in line[22:].split()] for line in lines if line.startswith(("ravlt.py (", "torch.c"))]
    for eager, compiled in (rows[0:2], rows[2:4]):  # ms: convolutions, matmuls, generated code, other, total
        assert eager[0] > 0 and compiled[0] > 0 and eager[2] == 0 < compiled[2]  # compiled: generated code
        assert compiled[3] < eager[3]  # the element-wise ops went into the generated code
        for row in (eager, compiled):
            assert sum(row[:4]) == pytest.approx(row[4], abs=0.25)  # the kinds add up (each rounded to 0.1)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quick", "--device", "cuda", "--sections", "profile"])
    assert exit_info.value.code == 2 and "--device cpu" in capsys.readouterr().err


def test_bench_ablation_forms_equal_the_model():
    # the forms the ablation times must compute what ravlt.py computes
    torch.manual_seed(0)
    d, H, W = 8, 3, 5
    x = torch.randn(2, 2, d, H * W)
    rot = ravlt.RoPE2d(d)(H, W)
    torch.testing.assert_close(bench.rope_complex(x, rot), ravlt.rope(x, rot))
    model = randomize_(ravlt.create_model("ravlt_nano")).eval()
    x = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        ref = model(x)
        for swaps in ({(ravlt, "rope"): bench.rope_complex},
                      {(ravlt.LayerNorm2d, "forward"): bench.layer_norm_affine_outside},
                      {(ravlt.Attention, "heads"): bench.heads_as_views}):
            plain = bench.Without(model, swaps)(x)
            torch.testing.assert_close(plain, ref, rtol=1e-5, atol=1e-5)
        assert ravlt.rope is not bench.rope_complex  # put back
        torch.testing.assert_close(bench.without_channels_last(model)(x), ref, rtol=1e-5, atol=1e-5)
