"""Train or evaluate RAVLT on CIFAR, ImageNet or any ImageNet-layout folder, in one file.

    python train.py --model ravlt_t                                   # CIFAR-10, one process
    torchrun --nproc_per_node 8 train.py --model ravlt_t --dataset imagenet --data-path DIR
    python train.py --dataset imagenet --data-path DIR --eval-only --resume RAVLT_T.pth
    python train.py --model ravlt_t --pretrained --dataset cifar100 --input-size 224 --lr 4e-4 --epochs 30

The recipe, `run`: read --resume's checkpoint; resolve the defaults (the model and data the checkpoint
holds, then PRESETS: the release's ImageNet recipe, after DeiT, or a small-image one for CIFAR); check
the flags, the resume and the output folder; read --pretrained's weights; build the datasets, loaders,
model, optimizer with its lr schedule, and EMA; restore --resume's state; then every epoch
train_one_epoch, evaluate and save (OUTPUT_DIR/checkpoint.pth replaced, a line of OUTPUT_DIR/log.jsonl).
Bad input stops the run before any work, in one line; --resume goes on as if the run had never stopped.
"""
import argparse
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
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision import datasets
from torchvision.transforms import v2 as T
from tqdm import tqdm

import ravlt

# the cores this process may use, which DataLoader also counts before warning of too many workers
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
PRESETS = {  # the defaults that differ between the release's ImageNet recipe (also for `fake` data) and CIFAR's
    "imagenet": dict(epochs=300, lr=5e-4, input_size=224, repeated_aug=True, model_ema=True, workers=min(8, CORES)),
    "cifar": dict(epochs=100, lr=2e-3, input_size=32, repeated_aug=False, model_ema=False, workers=min(4, CORES)),
}
RA_REPEATS = 3  # repeated augmentation: copies of each image per epoch, as DeiT and the release
TRAIN_STATE = ("model", "optimizer", "scaler", "epoch", "rng", "sampler", "args")

# ---- Flags ---------------------------------------------------------------------------------------
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
    raise argparse.ArgumentTypeError(f"unknown policy {text!r}; use rand-mM-nN (M in 0-10), trivialaugment or none")

