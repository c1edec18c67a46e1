"""
Train or evaluate RAVLT on CIFAR, ImageNet or any ImageNet-layout folder, in one file.

    python train.py --model ravlt_t                                   # CIFAR-10, one process
    torchrun --nproc_per_node 8 train.py --model ravlt_t --dataset imagenet --data-path DIR
    python train.py --dataset imagenet --data-path DIR --eval-only --resume RAVLT_T.pth
    python train.py --model ravlt_t --pretrained --dataset cifar100 --input-size 224 --lr 4e-4 --epochs 30

The recipe, `run`, in order: check the flags; read --resume's checkpoint; resolve the defaults (the
model and data a checkpoint was trained on, then the dataset's preset); check what a resume changes
and the output folder; read --pretrained's weights; build the datasets, the model, the data loaders,
the optimizer with its learning-rate schedule, and the EMA; restore --resume's state; then each epoch
train, evaluate and save. Bad input fails in one line before any work; nothing is written before the
first epoch starts, and a new run never replaces another run's checkpoint.

With --dataset imagenet (or fake) the defaults are the release's ImageNet recipe (DeiT's): AdamW at 5e-4 per 512
images of global batch, weight decay 0.05 (none on 1-D parameters), 5 warm-up epochs from 1e-6 then
cosine to 1e-5, label smoothing 0.1, MixUp 0.8 / CutMix 1.0, RandAugment, random erasing 0.25,
repeated augmentation ×3, an EMA of the weights, SyncBatchNorm, mixed precision, 300 epochs.
`--dataset cifar10|cifar100` switches to a small-image preset (PRESETS). After every epoch one JSON
line goes to OUTPUT_DIR/log.jsonl and OUTPUT_DIR/checkpoint.pth is replaced; `--resume` continues
from it exactly as if the run had never stopped, and with a larger --epochs extends it.
"""
import argparse
import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import time
import warnings

from PIL import Image, UnidentifiedImageError
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
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
TRAIN_STATE = ("model", "optimizer", "scaler", "epoch", "rng", "sampler")
# --resume and --eval-only take these from the checkpoint's saved flags unless given ("what" was trained)
SAVED_DEFAULTS = ("model", "input_size")
DATA_FLAGS = ("dataset", "data_path", "fake_samples")  # taken together, with --dataset
# flags whose change on --resume does not alter the training itself (batch size: stated as global batch)
NOT_RECIPE = {"resume", "output_dir", "workers", "device", "compile", "eval_only", "pretrained", "seed",
              "batch_size"}


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
    add("--model", choices=list(ravlt.VARIANTS), metavar="NAME", help="variant: "
        f"{', '.join(ravlt.VARIANTS)} (default: ravlt_t; with --resume, the checkpoint's, as for the data)")
    add("--drop-path", type=below_one, metavar="P",
        help="stochastic-depth probability of the last block (default: the variant's own, 0.1 for T)")
    add("--input-size", type=positive_int, metavar="PX", help="image side, pixels (default: 224; cifar 32)")
    add("--dataset", choices=["cifar10", "cifar100", "imagenet", "fake"],
        help="cifar10/cifar100 (downloaded when absent), imagenet (any folder DIR/train/<class>/, "
             "DIR/val/<class>/), fake (random images) (default: cifar10)")
    add("--data-path", metavar="DIR", help="dataset folder (default: ./data for cifar; needed for imagenet)")
    add("--fake-samples", type=positive_int, metavar="N",
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
        help="folder for log.jsonl and checkpoint.pth; a new run refuses one that holds a checkpoint "
             "(default: output/MODEL_DATASET; with --resume, the checkpoint's folder)")
    add("--resume", metavar="PATH", help="checkpoint.pth to continue from, on the model, data and input "
        "size it holds unless given; other flags are this command's, a change stated; with --eval-only, "
        "any checkpoint ravlt.load_checkpoint reads (default: none)")
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
        made = first_missing(args.data_path)
        try:
            cifar(args.data_path, download=True)  # checks the files; downloads only when absent
        except (OSError, RuntimeError) as e:
            if made:  # what the failed download created (it makes the folder first): leave no trace
                shutil.rmtree(made, ignore_errors=True)
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
# Flags, checkpoints and the output folder: everything checked before any work


def check_flags(args):
    """Combinations that cannot work, refused before anything is read."""
    if args.eval_only and not args.resume:
        fail("--eval-only needs --resume PATH, the checkpoint to evaluate")
    if args.pretrained is not None and args.resume:
        fail("--pretrained starts a new run from given weights, --resume continues a run: give one")


