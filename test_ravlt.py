# ---- speed: the fast forms stay exact, bf16 stays close, the benchmark runs ----
import math

import pytest
import torch
import torch.nn as nn

import ravlt


def _rotation_oracle(x, H, W):
    """RoPE from the spec, one 2×2 rotation matrix per channel pair and token, in float64."""
    d = x.shape[-2]
    theta = torch.tensor([10000.0 ** (-m / (d // 4 - 1)) for m in range(d // 4)], dtype=torch.float64)
    theta = theta.repeat_interleave(2)  # (d/2,): θ0, θ0, θ1, θ1, ...
    out = torch.empty_like(x, dtype=torch.float64)
    for n in range(H * W):
        r, c = divmod(n, W)
        angles = torch.cat([r * theta, c * theta])  # (d,): rows on the first half, columns on the second
        R = torch.zeros(d, d, dtype=torch.float64)
        for i in range(0, d, 2):
            cos, sin = math.cos(angles[i]), math.sin(angles[i])
            R[i:i + 2, i:i + 2] = torch.tensor([[cos, -sin], [sin, cos]], dtype=torch.float64)
        out[..., n] = x[..., n].double() @ R.T
    return out


@pytest.mark.parametrize("channels_last", [False, True])
def test_rope_equals_rotation_matrices(channels_last):
    torch.manual_seed(0)
    B, h, d, H, W = 2, 2, 8, 3, 5
    x = torch.randn(B, H, W, h * d) if channels_last else torch.randn(B, h * d, H, W)
    x = (x.permute(0, 3, 1, 2) if channels_last else x).reshape(B, h, d, H * W)  # (B, h, d, N)
    cos, sin = ravlt.RoPE2d(d)(H, W)
    torch.testing.assert_close(ravlt.rope(x, cos, sin).double(), _rotation_oracle(x, H, W),
                               rtol=1e-5, atol=1e-5)


def test_rope_gradient_is_the_inverse_rotation():
    # rope is an orthogonal map per token, so the gradient of <rope(x), g> w.r.t. x is the inverse
    # rotation of g: rotating it back by the same angles gives g again.
    torch.manual_seed(0)
    d, H, W = 8, 4, 3
    x = torch.randn(1, 1, d, H * W, requires_grad=True)
    g = torch.randn(1, 1, d, H * W)
    cos, sin = ravlt.RoPE2d(d)(H, W)
    (ravlt.rope(x, cos, sin) * g).sum().backward()
    torch.testing.assert_close(ravlt.rope(x.grad, cos, sin), g, rtol=1e-5, atol=1e-5)


def test_rala_gradients_match_the_explicit_matrix_form():
    # rala uses in-place steps (φ, the normaliser); its gradients must equal those of Y = V Aᵀ.
    torch.manual_seed(0)
    B, h, d, H, W = 2, 2, 8, 4, 5
    q, k, v = (torch.randn(B, h, d, H * W, requires_grad=True) for _ in range(3))
    cos, sin = ravlt.RoPE2d(d)(H, W)
    g = torch.randn(B, h, d, H * W)
    grads_fast = torch.autograd.grad((ravlt.rala(q, k, v, cos, sin) * g).sum(), (q, k, v))
    y_matrix = (ravlt.rala_matrix(q, k, cos, sin) @ v.transpose(-2, -1)).transpose(-2, -1)
    grads_matrix = torch.autograd.grad((y_matrix * g).sum(), (q, k, v))
    for fast, ref in zip(grads_fast, grads_matrix):
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


def test_conv_plus_identity_equals_the_residual_sum():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=6)
    x = torch.randn(2, 6, 5, 7, requires_grad=True)
    fused = ravlt.conv_plus_identity(conv, x)
    fused_grads = torch.autograd.grad(fused.square().sum(), (x, conv.weight, conv.bias))
    plain = x + conv(x)
    plain_grads = torch.autograd.grad(plain.square().sum(), (x, conv.weight, conv.bias))
    torch.testing.assert_close(fused, plain)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind,heads", [("rala", 1), ("rala", 2), ("softmax", 2)])
def test_attention_is_the_same_in_both_memory_layouts(kind, heads):
    # The model runs channels-last; a contiguous (NCHW) input must give the same numbers.
    torch.manual_seed(0)
    attn = ravlt.Attention(16, heads, kind, compile_attn=False)
    x = torch.randn(2, 16, 6, 7)
    cos, sin = ravlt.RoPE2d(16 // heads)(6, 7)
    y_nchw = attn(x, cos, sin)
    y_cl = attn(x.contiguous(memory_format=torch.channels_last), cos, sin)
    torch.testing.assert_close(y_cl, y_nchw, rtol=1e-5, atol=1e-6)


def test_live_tensor_bytes_counts_new_tensors_only():
    old = torch.ones(1000, 1000)  # made before: not counted, nor are its views

    def fn():
        a = torch.ones(1000, 250)  # 1 MB
        b = a * 2  # 1 MB more: 2 MB live
        del a
        c = b + old[:1000, :250]  # 2 MB live again: b and c
        return c.view(-1), old.view(-1)

    with ravlt._LiveTensorBytes() as tracker:
        fn()
    assert tracker.peak == 2 * 1000 * 250 * 4
    assert tracker.live == 0  # everything made inside was freed


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


def test_bench_quick_runs_and_prints_every_section(capsys):
    ravlt.main(["--bench", "--quick", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "torch " + torch.__version__ in out
    rows = [line.split() for line in out.splitlines()]
    model_row = next(r for r in rows if r[:2] == ["ravlt_nano", "eager"])
    assert float(model_row[3]) > 0 and float(model_row[7]) > 0  # inference and training img/s
    layer_rows = [r for r in rows if r[:2] in (["8", "64"], ["16", "256"])]
    assert len(layer_rows) == 2  # RALA and softmax at two sizes
    assert any(r[:1] == ["96x128"] for r in rows)  # the high-resolution table