def get_args_parser():
    p = argparse.ArgumentParser(description="Train or evaluate RAVLT. A default marked 'cifar' applies to --dataset "
        "cifar10/cifar100, the other to imagenet and fake; with --resume, model and data default to the checkpoint's.")
    p.error = fail  # one line instead of argparse's usage block followed by the error
    add, onoff = p.add_argument, argparse.BooleanOptionalAction
    add("--model", choices=list(ravlt.VARIANTS), help="variant (default: ravlt_t)")
    add("--drop-path", type=below_one, metavar="P", help="stochastic depth of the last block (default: the variant's)")
    add("--input-size", type=positive_int, metavar="PX", help="image side, pixels (default: 224; cifar 32)")
    add("--in-chans", type=ranged(int, lambda v: v in (1, 3), "1 or 3"), help="3: RGB, 1: grayscale (default: 3)")
    add("--dataset", choices=["cifar10", "cifar100", "imagenet", "fake"], help="cifar: downloaded (default: cifar10)")
    add("--data-path", metavar="DIR", help="imagenet: DIR/{train,val}/<class>/, needed (default: ./data for cifar)")
    add("--fake-samples", type=positive_int, metavar="N", help="fake's random training images, N/4 val (default: 512)")
    add("--workers", type=natural, metavar="N", help="loader workers per process (default: its cores, ≤ 8; cifar ≤ 4)")
    add("--epochs", type=positive_int, metavar="N", help="training epochs (default: 300; cifar 100)")
    add("--batch-size", type=positive_int, default=128, metavar="N", help="images per process and step (default: 128)")
    add("--lr", type=positive, help="peak lr per 512 images, scaled to the global batch (default: 5e-4; cifar 2e-3)")
    add("--min-lr", type=non_negative, default=1e-5, metavar="LR", help="the cosine's end (default: 1e-5)")
    add("--warmup-lr", type=positive, default=1e-6, metavar="LR", help="the first step's lr (default: 1e-6)")
    add("--warmup-epochs", type=natural, default=5, metavar="N", help="epochs of linear warm-up (default: 5)")
    add("--weight-decay", type=non_negative, default=0.05, metavar="WD", help="AdamW, 0 on 1-D params (default: 0.05)")
    add("--clip-grad", type=positive, metavar="NORM", help="clip the gradients' L2 norm (default: off)")
    add("--smoothing", type=fraction, default=0.1, metavar="EPS", help="label smoothing (default: 0.1)")
    add("--mixup", type=non_negative, default=0.8, metavar="ALPHA", help="MixUp α, 0 = off (default: 0.8)")
    add("--cutmix", type=non_negative, default=1.0, metavar="ALPHA", help="CutMix α, 0 = off (default: 1.0)")
    add("--aa", type=aa_policy, default="rand-m9-n2", metavar="POLICY", help="rand-mM-nN (RandAugment, N ops of "
        "magnitude M on timm's 0-10 scale), trivialaugment, or none (default: rand-m9-n2)")
    add("--color-jitter", type=non_negative, default=0.4, metavar="F", help="colour jitter if --aa none (default: 0.4)")
    add("--reprob", type=fraction, default=0.25, metavar="P", help="random-erasing chance (default: 0.25)")
    add("--repeated-aug", action=onoff, help=f"each image {RA_REPEATS}× per epoch (default: on; cifar off)")
    add("--model-ema", action=onoff, help="keep, evaluate and save an EMA of the weights (default: on; cifar off)")
    add("--model-ema-decay", type=fraction, default=0.99996, help="EMA decay per 512 images (default: 0.99996)")
    add("--amp", choices=["bf16", "fp16", "none"], help="autocast (default: bf16 if supported, else fp16; none on CPU)")
    add("--compile", action="store_true", help="compile the whole model (default: only the attention cores, on CUDA)")
    add("--grad-checkpointing", action="store_true", help="recompute in backward: less memory, slower (default: off)")
    add("--device", choices=["cuda", "cpu"], help="torchrun: process r on cuda:LOCAL_RANK (default: cuda if available)")
    add("--seed", type=seed_int, default=0, metavar="N", help="random seed, N + r on process r (default: 0)")
    add("--output-dir", metavar="DIR", help="log.jsonl, checkpoint.pth (default: output/MODEL_DATASET; --resume's own)")
    add("--resume", metavar="PATH", help="checkpoint.pth to continue (to extend it, raise --epochs) (default: none)")
    add("--pretrained", nargs="?", const=True, metavar="PATH", help="--model's released ImageNet-1k weights "
        "(downloaded once) or PATH's (any checkpoint), a new classifier for another class count (default: random init)")
    add("--eval-only", action="store_true", help="only evaluate --resume (any checkpoint) and its EMA (default: off)")
    return p

