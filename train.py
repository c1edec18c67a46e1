"""
Train or evaluate RAVLT on CIFAR, ImageNet or any ImageNet-layout folder, in one file.

    python train.py --model ravlt_t                                   # CIFAR-10, one process
    torchrun --nproc_per_node 8 train.py --model ravlt_t --dataset imagenet --data-path DIR
    python train.py --dataset imagenet --data-path DIR --eval-only --resume RAVLT_T.pth
    python train.py --model ravlt_t --pretrained --dataset cifar100 --input-size 224 --lr 4e-4 --epochs 30

With --dataset imagenet (or fake) the defaults are the release's ImageNet recipe (DeiT's): AdamW at 5e-4 per 512
images of global batch, weight decay 0.05 (none on 1-D parameters), 5 warm-up epochs from 1e-6 then
cosine to 1e-5, label smoothing 0.1, MixUp 0.8 / CutMix 1.0, RandAugment, random erasing 0.25,
repeated augmentation ×3, an EMA of the weights, SyncBatchNorm, mixed precision, 300 epochs.
`--dataset cifar10|cifar100` switches to a small-image preset (PRESETS). After every epoch one JSON
line goes to OUTPUT_DIR/log.jsonl and OUTPUT_DIR/checkpoint.pth is replaced; `--resume` continues
from it exactly as if the run had never stopped.
"""
import argparse
import dataclasses
import json
import math
import os
import random
import re
import sys
import tempfile
import time
import warnings

from PIL import Image, UnidentifiedImageError
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision import datasets
from torchvision.transforms import v2 as T
from tqdm import tqdm

import ravlt

# the cores this process may use, which DataLoader also counts before warning of too many workers
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
# Only these defaults differ between the release's ImageNet recipe and the CIFAR preset; a flag
# given on the command line always wins. `fake` data stands in for ImageNet.
PRESETS = {
    "imagenet": dict(epochs=300, batch_size=128, lr=5e-4, warmup_epochs=5, input_size=224,
                     repeated_aug=True, model_ema=True, workers=min(8, CORES)),
    "cifar": dict(epochs=100, batch_size=128, lr=2e-3, warmup_epochs=5, input_size=32,
                  repeated_aug=False, model_ema=False, workers=min(4, CORES)),
}
RA_REPEATS = 3  # repeated augmentation: copies of each image per epoch, as DeiT and the release
TRAIN_STATE = ("model", "optimizer", "scheduler", "scaler", "epoch", "rng", "sampler")