def read_checkpoint(flag, path):
    """ravlt.read_checkpoint (weights_only: a checkpoint is data, never code) and ravlt's own test that
    the file holds weights, done once before any work; whatever is wrong ends the run in one line."""
    try:
        ckpt = ravlt.read_checkpoint(path)
        ravlt._state_dict(ckpt, f"checkpoint {path}", use_ema=False)
    except FileNotFoundError:
        fail(f"{flag} {path}: no such file")
    except ValueError as e:  # a directory, empty, truncated, not a checkpoint, no weights in it, ...
        fail(f"{flag}: {str(e).strip().splitlines()[0]}")
    return ckpt


def resolve_defaults(args, ckpt, device):
    """Fill in the flags not given: the model, input size and data a train.py checkpoint (--resume) was
    trained on, then the dataset's preset, the output folder (a resumed run's own) and the precision."""
    saved = ckpt.get("args") if ckpt is not None else None
    saved = saved if isinstance(saved, dict) else {}  # the release's files hold another kind of record
    for key in SAVED_DEFAULTS + (DATA_FLAGS if args.dataset is None else ()):
        if getattr(args, key) is None:
            setattr(args, key, saved.get(key))
    args.model, args.dataset = args.model or "ravlt_t", args.dataset or "cifar10"
    cifar = args.dataset.startswith("cifar")
    for key, value in dict(PRESETS["cifar" if cifar else "imagenet"], fake_samples=512).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.data_path = args.data_path or ("data" if cifar else None)
    if args.output_dir is None:
        resumed = args.resume and not args.eval_only
        args.output_dir = ((os.path.dirname(args.resume) or ".") if resumed else
                           os.path.join("output", f"{args.model}_{args.dataset}"))
    if args.amp is None:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        args.amp = "none" if device.type == "cpu" else "bf16" if bf16 else "fp16"


def check_resume(args, ckpt, world, log):
    """A resumed run goes on with the data it was trained on: another --dataset (or number of fake
    images) is refused. Any other flag may change, the schedule following the flags; what differs from
    the checkpoint's flags is stated in one line."""
    if lost := [k for k in TRAIN_STATE if k not in ckpt]:
        fail(f"--resume {args.resume} is not a train.py checkpoint (no {', '.join(lost)}); "
             "to evaluate it, add --eval-only")
    saved = ckpt.get("args", {})
    for key in ("dataset", "fake_samples") if args.dataset == "fake" else ("dataset",):
        if key in saved and saved[key] != getattr(args, key):
            flag = "--" + key.replace("_", "-")
            fail(f"{flag} {getattr(args, key)}: {args.resume} was trained with {flag} {saved[key]}, and a "
                 f"resumed run keeps its data; to train these weights on other data, start a new run "
                 f"with --pretrained {args.resume}")
    changes = [f"--{k.replace('_', '-')} {getattr(args, k)} (was {v})" for k, v in saved.items()
               if k not in NOT_RECIPE and getattr(args, k, v) != v]
    batch, was = args.batch_size * world, saved.get("batch_size", args.batch_size) * len(ckpt["rng"])
    if batch != was:  # a step then sees another number of images: the peak lr follows (--lr is per 512)
        changes.append(f"global batch {batch} (was {was}), so peak lr {args.lr * batch / 512:.3g} (was "
                       f"{saved.get('lr', args.lr) * was / 512:.3g})")
    if changes:
        log(f"note: {args.resume} continues with {', '.join(changes)}")


def first_missing(path):
    """The outermost folder that making `path` would create; None if it exists."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        path, missing = os.path.dirname(path), path
    return missing


def check_output_dir(args):
    """--output-dir can be made and written (checked without making it: the run makes it once it starts)
    and holds no other run's checkpoint, which this run would replace."""
    folder, missing = args.output_dir, first_missing(args.output_dir)
    if missing is None and not os.path.isdir(folder):
        fail(f"--output-dir {folder} is a file, not a folder")
    parent = os.path.dirname(missing) if missing else folder  # the folder that must take a new entry
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        why = "not writable" if os.path.isdir(parent) else "a file"
        fail(f"--output-dir {folder} cannot be created or written ({parent} is {why})")
    held = os.path.join(folder, "checkpoint.pth")
    if os.path.isfile(held) and not (args.resume and os.path.samefile(held, args.resume)):
        try:
            old = ravlt.read_checkpoint(held)
            what = f"a run of {old['model_config']['name']} at epoch {old['epoch']} of {old['args']['epochs']}"
        except (ValueError, KeyError, TypeError):
            what = "a checkpoint.pth"
        fail(f"--output-dir {folder} holds {what}; continue it with --resume {held}, or give another "
             "--output-dir")