# ---- Before any work: the checkpoint, the defaults, the flags, the pretrained weights -------------
def first_missing(path):
    """The outermost folder that making `path` would create; None if it exists."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        path, missing = os.path.dirname(path), path
    return missing

def read_checkpoint(flag, path):
    """ravlt.read_checkpoint: weights only (a checkpoint is data, never code); what is wrong, in one line."""
    try:
        return ravlt.read_checkpoint(path)
    except FileNotFoundError:
        fail(f"{flag} {path}: no such file")
    except ValueError as e:  # a directory, empty, truncated, not a checkpoint, ...
        fail(f"{flag}: {str(e).strip().splitlines()[0]}")

def resolve_defaults(args, ckpt, device):
    """The flags not given: the model, input size and data of a train.py checkpoint, then the preset."""
    saved = ckpt.get("args") if isinstance(ckpt, dict) else None
    saved = saved if isinstance(saved, dict) else {}  # the release's files hold a Namespace of theirs
    data = ("dataset", "data_path", "fake_samples") if args.dataset is None else ()  # all of them, or none
    vars(args).update({k: saved.get(k) for k in ("model", "input_size", "in_chans", *data) if getattr(args, k) is None})
    args.model, args.dataset = args.model or "ravlt_t", args.dataset or "cifar10"
    cifar = args.dataset.startswith("cifar")
    preset = dict(PRESETS["cifar" if cifar else "imagenet"], fake_samples=512, in_chans=3)
    vars(args).update({k: v for k, v in preset.items() if getattr(args, k) is None})
    args.data_path = args.data_path or ("data" if cifar else None)
    resumed = args.resume and not args.eval_only  # it goes on in the checkpoint's folder
    args.output_dir = args.output_dir or ((os.path.dirname(args.resume) or ".") if resumed else
                                          os.path.join("output", f"{args.model}_{args.dataset}"))
    args.amp = args.amp or ("none" if device.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16")

def check_flags(args, ckpt, world):
    """Refused before any work: flags that do not go together, a checkpoint without weights, a resume that cannot
    go on exactly (other data or global batch, so peak lr), an output folder unwritable or holding another run."""
    if args.eval_only and not args.resume:
        fail("--eval-only needs --resume PATH, the checkpoint to evaluate")
    if args.pretrained is not None and args.resume:
        fail("--pretrained starts a new run from given weights, --resume continues a run: give one")
    ckpt is None or check_fits(args, "--resume", args.resume, ckpt)
    if args.eval_only:
        return
    if ckpt is not None and (lost := [k for k in TRAIN_STATE if k not in ckpt]):
        fail(f"--resume {args.resume} is not a train.py checkpoint (no {', '.join(lost)}); "
             "to evaluate it, add --eval-only")
    if ckpt is not None:  # the batch size per process may change with the processes, not the global batch
        was = dict(ckpt["args"], batch_size=f"global batch {ckpt['args']['batch_size'] * len(ckpt['rng'])}")
        now = dict(vars(args), batch_size=f"global batch {args.batch_size * world}")
        for key in ("dataset", "batch_size", "fake_samples")[:2 + (args.dataset == "fake")]:
            if now[key] != was[key]:
                fail(f"--{key.replace('_', '-')}: {args.resume} was trained with {was[key]}, this run "
                     f"{now[key]}; a resumed run keeps its data and global batch (so its peak lr): give "
                     "those, or start a new run from its weights with --pretrained")
    missing = first_missing(args.output_dir)  # checked, not made: save makes it after the first epoch
    parent = os.path.dirname(missing) if missing else args.output_dir  # the folder that takes a new entry
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        fail(f"--output-dir {args.output_dir} is a file, not a folder")
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        fail(f"--output-dir {args.output_dir} cannot be created or written (in {parent})")
    held = os.path.join(args.output_dir, "checkpoint.pth")
    if os.path.isfile(held) and not (args.resume and os.path.samefile(held, args.resume)):
        old = read_checkpoint("--output-dir", held)
        ours = isinstance(old, dict) and isinstance(old.get("model_config"), dict) and "epoch" in old
        fail(f"--output-dir {args.output_dir} holds " + (f"a run of {old['model_config'].get('name')} at epoch "
             f"{old['epoch']}: continue it with --resume {held}" if ours else "a checkpoint.pth that train.py "
             "did not write: move it") + ", or give another --output-dir")

def read_pretrained(args, rank, world):
    """--pretrained's (path, checkpoint): PATH, or --model's released file, downloaded by process 0 first."""
    path = args.pretrained
    if path is True:
        if rank > 0 and args.model in ravlt.PRETRAINED:  # else every process gets ravlt's error at once
            dist.barrier()
        try:  # ravlt names the models with released weights, and where a file goes when offline
            path = ravlt.download_checkpoint(args.model)
        except (ValueError, RuntimeError) as e:
            fail(f"--pretrained: {str(e).splitlines()[0]}; or give a PATH")
        if rank == 0 and world > 1:
            dist.barrier()
    return path, check_fits(args, "--pretrained", path, read_checkpoint("--pretrained", path))

def load_weights(model, flag, path, ckpt, use_ema=False, new_head=False):
    """Weights into `model`: with new_head (--pretrained) a new classifier for another class count, else they must fit."""
    try:
        ravlt.load_checkpoint(model, ckpt, use_ema=use_ema, new_head=new_head)
    except ValueError as e:
        fail(f"{flag} {path}: {str(e).splitlines()[0]}")

def check_fits(args, flag, path, ckpt):
    """`ckpt`, once ravlt has checked (before any work, on a model without memory) that it fits --model."""
    with torch.device("meta"), warnings.catch_warnings():  # the classifier aside: its class count may differ
        warnings.simplefilter("ignore")  # loading into a model without memory is a no-op, which torch warns of
        load_weights(ravlt.create_model(args.model, in_chans=args.in_chans), flag, path, ckpt, new_head=True)
    return ckpt

# ---- Data ----------------------------------------------------------------------------------------
class RepeatAugSampler(DistributedSampler):
    """DeiT's repeated augmentation: RA_REPEATS copies of each image per epoch, on consecutive processes."""
    def __init__(self, num_images, num_replicas, rank, seed=0):
        super().__init__(range(num_images), num_replicas, rank, seed=seed)  # ceil(n / replicas) each

    def __iter__(self):  # the order depends only on (seed, epoch), so a resumed run replays it
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=g).repeat_interleave(RA_REPEATS)  # (3n,)
        return iter(order[self.rank::self.num_replicas][:self.num_samples].tolist())