def fail(message):
    """Bad input: one line on stderr and exit code 2 (argparse's convention), never a traceback."""
    print(f"train.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def ranged(cast, ok, expected):
    """An argparse type: `cast` the text and keep the value if ok(value), else name the allowed range."""
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


positive_int = ranged(int, lambda v: v >= 1, "an integer >= 1")
natural = ranged(int, lambda v: v >= 0, "an integer >= 0")
seed_int = ranged(int, lambda v: 0 <= v < 2**32, "an integer in [0, 2^32)")
positive = ranged(float, lambda v: v > 0, "a number > 0")
non_negative = ranged(float, lambda v: v >= 0, "a number >= 0")
fraction = ranged(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
below_one = ranged(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def aa_policy(text):
    if text in ("none", "trivialaugment") or re.fullmatch(r"rand-m(\d|10)-n\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"unknown policy {text!r}; use rand-mM-nN with M in 0-10 (e.g. "
                                     "rand-m9-n2), trivialaugment or none")


def get_args_parser():
    p = argparse.ArgumentParser(description="Train or evaluate RAVLT. A default marked 'cifar' applies "
                                "to --dataset cifar10/cifar100, the other one to imagenet and fake.")
    p.error = fail  # one line instead of argparse's usage block followed by the error
    add = p.add_argument
    # model and data
    add("--model", default="ravlt_t", choices=list(ravlt.VARIANTS), metavar="NAME",
        help=f"variant: {', '.join(ravlt.VARIANTS)} (default: ravlt_t)")
    add("--drop-path", type=below_one, metavar="P",
        help="stochastic-depth probability of the last block (default: the variant's own, 0.1 for T)")
    add("--input-size", type=positive_int, metavar="PX", help="image side, pixels (default: 224; cifar 32)")
    add("--dataset", default="cifar10", choices=["cifar10", "cifar100", "imagenet", "fake"],
        help="cifar10/cifar100 (downloaded when absent), imagenet (any folder DIR/train/<class>/, "
             "DIR/val/<class>/), fake (random images) (default: cifar10)")
    add("--data-path", metavar="DIR", help="dataset folder (default: ./data for cifar; needed for imagenet)")
    add("--fake-samples", type=positive_int, default=512, metavar="N",
        help="images in the fake training set; its val set has N/4 (default: 512)")
    add("--workers", type=natural, metavar="N", help="data-loading processes per process (default: the "
        f"cores this process may use, at most 8, here {PRESETS['imagenet']['workers']}; cifar at most 4)")
    # optimisation
    add("--epochs", type=positive_int, metavar="N", help="training epochs (default: 300; cifar 100)")
    add("--batch-size", type=positive_int, metavar="N",
        help="images per process and step; global batch = N × processes (default: 128; cifar 128)")
    add("--lr", type=positive, help="peak learning rate per 512 images of global batch, scaled "
                                    "linearly to the real global batch (default: 5e-4; cifar 2e-3)")
    add("--min-lr", type=non_negative, default=1e-5, metavar="LR",
        help="final learning rate of the cosine (default: 1e-5)")
    add("--warmup-lr", type=positive, default=1e-6, metavar="LR",
        help="learning rate of the first step (default: 1e-6)")
    add("--warmup-epochs", type=natural, metavar="N", help="epochs of linear warm-up (default: 5; cifar 5)")
    add("--weight-decay", type=non_negative, default=0.05, metavar="WD",
        help="AdamW decoupled weight decay, none on biases and other 1-D parameters (default: 0.05)")
    add("--clip-grad", type=positive, metavar="NORM",
        help="clip the gradients' global L2 norm to NORM (default: no clipping)")
    # augmentation and regularisation
    add("--smoothing", type=fraction, default=0.1, metavar="EPS",
        help="label smoothing: share of each target spread over all classes (default: 0.1)")
    add("--mixup", type=non_negative, default=0.8, metavar="ALPHA",
        help="MixUp Beta(α, α) parameter, 0 = off (default: 0.8)")
    add("--cutmix", type=non_negative, default=1.0, metavar="ALPHA",
        help="CutMix Beta(α, α) parameter, 0 = off; with both on, each batch uses one (default: 1.0)")
    add("--aa", type=aa_policy, default="rand-m9-n2", metavar="POLICY",
        help="augmentation policy: rand-mM-nN (RandAugment, N ops of magnitude M on timm's 0-10 "
             "scale), trivialaugment, or none (default: rand-m9-n2)")
    add("--color-jitter", type=non_negative, default=0.4, metavar="F",
        help="brightness/contrast/saturation jitter, only with --aa none, as in timm (default: 0.4)")
    add("--reprob", type=fraction, default=0.25, metavar="P",
        help="random-erasing probability per image (default: 0.25)")
    add("--repeated-aug", action=argparse.BooleanOptionalAction,
        help=f"repeated augmentation: each image {RA_REPEATS}× per epoch, on different processes "
             "(default: on; cifar off)")
    add("--model-ema", action=argparse.BooleanOptionalAction,
        help="keep, evaluate and save an exponential moving average of the weights (default: on; cifar off)")
    add("--model-ema-decay", type=fraction, default=0.99996, metavar="D",
        help="EMA decay per step at global batch 512; D^(B/512) at batch B (default: 0.99996)")
    # runtime
    add("--amp", choices=["bf16", "fp16", "none"],
        help="mixed precision: bf16 autocast, fp16 autocast with loss scaling (the release's), or none "
             "= float32 (default: bf16 on GPUs that have it, else fp16; none on CPU)")
    add("--compile", action="store_true", help="wrap the model in torch.compile (default: off)")
    add("--device", choices=["cuda", "cpu"],
        help="where to compute; under torchrun process r takes cuda:LOCAL_RANK (default: cuda if available)")
    add("--seed", type=seed_int, default=0, metavar="N",
        help="random seed; process r augments with N + r (default: 0)")
    add("--output-dir", metavar="DIR",
        help="folder for log.jsonl and checkpoint.pth (default: output/MODEL_DATASET)")
    add("--resume", metavar="PATH", help="checkpoint.pth to continue from; with --eval-only, any "
                                         "checkpoint ravlt.load_checkpoint reads (default: none)")
    add("--pretrained", nargs="?", const=True, metavar="PATH",
        help="start from the release's ImageNet-1k weights for --model (no PATH; downloaded once into "
             "torch's hub cache) or from PATH (any checkpoint ravlt.load_checkpoint reads), with a new "
             "classifier when the number of classes differs (default: random init)")
    add("--eval-only", action="store_true",
        help="evaluate --resume's weights (and EMA weights, if any) on the val set, then stop (default: off)")
    return p


# -----------------------------------------------------------------------------
# Data


class RepeatAugSampler(torch.utils.data.Sampler):
    """Repeated augmentation (DeiT's RASampler): every image appears RA_REPEATS times per epoch, the
    copies on consecutive processes, so each process sees another augmentation of the same image.
    An epoch is still about len(dataset) samples, i.e. it covers ~1/RA_REPEATS of the unique images."""

    def __init__(self, num_images, num_replicas, rank, seed=0):
        self.num_images, self.num_replicas, self.rank, self.seed = num_images, num_replicas, rank, seed
        self.num_samples, self.epoch = math.ceil(num_images / num_replicas), 0  # per process

    def set_epoch(self, epoch):
        self.epoch = epoch  # the order depends only on (seed, epoch), so a resumed run replays it

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_images, generator=g).repeat_interleave(RA_REPEATS)  # (3n,)
        return iter(order[self.rank::self.num_replicas][:self.num_samples].tolist())

    def __len__(self):
        return self.num_samples


class UnreadableImage(Exception):
    """An image file that cannot be decoded. Raised in a DataLoader worker, it reaches the main process
    as this type again, its text the worker's traceback: the message is that text's last line."""

    def __str__(self):
        return super().__str__().strip().splitlines()[-1].split("UnreadableImage: ")[-1]


def load_image(path):
    """ImageFolder's loader (PIL, RGB), raising UnreadableImage with the file's name when it fails."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except UnidentifiedImageError:
        reason = "not in a format PIL reads"
    except Exception as e:  # by format: OSError, SyntaxError, ValueError, DecompressionBombError, ...
        reason = str(e).partition("\n")[0] or type(e).__name__
    raise UnreadableImage(f"cannot decode image {path} ({reason})")


def build_datasets(args, rank, world):
    """{split: dataset} without transforms (they need the model's config), and the class count."""
    splits = ("val",) if args.eval_only else ("train", "val")
    if args.dataset == "fake":
        shape, n = (3, args.input_size, args.input_size), args.fake_samples
        return dict(train=datasets.FakeData(n, shape, 1000),
                    val=datasets.FakeData(max(1, n // 4), shape, 1000, random_offset=n)), 1000
    if args.dataset == "imagenet":
        if not args.data_path:
            fail("--dataset imagenet needs --data-path DIR (holding DIR/train/<class>/, DIR/val/<class>/)")
        sets = {}
        for split in splits:
            folder = os.path.join(args.data_path, split)
            if not os.path.isdir(folder):
                fail(f"no folder {folder}; --dataset imagenet expects DIR/train/<class>/<images> and "
                     "DIR/val/<class>/<images>")
            try:
                sets[split] = datasets.ImageFolder(folder, loader=load_image)
            except FileNotFoundError as e:  # no class folders, or no images in them
                fail(f"{folder}: {str(e).splitlines()[0]}")
        if "train" in sets and sets["train"].classes != sets["val"].classes:
            fail(f"{args.data_path}: train has {len(sets['train'].classes)} class folders, val "
                 f"{len(sets['val'].classes)}; they must have the same names")
        return sets, len(sets["val"].classes)
    cifar = datasets.CIFAR10 if args.dataset == "cifar10" else datasets.CIFAR100
    if rank == 0:  # one process downloads, the others wait at the barrier
        try:
            cifar(args.data_path, download=True)  # checks the files; downloads only when absent
        except (OSError, RuntimeError) as e:
            fail(f"could not get {cifar.__name__} ({type(e).__name__}: {e}); offline? put {cifar.filename}"
                 f" from {cifar.url} (or its extracted {cifar.base_folder}/) into {args.data_path}/")
    if world > 1:
        dist.barrier()
    sets = {split: cifar(args.data_path, train=split == "train") for split in splits}
    return sets, len(sets["val"].classes)


def build_mix(args, num_classes):
    """MixUp and/or CutMix on whole batches (one of the two per batch when both are on); None if off.
    Built only when on: torchvision refuses alpha = 0 in the constructor."""
    mixes = [T.MixUp(alpha=args.mixup, num_classes=num_classes)] if args.mixup > 0 else []
    mixes += [T.CutMix(alpha=args.cutmix, num_classes=num_classes)] if args.cutmix > 0 else []
    return T.RandomChoice(mixes) if mixes else None


def build_transforms(args, cfg):
    """Training and evaluation pipelines (PIL image in, normalised float tensor out)."""
    size, bicubic, mean, std = args.input_size, T.InterpolationMode.BICUBIC, cfg["mean"], cfg["std"]
    if args.dataset.startswith("cifar"):  # small images: pad and crop, as the release does at 32 px
        resize = [T.Resize(size, interpolation=bicubic)] if size != 32 else []
        train, val = resize + [T.RandomCrop(size, padding=size // 8)], resize
    else:  # eval resizes to size / crop_pct (224 -> 256) and keeps the central size × size
        train = [T.RandomResizedCrop(size, interpolation=bicubic)]
        val = [T.Resize(int(size / cfg["crop_pct"]), interpolation=bicubic), T.CenterCrop(size)]
    train.append(T.RandomHorizontalFlip())
    fill = [round(255 * c) for c in mean]  # geometric ops fill gaps with the mean colour, as timm's
    if m := re.fullmatch(r"rand-m(\d+)-n(\d+)", args.aa):  # 11 bins: M on timm's 0-10 scale, so
        # that m9 means what it means in the release (rotate 27°, shear 0.27, enhance ±0.81)
        train.append(T.RandAugment(int(m[2]), int(m[1]), num_magnitude_bins=11, interpolation=bicubic,
                                   fill=fill))
    elif args.aa == "trivialaugment":
        train.append(T.TrivialAugmentWide(interpolation=bicubic, fill=fill))
    elif args.color_jitter > 0:  # timm applies colour jitter only when no policy is set
        train.append(T.ColorJitter(*[args.color_jitter] * 3))
    tensor = [T.PILToTensor(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
    erase = [T.RandomErasing(args.reprob, value="random")] if args.reprob > 0 else []  # noise patch
    return T.Compose(train + tensor + erase), T.Compose(val + tensor)


# -----------------------------------------------------------------------------
# Checkpoints and random state


def read_checkpoint(path):
    """ravlt.read_checkpoint (weights_only=True: a checkpoint is data, never code), read once."""
    try:
        ckpt = ravlt.read_checkpoint(path)
    except FileNotFoundError:
        fail(f"--resume {path}: no such file")
    except ValueError as e:  # a directory, empty, truncated, not a checkpoint, ...
        fail(str(e).strip().splitlines()[0])
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model", ckpt), dict):
        fail(f"checkpoint {path} holds no state dict (expected a dict, or a dict with a 'model' entry)")
    return ckpt


def load_weights(model, path, ckpt, use_ema=False):
    """ravlt.load_checkpoint on the dict read once, refusing a classifier made for another number of
    classes (which it would otherwise replace by the model's fresh head, as suits fine-tuning)."""
    try:
        ravlt.load_checkpoint(model, ckpt, use_ema=use_ema, new_head=False)
    except ValueError as e:
        fail(f"{path}: {str(e).splitlines()[0]}")


def prepare_output_dir(folder):
    """Create --output-dir and prove it writable now, so that a bad one fails before any work."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        fail(f"--output-dir {folder} is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        fail(f"--output-dir {folder} cannot be created or written ({e.strerror or e})")


def save_checkpoint(state, path):
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a crash leaves the old file or the new one, never half


def rng_state(device):
    state = dict(torch=torch.get_rng_state(), python=random.getstate())
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


# -----------------------------------------------------------------------------
# One epoch of training, one pass of evaluation


def train_one_epoch(model, raw_model, model_ema, criterion, mix, loader, optimizer, scheduler, scaler,
                    device, amp_dtype, epoch, args):
    """Mean training loss, the last step's learning rate, and images/s, all processes together."""
    model.train()
    world = dist.get_world_size() if dist.is_initialized() else 1
    loss_sum = torch.zeros((), device=device)
    bar = tqdm(loader, f"epoch {epoch + 1}/{args.epochs}", leave=False, disable=not is_main())
    start = time.perf_counter()
    for step, (images, targets) in enumerate(bar):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if mix is not None:
            images, targets = mix(images, targets)  # targets (B,) -> (B, classes) mixed one-hots
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = criterion(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.clip_grad:
            scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
            nn.utils.clip_grad_norm_(raw_model.parameters(), args.clip_grad)
        lr = optimizer.param_groups[0]["lr"]
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()  # per step, so warm-up and cosine stay smooth even over few epochs
        if model_ema is not None:
            model_ema.update_parameters(raw_model)
        loss_sum += loss.detach()
        if step % 10 == 0 or step == len(loader) - 1:  # .item() waits for the GPU: not every step
            if not math.isfinite(value := loss.item()):
                print(f"train.py: loss is {value} at epoch {epoch + 1}, step {step}; try a lower --lr or "
                      "--clip-grad", file=sys.stderr)
                raise SystemExit(1)
            speed = (step + 1) * len(images) * world / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.0f}")
    elapsed = time.perf_counter() - start
    if world > 1:
        dist.all_reduce(loss_sum)
    return dict(train_loss=loss_sum.item() / (len(loader) * world), lr=lr,
                img_per_s=len(loader) * args.batch_size * world / elapsed)


@torch.no_grad()
def evaluate(model, loader, device, amp_dtype):
    """Cross-entropy and top-1/top-5 accuracy (%) over the whole val set; each process holds a shard."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, images
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images).float()  # (B, classes)
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]  # (B, 5)
        totals[0] += F.cross_entropy(logits, targets, reduction="sum")
        totals[1] += hits[:, 0].sum()
        totals[2] += hits.any(1).sum()
        totals[3] += len(targets)
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss, top1, top5, n = totals.tolist()
    return dict(loss=loss / n, acc1=100 * top1 / n, acc5=100 * top5 / n)


# -----------------------------------------------------------------------------
# Main


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def init_distributed(args):
    """(rank, world size, device): torchrun sets RANK and LOCAL_RANK; without them, one process."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda, but no CUDA GPU is visible")
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size(), device


def finish_distributed():
    # all processes reach the end before the group goes: tearing it down while another process is
    # still saving or evaluating can hang (pytorch/pytorch#75097), hence the barrier first
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(args):
    """run(args), with an image that cannot be decoded turned into one line saying what to do."""
    started = time.time()
    try:
        return run(args)
    except UnreadableImage as e:
        saved = os.path.join(args.output_dir, "checkpoint.pth")  # this run's last finished epoch
        saved = saved if os.path.isfile(saved) and os.path.getmtime(saved) >= started else args.resume
        fail(f"{e}; fix or delete it, then " +
             (f"continue with --resume {saved}" if saved and not args.eval_only else "run again"))


def run(args):
    rank, world, device = init_distributed(args)
    log = print if rank == 0 else (lambda *a, **k: None)
    cifar = args.dataset.startswith("cifar")
    for key, value in PRESETS["cifar" if cifar else "imagenet"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.data_path = args.data_path or ("data" if cifar else None)
    args.output_dir = args.output_dir or os.path.join("output", f"{args.model}_{args.dataset}")
    if args.amp is None:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        args.amp = "none" if device.type == "cpu" else "bf16" if bf16 else "fp16"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest convolutions once
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.eval_only and not args.resume:
        fail("--eval-only needs --resume PATH, the checkpoint to evaluate")
    if args.pretrained is not None and args.resume:
        fail("--pretrained starts a new run from given weights, --resume continues a run: give one")
    if args.pretrained is True and args.model not in ravlt.PRETRAINED:
        fail(f"--pretrained: {args.model} has no released weights ({', '.join(ravlt.PRETRAINED)} have); "
             "give a PATH")
    if isinstance(args.pretrained, str) and not os.path.isfile(args.pretrained):
        fail(f"--pretrained {args.pretrained}: no such file")
    ckpt = read_checkpoint(args.resume) if args.resume else None  # a bad file fails before any work
    if ckpt is not None and not args.eval_only and (lost := [k for k in TRAIN_STATE if k not in ckpt]):
        fail(f"--resume {args.resume} is not a train.py checkpoint (no {', '.join(lost)}); "
             "to evaluate it, add --eval-only")
    if not args.eval_only:
        prepare_output_dir(args.output_dir)

    torch.manual_seed(args.seed)  # the same initial weights on every process
    sets, num_classes = build_datasets(args, rank, world)
    overrides = {} if args.drop_path is None else dict(drop_path_rate=args.drop_path)
    # with --compile the whole model is compiled, the attention core included
    model = ravlt.create_model(args.model, num_classes=num_classes,
                               compile_attn=False if args.compile else None, **overrides).to(device)
    if args.pretrained is not None:  # fine-tuning: a new head when the class count differs
        path = args.pretrained
        try:
            if path is True:  # process 0 downloads (when not cached), the others then read its file
                if rank > 0:
                    dist.barrier()
                path = ravlt.download_checkpoint(args.model)
                if rank == 0 and world > 1:
                    dist.barrier()
            ravlt.load_checkpoint(model, path)
        except (ValueError, RuntimeError) as e:
            fail(f"--pretrained: {str(e).splitlines()[0]}")
        log(f"weights from {path}")
    train_tf, sets["val"].transform = build_transforms(args, model.pretrained_cfg)
    # process r evaluates images r, r + world, ...; the sums are reduced, so every image counts once
    val_loader = DataLoader(Subset(sets["val"], range(rank, len(sets["val"]), world)), args.batch_size,
                            num_workers=args.workers, pin_memory=device.type == "cuda")

    if args.eval_only:
        results = {}
        for prefix, use_ema in [("val_", False)] + [("ema_val_", True)] * ("model_ema" in ckpt):
            load_weights(model, args.resume, ckpt, use_ema)
            results.update({prefix + k: v for k, v in evaluate(model, val_loader, device, amp_dtype).items()})
        log(json.dumps(results))
        finish_distributed()
        return results

    sets["train"].transform = train_tf
    if ckpt is not None:
        load_weights(model, args.resume, ckpt)
    if world > 1 and device.type == "cuda":  # BatchNorm statistics over the global batch, as released
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    seed = ckpt["sampler"]["seed"] if ckpt else args.seed  # data order: one seed for all processes
    sampler = (RepeatAugSampler(len(sets["train"]), world, rank, seed) if args.repeated_aug else
               DistributedSampler(sets["train"], world, rank, shuffle=True, seed=seed))
    # new workers every epoch (not persistent_workers): their seeds come from the main process's
    # generator, which the checkpoint saves, so a resumed epoch repeats the same augmentations
    train_loader = DataLoader(sets["train"], args.batch_size, sampler=sampler, drop_last=True,
                              num_workers=args.workers, pin_memory=device.type == "cuda")
    if (steps := len(train_loader)) == 0:
        fail(f"{len(sampler)} training images per process, fewer than --batch-size {args.batch_size}")

    global_batch = args.batch_size * world
    lr = args.lr * global_batch / 512
    decay = [p for p in model.parameters() if p.ndim > 1]  # biases, BN and LN weights: no decay
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [dict(params=decay, weight_decay=args.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    optimizer = torch.optim.AdamW(groups, lr=lr, fused=device.type == "cuda")
    warmup, total = args.warmup_epochs * steps, args.epochs * steps
    scheduler = CosineAnnealingLR(optimizer, T_max=max(1, total - warmup), eta_min=args.min_lr)
    if warmup > 0:
        linear = LinearLR(optimizer, min(1.0, args.warmup_lr / lr), 1.0, total_iters=warmup)
        scheduler = SequentialLR(optimizer, [linear, scheduler], milestones=[warmup])
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    mix = build_mix(args, num_classes)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.smoothing)  # also takes mixed soft targets
    model_ema = None
    if args.model_ema:  # decay per step: D^(B/512) at batch B keeps the same decay per image seen
        ema_decay = args.model_ema_decay ** (global_batch / 512)
        model_ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        model_ema.update_parameters(model)  # the first update only copies: start from these weights

    start_epoch = 0
    if ckpt is not None:
        if model_ema is not None and "model_ema" in ckpt:
            model_ema.module.load_state_dict(ckpt["model_ema"])
        elif model_ema is not None:
            log(f"note: {args.resume} has no EMA weights; the EMA restarts from the model's")
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch = ckpt["epoch"]
    torch.manual_seed(args.seed + rank)  # different augmentations and drop-path masks per process
    random.seed(args.seed + rank)
    if ckpt is not None and len(ckpt["rng"]) == world:
        set_rng_state(ckpt["rng"][rank], device)
    elif ckpt is not None:
        log(f"note: checkpoint from {len(ckpt['rng'])} processes, now {world}: random state reseeded")

    # DDP flags depthwise weights (C, 1, k, k) whose gradient strides differ only on the size-1 dim:
    # the memory layout is the same, so the warning is noise
    warnings.filterwarnings("ignore", "Grad strides do not match bucket view strides")
    train_model = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    train_model = torch.compile(train_model) if args.compile else train_model
    eval_model = torch.compile(model) if args.compile else model  # outside DDP: shards may differ

    log_path, ckpt_path = (os.path.join(args.output_dir, f) for f in ("log.jsonl", "checkpoint.pth"))
    if rank == 0 and ckpt is None:
        open(log_path, "w").close()  # a fresh run starts a fresh log
    log(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {num_classes} "
        f"classes, {len(sets['train'])} train / {len(sets['val'])} val images, {world} process(es) on "
        f"{device.type}, global batch {global_batch}, peak lr {lr:.3g}, amp {args.amp}")
    if start_epoch >= args.epochs:
        log(f"nothing to do: {args.resume} is at epoch {start_epoch} of --epochs {args.epochs}; "
            "raise --epochs to train on")

    row = {}
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        start = time.perf_counter()
        trained = train_one_epoch(train_model, model, model_ema, criterion, mix, train_loader, optimizer,
                                  scheduler, scaler, device, amp_dtype, epoch, args)
        if world > 1 and device.type != "cuda":  # no SyncBatchNorm on CPU: statistics drift apart
            for buffer in [*model.buffers(), *(model_ema.module.buffers() if model_ema else [])]:
                if buffer.is_floating_point():
                    dist.all_reduce(buffer)
                    buffer /= world
        val = evaluate(eval_model, val_loader, device, amp_dtype)
        row = dict(epoch=epoch + 1, train_loss=trained["train_loss"], val_loss=val["loss"],
                   val_acc1=val["acc1"], val_acc5=val["acc5"], lr=trained["lr"],
                   img_per_s=trained["img_per_s"])
        if model_ema is not None:
            ema = evaluate(model_ema.module, val_loader, device, amp_dtype)
            row.update(ema_val_loss=ema["loss"], ema_val_acc1=ema["acc1"], ema_val_acc5=ema["acc5"])
        row["epoch_time"] = time.perf_counter() - start
        states = [rng_state(device)] * world
        if world > 1:  # every process's generators, so that each resumes its own random stream
            dist.all_gather_object(states, rng_state(device))
        if rank == 0:
            state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                         scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), epoch=epoch + 1,
                         rng=states, sampler=dict(seed=seed, next_epoch=epoch + 1), args=dict(vars(args)),
                         model_config=dict(name=args.model, **dataclasses.asdict(model.cfg)))
            if model_ema is not None:
                state["model_ema"] = model_ema.module.state_dict()
            save_checkpoint(state, ckpt_path)
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        ema_text = f", EMA acc1 {row['ema_val_acc1']:.2f}" if model_ema is not None else ""
        log(f"epoch {epoch + 1}/{args.epochs}: train loss {row['train_loss']:.4f}, val loss "
            f"{row['val_loss']:.4f}, acc1 {row['val_acc1']:.2f}, acc5 {row['val_acc5']:.2f}{ema_text}, "
            f"lr {row['lr']:.3g}, {row['img_per_s']:.0f} img/s, {row['epoch_time']:.1f} s")
    finish_distributed()
    return row


if __name__ == "__main__":
    main(get_args_parser().parse_args())