def read_pretrained(args, rank, world):
    """(path, checkpoint) of --pretrained: PATH, or the release's file for --model, which process 0
    downloads when it is not cached while the others wait, then all read."""
    path = args.pretrained
    if path is True:
        if args.model not in ravlt.PRETRAINED:
            fail(f"--pretrained: {args.model} has no released weights ({', '.join(ravlt.PRETRAINED)} have); "
                 "give a PATH")
        if rank > 0:
            dist.barrier()
        try:
            path = ravlt.download_checkpoint(args.model)
        except RuntimeError as e:  # offline, ...: it says where to put the file by hand
            fail(f"--pretrained: {str(e).splitlines()[0]}")
        if rank == 0 and world > 1:
            dist.barrier()
    return path, read_checkpoint("--pretrained", path)


def load_weights(model, flag, path, ckpt, use_ema=False):
    """ravlt.load_checkpoint on a checkpoint read once: --pretrained's with a new classifier when the
    class count differs (fine-tuning); --resume's must fit, a classifier for other classes is refused."""
    try:
        ravlt.load_checkpoint(model, ckpt, use_ema=use_ema, new_head=flag == "--pretrained")
    except ValueError as e:
        fail(f"{flag} {path}: {str(e).splitlines()[0]}")


# -----------------------------------------------------------------------------
# Model, optimizer, checkpoints


def build_loaders(sets, args, ckpt, device, rank, world):
    """The val loader and, to train, the train sampler and loader; a batch larger than the data fails."""
    pin = device.type == "cuda"
    # process r evaluates images r, r + world, ...; the sums are reduced, so every image counts once
    val = DataLoader(Subset(sets["val"], range(rank, len(sets["val"]), world)), args.batch_size,
                     num_workers=args.workers, pin_memory=pin)
    if args.eval_only:
        return val, None, None
    seed = ckpt["sampler"]["seed"] if ckpt else args.seed  # data order: one seed for all processes
    sampler = (RepeatAugSampler(len(sets["train"]), world, rank, seed) if args.repeated_aug else
               DistributedSampler(sets["train"], world, rank, shuffle=True, seed=seed))
    # new workers every epoch (not persistent_workers): their seeds come from the main process's
    # generator, which the checkpoint saves, so a resumed epoch repeats the same augmentations
    train = DataLoader(sets["train"], args.batch_size, sampler=sampler, drop_last=True,
                       num_workers=args.workers, pin_memory=pin)
    if len(train) == 0:
        fail(f"{len(sampler)} training images per process, fewer than --batch-size {args.batch_size}")
    return val, sampler, train


def build_model(args, num_classes, device, world):
    overrides = {} if args.drop_path is None else dict(drop_path_rate=args.drop_path)
    # with --compile the whole model is compiled, the attention core included
    model = ravlt.create_model(args.model, num_classes=num_classes,
                               compile_attn=False if args.compile else None, **overrides).to(device)
    if world > 1 and device.type == "cuda":  # BatchNorm statistics over the global batch, as released
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def build_optimizer(model, args, steps, world, device):
    """AdamW (no weight decay on biases, BatchNorm and LayerNorm weights) and schedule(step), the lr of
    each step: linear warm-up from --warmup-lr, then cosine to --min-lr. A function of the flags alone,
    with no state: a resumed run, even one given more --epochs, follows the schedule of a straight run."""
    peak = args.lr * args.batch_size * world / 512  # --lr is per 512 images of global batch
    groups = [dict(params=[p for p in model.parameters() if p.ndim > 1], weight_decay=args.weight_decay),
              dict(params=[p for p in model.parameters() if p.ndim <= 1], weight_decay=0.0)]
    optimizer = torch.optim.AdamW(groups, lr=peak, fused=device.type == "cuda")
    warmup, total, first = args.warmup_epochs * steps, args.epochs * steps, min(args.warmup_lr, peak)

    def schedule(step):
        if step < warmup:
            return first + (peak - first) * step / warmup
        done = (step - warmup) / max(1, total - warmup)  # 0 to 1 over the cosine
        return args.min_lr + (peak - args.min_lr) * (1 + math.cos(math.pi * done)) / 2
    return optimizer, schedule


def build_ema(model, args, world):
    """An exponential moving average of the weights, or None; its decay per step, D^(B/512) at global
    batch B, keeps the same decay per image seen."""
    if not args.model_ema:
        return None
    decay = args.model_ema_decay ** (args.batch_size * world / 512)
    model_ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    model_ema.update_parameters(model)  # the first update only copies: start from these weights
    return model_ema