class UnreadableImage(Exception):
    """An undecodable image. Out of a DataLoader worker its text is the worker's traceback: str() is the last line."""
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
                fail(f"no folder {folder}; --dataset imagenet expects DIR/{{train,val}}/<class>/<images>")
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
            if made:  # made by the download before it failed: a run that stops leaves nothing behind
                shutil.rmtree(made, ignore_errors=True)
            fail(f"could not get {cifar.__name__} ({type(e).__name__}: {e}); offline? put {cifar.filename}"
                 f" from {cifar.url} (or its extracted {cifar.base_folder}/) into {args.data_path}/")
    if world > 1:
        dist.barrier()
    sets = {split: cifar(args.data_path, train=split == "train") for split in splits}
    return sets, len(sets["val"].classes)

def build_loaders(sets, args, ckpt, device, rank, world):
    common = dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=device.type == "cuda")
    # process r evaluates images r, r + world, ...; the sums are reduced, so every image counts once
    val = DataLoader(Subset(sets["val"], range(rank, len(sets["val"]), world)), **common)
    if args.eval_only:
        return val, None, None
    seed = ckpt["sampler"]["seed"] if ckpt else args.seed  # data order: one seed for all processes
    sampler = (RepeatAugSampler(len(sets["train"]), world, rank, seed) if args.repeated_aug else
               DistributedSampler(sets["train"], world, rank, shuffle=True, seed=seed))
    # new workers every epoch (not persistent_workers): their seeds come from the main process's
    # generator, which the checkpoint saves, so a resumed epoch repeats the same augmentations
    train = DataLoader(sets["train"], sampler=sampler, drop_last=True, **common)
    if len(train) == 0:
        fail(f"{len(sampler)} training images per process, fewer than --batch-size {args.batch_size}")
    return val, sampler, train

def build_mix(args, num_classes):
    """MixUp and/or CutMix (one per batch when both are on), built only when on: torchvision refuses alpha = 0."""
    mixes = [T.MixUp(alpha=args.mixup, num_classes=num_classes)] if args.mixup > 0 else []
    mixes += [T.CutMix(alpha=args.cutmix, num_classes=num_classes)] if args.cutmix > 0 else []
    return T.RandomChoice(mixes) if mixes else None

