# ---- backbone: detection and segmentation (README "Use as a backbone") ----
import argparse
import math
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ravlt

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
    release_format = {"model": full.state_dict(), "epoch": 299,
                      "args": argparse.Namespace(model="RAVLT_T")}
    torch.save(release_format, folder / "RAVLT_T.pth")
    blocks = readme_python_blocks("Use as a backbone")
    assert len(blocks) >= 3, "expected the FPN helper, the detectors and the segmentation example"
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
    assert [f.shape[1] for f in feats] == list(body.feature_channels) == [64, 128, 256, 512]
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