def restore(ckpt, args, model_ema, optimizer, scaler, device, rank, world, log):
    """Continue --resume's run: the EMA, AdamW's moments (its hyper-parameters stay the flags'), the loss
    scale and each process's random state; returns the epoch to start at. The lr needs nothing: it is
    a function of the flags and the step."""
    if model_ema is not None and "model_ema" in ckpt:
        model_ema.module.load_state_dict(ckpt["model_ema"])
    elif model_ema is not None:
        log(f"note: {args.resume} has no EMA weights; the EMA restarts from the model's")
    optimizer.load_state_dict(dict(ckpt["optimizer"], param_groups=optimizer.state_dict()["param_groups"]))
    scaler.load_state_dict(ckpt["scaler"])
    if len(ckpt["rng"]) == world:
        set_rng_state(ckpt["rng"][rank], device)
    else:
        log(f"note: checkpoint from {len(ckpt['rng'])} processes, now {world}: random state reseeded")
    if ckpt["epoch"] >= args.epochs:
        log(f"nothing to do: {args.resume} is at epoch {ckpt['epoch']} of --epochs {args.epochs}; "
            "raise --epochs to train on")
    return ckpt["epoch"]


def wrap(model, args, world):
    """The module that trains (DDP across processes, then compiled) and the one that evaluates (compiled
    alone, outside DDP: the processes' val shards may differ)."""
    # DDP flags depthwise weights (C, 1, k, k) whose gradient strides differ only on the size-1 dim:
    # the memory layout is the same, so the warning is noise
    warnings.filterwarnings("ignore", "Grad strides do not match bucket view strides")
    train_model = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    return (torch.compile(train_model), torch.compile(model)) if args.compile else (train_model, model)


def start_output(args, fresh, rank):
    """Make --output-dir now that the run starts (a run that stops on bad input leaves nothing); a new
    run starts a new log."""
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        if fresh:
            open(os.path.join(args.output_dir, "log.jsonl"), "w").close()