def build_transforms(args, cfg):
    size, bicubic, mean, std = args.input_size, T.InterpolationMode.BICUBIC, cfg["mean"], cfg["std"]
    if args.in_chans == 1:  # gray: one channel, normalised by the mean of the RGB statistics
        mean, std = [sum(mean) / 3], [sum(std) / 3]
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
        train.append(T.RandAugment(int(m[2]), int(m[1]), num_magnitude_bins=11, interpolation=bicubic, fill=fill))
    elif args.aa == "trivialaugment":
        train.append(T.TrivialAugmentWide(interpolation=bicubic, fill=fill))
    elif args.color_jitter > 0:  # timm applies colour jitter only when no policy is set
        train.append(T.ColorJitter(*[args.color_jitter] * 3))
    gray = [T.Grayscale()] if args.in_chans == 1 else []
    tensor = gray + [T.PILToTensor(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
    erase = [T.RandomErasing(args.reprob, value="random")] if args.reprob > 0 else []  # noise patch
    return T.Compose(train + tensor + erase), T.Compose(val + tensor)

# ---- Model, optimizer and lr schedule, EMA, resume, checkpoint -----------------------------------
def build_model(args, num_classes, device, world):
    overrides = {} if args.drop_path is None else dict(drop_path_rate=args.drop_path)
    model = ravlt.create_model(args.model, num_classes=num_classes, in_chans=args.in_chans,
                               compile_attn=False if args.compile else None,  # --compile: the whole model
                               grad_checkpointing=args.grad_checkpointing, **overrides).to(device)
    if world > 1 and device.type == "cuda":  # BatchNorm statistics over the global batch, as released
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model

def build_optimizer(model, args, steps, world, device):
    """AdamW (no weight decay on 1-D parameters) and schedule(step), the lr of each step: warm-up, then
    cosine. A function of the flags alone: a resumed run, even one given more --epochs, follows it."""
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

def restore(ckpt, model, model_ema, optimizer, scaler, args, device, rank, world, log):
    """--resume's weights, EMA, AdamW moments (hyper-parameters: the flags'), loss scale, random state."""
    load_weights(model, "--resume", args.resume, ckpt)
    if model_ema is not None and "model_ema" not in ckpt:
        log(f"note: {args.resume} has no EMA weights; the EMA restarts from the model's")
    if model_ema is not None:
        model_ema.module.load_state_dict(ckpt.get("model_ema", model.state_dict()))
    optimizer.load_state_dict(dict(ckpt["optimizer"], param_groups=optimizer.state_dict()["param_groups"]))
    scaler.load_state_dict(ckpt["scaler"])
    if len(ckpt["rng"]) == world:  # each process goes on with its own random streams
        rng = ckpt["rng"][rank]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
    else:
        log(f"note: checkpoint from {len(ckpt['rng'])} processes, now {world}: random state reseeded")
    if ckpt["epoch"] >= args.epochs:
        log(f"nothing to do: {args.resume} is at epoch {ckpt['epoch']} of --epochs {args.epochs}; "
            "raise --epochs to train on")
    return ckpt["epoch"]

def save(row, model, model_ema, optimizer, scaler, sampler, args, device, rank, world):
    """checkpoint.pth replaced (the model's own keys, no DDP or compile prefix) with every process's
    random state; `row` appended to log.jsonl, which epoch 1 starts anew, and printed."""
    rng = dict(torch=torch.get_rng_state(), python=random.getstate(),
               **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}))
    states = [rng] * world
    if world > 1:  # every process's generators, so that each resumes its own random streams
        dist.all_gather_object(states, rng)
    if rank > 0:
        return
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                 epoch=row["epoch"], rng=states, sampler=dict(seed=sampler.seed, next_epoch=row["epoch"]),
                 args=dict(vars(args)), model_config=dict(name=args.model, **vars(model.cfg)))
    if model_ema is not None:
        state["model_ema"] = model_ema.module.state_dict()
    path = os.path.join(args.output_dir, "checkpoint.pth")
    os.makedirs(args.output_dir, exist_ok=True)  # only now: a run that stops before leaves nothing
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a crash leaves the old file or the new one, never half
    with open(os.path.join(args.output_dir, "log.jsonl"), "w" if row["epoch"] == 1 else "a") as f:
        f.write(json.dumps(row) + "\n")
    ema = f", EMA acc1 {row['ema_val_acc1']:.2f}" if model_ema is not None else ""
    print(f"epoch {row['epoch']}/{args.epochs}: train loss {row['train_loss']:.4f}, val loss "
          f"{row['val_loss']:.4f}, acc1 {row['val_acc1']:.2f}, acc5 {row['val_acc5']:.2f}{ema}, "
          f"lr {row['lr']:.3g}, {row['img_per_s']:.0f} img/s, {row['epoch_time']:.1f} s")

