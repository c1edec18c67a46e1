# ---- train.py: training runs, exact resume, evaluation, torchrun, bad input ----
import argparse
import datetime
import json
import math
import os
import pickle
import subprocess
import sys
import urllib.error

import pytest
import torch
import torchvision
from PIL import Image

import ravlt
import train

REPO = os.path.dirname(os.path.abspath(train.__file__))
# ravlt_nano on 32×32 images, batch 4, one CPU process without data workers: a few seconds per run
TINY = ["--model", "ravlt_nano", "--device", "cpu", "--workers", "0", "--batch-size", "4", "--amp", "none"]
FAKE = ["--dataset", "fake", "--fake-samples", "16", "--input-size", "32"]  # 16 train, 4 val images
LOG_FIELDS = {"epoch", "train_loss", "val_loss", "val_acc1", "val_acc5", "lr", "img_per_s", "epoch_time"}


def run_train(out, *extra):
    # one thread: faster for a model this small, and steadier when the cores are shared
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = train.get_args_parser().parse_args(TINY + ["--output-dir", str(out), *map(str, extra)])
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


def test_train_resume_is_exact(fake_run, tmp_path, monkeypatch):
    _, log, ckpt = fake_run
    real_epoch, calls = train.train_one_epoch, []

    def crash_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", crash_in_epoch_2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_train(tmp_path, *FAKE_RUN)
    monkeypatch.undo()
    assert read_log(tmp_path)[0]["train_loss"] == log[0]["train_loss"]
    run_train(tmp_path, *FAKE_RUN, "--resume", tmp_path / "checkpoint.pth")
    resumed = read_log(tmp_path)
    assert [row["epoch"] for row in resumed] == [1, 2]
    assert abs(resumed[1]["train_loss"] - log[1]["train_loss"]) <= 1e-4
    assert resumed[1]["val_loss"] == pytest.approx(log[1]["val_loss"], abs=1e-6)
    final = load_ckpt(tmp_path / "checkpoint.pth")
    for key in ("model", "model_ema"):
        assert all(torch.equal(v, ckpt[key][k]) for k, v in final[key].items()), key


def test_train_eval_only_ours_and_release_format(fake_run, tmp_path):
    out, log, ckpt = fake_run
    ours = run_train(tmp_path, *FAKE, "--eval-only", "--resume", out / "checkpoint.pth")
    for key in ("val_loss", "val_acc1", "val_acc5", "ema_val_loss", "ema_val_acc1", "ema_val_acc5"):
        assert ours[key] == pytest.approx(log[-1][key], abs=1e-5), key
    # the release's layout: model / model_ema / optimizer / epoch / args as an argparse.Namespace;
    # swapping the two weight sets must swap the two results
    release = dict(model=ckpt["model_ema"], model_ema=ckpt["model"], optimizer={"state": {}}, epoch=299,
                   args=argparse.Namespace(model="RAVLT_T", lr=1e-3))
    torch.save(release, tmp_path / "RAVLT_release.pth")
    theirs = run_train(tmp_path, *FAKE, "--eval-only", "--resume", tmp_path / "RAVLT_release.pth")
    assert theirs["val_loss"] == pytest.approx(ours["ema_val_loss"], abs=1e-6)
    assert theirs["ema_val_loss"] == pytest.approx(ours["val_loss"], abs=1e-6)


def make_image_folder(root, classes=("cat", "dog", "fox"), per_split=(("train", 4), ("val", 2))):
    g = torch.Generator().manual_seed(0)
    for split, n in per_split:
        for c in classes:
            os.makedirs(root / split / c)
            for i in range(n):
                h, w = 30 + 4 * i, 40  # mixed sizes, as real folders have
                pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(root / split / c / f"{i}.png")


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


def test_train_torchrun_two_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "train.py", *TINY, *FAKE, "--epochs", "1", "--output-dir", str(out)]
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


def bad_input_cases(tmp):
    """(arguments, text the one-line error must contain) for each kind of bad input."""
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
        "unreadable checkpoint": ([*FAKE, "--resume", tmp / "garbage.pth"], "cannot read checkpoint"),
        "checkpoint with code": ([*FAKE, "--resume", tmp / "code.pth"], "cannot read checkpoint"),
        "foreign checkpoint": ([*FAKE, "--eval-only", "--resume", tmp / "foreign.pth"], "does not fit"),
        "other class count": ([*FAKE, "--eval-only", "--resume", tmp / "ten_classes.pth"], "10 classes"),
        "weights only, resumed": ([*FAKE, "--resume", tmp / "weights_only.pth"], "not a train.py checkpoint"),
        "eval without checkpoint": ([*FAKE, "--eval-only"], "--resume"),
        "unknown policy": (["--aa", "rand-x"], "unknown policy"),
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
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2, name
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert err.startswith("train.py: error:") and expected in err, (name, err)


def test_train_bad_input_as_a_process(tmp_path):
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "foreign.pth")
    cmd = [sys.executable, "train.py", *TINY, *FAKE, "--eval-only", "--resume", str(tmp_path / "foreign.pth"),
           "--output-dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "does not fit" in proc.stderr


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