def save(row, model, model_ema, optimizer, scaler, sampler, args, device, rank, world):
    """After an epoch: checkpoint.pth replaced (the model's own keys, without DDP's or compile's
    prefixes) with every process's random state, and `row` appended to log.jsonl."""
    states = [rng_state(device)] * world
    if world > 1:  # every process's generators, so that each resumes its own random stream
        dist.all_gather_object(states, rng_state(device))
    if rank > 0:
        return
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                 epoch=row["epoch"], rng=states, sampler=dict(seed=sampler.seed, next_epoch=row["epoch"]),
                 args=dict(vars(args)), model_config=dict(name=args.model, **dataclasses.asdict(model.cfg)))
    if model_ema is not None:
        state["model_ema"] = model_ema.module.state_dict()
    path = os.path.join(args.output_dir, "checkpoint.pth")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a crash leaves the old file or the new one, never half
    with open(os.path.join(args.output_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


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


def train_one_epoch(model, raw_model, model_ema, criterion, mix, loader, optimizer, schedule, scaler,
                    device, amp_dtype, epoch, args):
    """Mean training loss, the last step's learning rate, and images/s, all processes together."""
    model.train()
    world = dist.get_world_size() if dist.is_initialized() else 1
    loss_sum = torch.zeros((), device=device)
    bar = tqdm(loader, f"epoch {epoch + 1}/{args.epochs}", leave=False, disable=not is_main())
    start = time.perf_counter()
    for step, (images, targets) in enumerate(bar):
        lr = schedule(epoch * len(loader) + step)  # per step: warm-up and cosine stay smooth over few epochs
        for group in optimizer.param_groups:
            group["lr"] = lr
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
        scaler.step(optimizer)
        scaler.update()
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


def validate(model, model_ema, loader, device, amp_dtype):
    """val_loss, val_acc1, val_acc5 of the weights, and ema_val_* of the EMA's when there is one."""
    row = {f"val_{k}": v for k, v in evaluate(model, loader, device, amp_dtype).items()}
    if model_ema is not None:
        row.update({f"ema_val_{k}": v for k, v in evaluate(model_ema.module, loader, device, amp_dtype).items()})
    return row


def evaluate_checkpoint(model, ckpt, loader, device, amp_dtype, args, log):
    """--eval-only: the checkpoint's weights, and its EMA weights if any, on the val set; one line for a
    person, one JSON line."""
    results, text = {}, []
    for prefix, use_ema in [("val_", False)] + [("ema_val_", True)] * ("model_ema" in ckpt):
        load_weights(model, "--resume", args.resume, ckpt, use_ema)
        result = evaluate(model, loader, device, amp_dtype)
        results.update({prefix + k: v for k, v in result.items()})
        text.append(f"{'EMA' if use_ema else 'weights'}: top-1 {result['acc1']:.2f}%, top-5 "
                    f"{result['acc5']:.2f}%, loss {result['loss']:.4f}")
    log(f"{args.resume}, {args.model} on {args.dataset} val ({len(loader.dataset.dataset)} images), "
        + "; ".join(text))
    log(json.dumps(results))
    return results


def average_buffers(model, model_ema, world, device):
    """Processes on CPU have no SyncBatchNorm: their BatchNorm statistics drift apart; average them."""
    if world > 1 and device.type != "cuda":
        for buffer in [*model.buffers(), *(model_ema.module.buffers() if model_ema else [])]:
            if buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer /= world


# -----------------------------------------------------------------------------
# Main


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def init_distributed(args):
    """(rank, world size, device): torchrun sets RANK and LOCAL_RANK; without them, one process."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda, but no CUDA GPU is visible")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest convolutions once
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
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
        result = run(args)
    except UnreadableImage as e:
        saved = os.path.join(args.output_dir, "checkpoint.pth")  # this run's last finished epoch
        saved = saved if os.path.isfile(saved) and os.path.getmtime(saved) >= started else args.resume
        fail(f"{e}; fix or delete it, then " +
             (f"continue with --resume {saved}" if saved and not args.eval_only else "run again"))
    finish_distributed()
    return result


def run(args):
    rank, world, device = init_distributed(args)
    log = print if rank == 0 else (lambda *a, **k: None)
    check_flags(args)
    ckpt = read_checkpoint("--resume", args.resume) if args.resume else None
    resolve_defaults(args, ckpt, device)
    if ckpt is not None and not args.eval_only:
        check_resume(args, ckpt, world, log)
    if not args.eval_only:
        check_output_dir(args)
    pretrained = read_pretrained(args, rank, world) if args.pretrained is not None else None

    torch.manual_seed(args.seed)  # the same initial weights on every process
    sets, num_classes = build_datasets(args, rank, world)
    val_loader, sampler, train_loader = build_loaders(sets, args, ckpt, device, rank, world)
    model = build_model(args, num_classes, device, world)
    train_tf, sets["val"].transform = build_transforms(args, model.pretrained_cfg)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    if args.eval_only:
        return evaluate_checkpoint(model, ckpt, val_loader, device, amp_dtype, args, log)
    sets["train"].transform = train_tf
    if pretrained is not None:  # fine-tuning: a new head when the class count differs
        load_weights(model, "--pretrained", *pretrained)
        log(f"weights from {pretrained[0]}")
    if ckpt is not None:
        load_weights(model, "--resume", args.resume, ckpt)
    optimizer, schedule = build_optimizer(model, args, len(train_loader), world, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    model_ema = build_ema(model, args, world)
    torch.manual_seed(args.seed + rank)  # different augmentations and drop-path masks per process
    random.seed(args.seed + rank)
    start_epoch = restore(ckpt, args, model_ema, optimizer, scaler, device, rank, world, log) if ckpt else 0
    train_model, eval_model = wrap(model, args, world)
    mix, criterion = build_mix(args, num_classes), nn.CrossEntropyLoss(label_smoothing=args.smoothing)
    start_output(args, ckpt is None, rank)
    log(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {num_classes} "
        f"classes, {len(sets['train'])} train / {len(sets['val'])} val images, {world} process(es) on "
        f"{device.type}, global batch {args.batch_size * world}, peak lr {args.lr * args.batch_size * world / 512:.3g}, amp {args.amp}")

    row = {}
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        start = time.perf_counter()
        row = dict(epoch=epoch + 1, **train_one_epoch(train_model, model, model_ema, criterion, mix, train_loader,
                                                      optimizer, schedule, scaler, device, amp_dtype, epoch, args))
        average_buffers(model, model_ema, world, device)
        row.update(validate(eval_model, model_ema, val_loader, device, amp_dtype))
        row["epoch_time"] = time.perf_counter() - start
        save(row, model, model_ema, optimizer, scaler, sampler, args, device, rank, world)
        ema_text = f", EMA acc1 {row['ema_val_acc1']:.2f}" if model_ema is not None else ""
        log(f"epoch {epoch + 1}/{args.epochs}: train loss {row['train_loss']:.4f}, val loss "
            f"{row['val_loss']:.4f}, acc1 {row['val_acc1']:.2f}, acc5 {row['val_acc5']:.2f}{ema_text}, "
            f"lr {row['lr']:.3g}, {row['img_per_s']:.0f} img/s, {row['epoch_time']:.1f} s")
    return row


if __name__ == "__main__":
    main(get_args_parser().parse_args())