# ---- One epoch of training, one pass of evaluation -----------------------------------------------
def train_one_epoch(model, raw_model, model_ema, criterion, mix, loader, optimizer, schedule, scaler,
                    device, amp_dtype, epoch, args):
    """Mean training loss, the last step's learning rate, and images/s, all processes together."""
    model.train()
    world = dist.get_world_size() if dist.is_initialized() else 1
    loss_sum, start = torch.zeros((), device=device), time.perf_counter()
    bar = tqdm(loader, f"epoch {epoch + 1}/{args.epochs}", leave=False, disable=world > 1 and dist.get_rank() > 0)
    for step, (images, targets) in enumerate(bar):
        lr = schedule(epoch * len(loader) + step)  # every step: warm-up and cosine smooth over few epochs
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
            if not math.isfinite(value := loss.item()):  # exit code 1, the message on stderr
                raise SystemExit(f"train.py: loss is {value} at epoch {epoch + 1}, step {step}; try a lower "
                                 "--lr or --clip-grad")
            speed = (step + 1) * len(images) * world / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.0f}")
    elapsed = time.perf_counter() - start
    if world > 1:
        dist.all_reduce(loss_sum)
    if world > 1 and device.type != "cuda":  # no SyncBatchNorm on CPU: statistics drift apart
        ema_buffers = list(model_ema.module.buffers()) if model_ema else []
        for buffer in filter(torch.is_floating_point, [*raw_model.buffers(), *ema_buffers]):
            dist.all_reduce(buffer)
            buffer /= world
    return dict(train_loss=loss_sum.item() / (len(loader) * world), lr=lr,
                img_per_s=len(loader) * args.batch_size * world / elapsed)

@torch.no_grad()
def evaluate(model, loader, device, amp_dtype, prefix="val_"):
    """Cross-entropy and top-1/top-5 accuracy (%) over the whole val set; each process holds a shard."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, images
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images).float()  # (B, classes)
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]  # (B, 5)
        totals[0] += nn.functional.cross_entropy(logits, targets, reduction="sum")
        totals[1] += hits[:, 0].sum()
        totals[2] += hits.any(1).sum()
        totals[3] += len(targets)
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss, top1, top5, n = totals.tolist()
    return {prefix + "loss": loss / n, prefix + "acc1": 100 * top1 / n, prefix + "acc5": 100 * top5 / n}

def evaluate_checkpoint(model, ckpt, loader, device, amp_dtype, args, log):
    """--eval-only: the weights, and the EMA weights if any; one line for people, one JSON line."""
    results, text = {}, []
    for prefix, use_ema in [("val_", False)] + [("ema_val_", True)] * ("model_ema" in ckpt):
        load_weights(model, "--resume", args.resume, ckpt, use_ema)
        results.update(r := evaluate(model, loader, device, amp_dtype, prefix))
        text.append(f"{'EMA' if use_ema else 'weights'} top-1 {r[prefix + 'acc1']:.2f}%, top-5 "
                    f"{r[prefix + 'acc5']:.2f}%, loss {r[prefix + 'loss']:.4f}")
    log(f"{args.resume} on {args.dataset} val ({len(loader.dataset.dataset)} images): {'; '.join(text)}")
    log(json.dumps(results))
    return results

# ---- Main ----------------------------------------------------------------------------------------
def init_distributed(args):
    """(rank, world size, device): torchrun sets RANK and LOCAL_RANK; without them, one process."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cuda := device.type == "cuda":
        if not torch.cuda.is_available():
            fail("--device cuda, but no CUDA GPU is visible")
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest convolutions once
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if "RANK" not in os.environ:
        return 0, 1, device
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    # DDP warns of depthwise weights (C, 1, k, k), whose gradient strides differ on a size-1 dim only: noise
    warnings.filterwarnings("ignore", "Grad strides do not match bucket view strides")
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return dist.get_rank(), dist.get_world_size(), device

def main(args):
    """run(args), with an image that cannot be decoded turned into one line saying what to do."""
    try:
        result = run(args)
    except UnreadableImage as e:  # a checkpoint in the output folder is this run's, or the one resumed
        saved = os.path.join(args.output_dir, "checkpoint.pth")
        saved = saved if os.path.isfile(saved) else args.resume
        fail(f"{e}; fix or delete it, then " +
             (f"continue with --resume {saved}" if saved and not args.eval_only else "run again"))
    # a barrier first: tearing the group down while a process still saves can hang (pytorch#75097)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result

def run(args):
    rank, world, device = init_distributed(args)
    log = print if rank == 0 else (lambda *a, **k: None)
    ckpt = read_checkpoint("--resume", args.resume) if args.resume else None
    resolve_defaults(args, ckpt, device)
    check_flags(args, ckpt, world)
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
        load_weights(model, "--pretrained", *pretrained, new_head=True)
        log(f"weights from {pretrained[0]}")
    optimizer, schedule = build_optimizer(model, args, len(train_loader), world, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    model_ema = None
    if args.model_ema:  # decay D^(B/512) per step at global batch B: the same per image
        decay = args.model_ema_decay ** (args.batch_size * world / 512)
        model_ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        model_ema.update_parameters(model)  # the first update only copies: start from these weights
    torch.manual_seed(args.seed + rank)  # different augmentations and drop-path masks per process
    random.seed(args.seed + rank)
    start_epoch = 0 if ckpt is None else restore(ckpt, model, model_ema, optimizer, scaler, args, device,
                                                 rank, world, log)
    train_model = nn.parallel.DistributedDataParallel(model) if world > 1 else model  # eval: no DDP, val shards differ
    train_model, eval_model = map(torch.compile if args.compile else lambda m: m, (train_model, model))
    mix, criterion = build_mix(args, num_classes), nn.CrossEntropyLoss(label_smoothing=args.smoothing)
    log(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {num_classes} classes, "
        f"{len(sets['train'])} train / {len(sets['val'])} val images, {world} process(es) on {device.type}, global "
        f"batch {args.batch_size * world}, peak lr {optimizer.defaults['lr']:.3g}, amp {args.amp}")
    row = {}
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        start = time.perf_counter()
        row = dict(epoch=epoch + 1, **train_one_epoch(train_model, model, model_ema, criterion, mix, train_loader,
                                                      optimizer, schedule, scaler, device, amp_dtype, epoch, args))
        row.update(evaluate(eval_model, val_loader, device, amp_dtype, "val_"))
        if model_ema is not None:
            row.update(evaluate(model_ema.module, val_loader, device, amp_dtype, "ema_val_"))
        row["epoch_time"] = time.perf_counter() - start
        save(row, model, model_ema, optimizer, scaler, sampler, args, device, rank, world)
    return row

if __name__ == "__main__":
    main(get_args_parser().parse_args())
