"""Speed and memory of ravlt.py, side by side with the release's code on the same weights.

    python -m bench                              # RAVLT-T and -S, the layer alone, high resolution
    python -m bench --release-file RALA.py       # add the release's model (needs timm, einops, fvcore)
    python -m bench --sections ablation          # each speed trick of ravlt.py, on and off
    python -m bench --sections profile           # where the time goes (CPU), eager and compiled
    python -m bench --quick                      # tiny sizes, in seconds (a test runs all sections)

Method (see bench/README.md): the models of one table are timed in rounds, one timing (≥ 50 ms of
calls) each per round, in one process; a speed-up, like the growth of time from one input size to
the next, is the median over rounds of the ratio within a round, so that a change of the machine's
speed between rounds cancels out. Times are medians too. Memory: the extra peak of one call.
--reuse-freed-memory: glibc reuses freed memory instead of fresh pages for each tensor over 32 MiB.
"""
import argparse
import copy
import ctypes
import importlib.util
import math
import statistics
import sys
import time
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import ravlt

COMPILED = ("compile_attn=True", "torch.compile(model)")  # the compiled rows of --compile


def machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # Linux names the CPU model here
        with open("/proc/cpuinfo") as f:
            return next(line.split(":")[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or "unknown CPU"


class LiveTensorBytes(TorchDispatchMode):
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


def peak_mb(fn, device):
    """Extra memory at the peak of one call of fn, in MB."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with LiveTensorBytes() as tracker:
        fn()
    return tracker.peak / 2**20


def timed(fn, device, calls=1):
    """Seconds per call of fn over `calls` calls (a compiled fn's first call: compilation and one run)."""
    torch.cuda.synchronize() if device.type == "cuda" else None
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize() if device.type == "cuda" else None
    return (time.perf_counter() - start) / calls


def measure(fns, device, repeats):
    """(times, mbs): times[i] holds fn i's seconds per call, one per round (`repeats` rounds); mbs[i]
    its extra peak MB. After a warm-up call each (which also compiles), one timed call sets how many
    calls one timing spans (≥ 50 ms). Each round times every fn once, in an order that rotates from
    round to round (no fn always first); compare fns with `ratio`, within rounds."""
    for fn in fns:
        fn()  # warm-up (compiles, allocates); the next call sets how many calls one timing spans
    calls = [max(1, math.ceil(0.05 / timed(fn, device))) for fn in fns]
    times, n = [[] for _ in fns], len(fns)
    for r in range(repeats):
        for i in [(r + j) % n for j in range(n)]:  # each round starts one further: no fn always first
            times[i].append(timed(fns[i], device, calls[i]))
    # compiled code allocates outside the dispatcher, where LiveTensorBytes cannot see it
    return times, [math.nan if device.type == "cpu" and getattr(fn, "compiled", False) else peak_mb(fn, device)
                   for fn in fns]


def ratio(a, b):
    """Median over rounds of time a / time b, both taken in the same round, so that a change of the
    machine's speed between rounds cancels out."""
    return statistics.median(ta / tb for ta, tb in zip(a, b))


PROFILE_GROUPS = ("convolutions", "matmuls, SDPA", "generated code", "other ops")


def profile_ms(step, steps=3):
    """Milliseconds per call of step (after two warm-up calls), torch.profiler's self CPU time summed
    by kind of op: convolutions (oneDNN, forward and backward), matmuls and SDPA, inductor's generated
    code (a compiled graph's own time), and all other ops (element-wise, norms, copies, the optimizer)
    run one by one."""
    for _ in range(2):
        step()  # warm-up; compiles
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    ms = dict.fromkeys(PROFILE_GROUPS, 0.0)
    for event in prof.key_averages():
        name = event.key.lower()
        group = ("convolutions" if "conv" in name else "matmuls, SDPA" if "mm" in name or "scaled_dot" in name
                 else "generated code" if "compiled" in name else "other ops")
        ms[group] += event.self_cpu_time_total / 1e3 / steps
    return ms


def reuse_freed_memory():
    """Have glibc's malloc keep freed memory for reuse. By default it maps every block over 32 MiB
    afresh (mmap) and returns it when freed, so that each such tensor costs page faults that zero
    its memory, at every call (on CUDA, PyTorch's caching allocator reuses memory instead)."""
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (AttributeError, OSError, TypeError):  # macOS, Windows: no mallopt
        mallopt = None
    # no block of its own for large requests (mmap), and no return of freed memory below 2 GiB
    if not (mallopt and mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1)):
        raise SystemExit("--reuse-freed-memory needs glibc's malloc (Linux)")


def load_release(path):
    """The release's RALA.py from the user's copy (it imports timm, einops and fvcore)."""
    spec = importlib.util.spec_from_file_location("release_rala", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # timm's model registry looks the module up there
    spec.loader.exec_module(module)
    return module


# -----------------------------------------------------------------------------
# Speed tricks of ravlt.py, each with the plain form it replaces, for --sections ablation


def rope_complex(x, rot):
    """RoPE as one complex product per channel pair (LLaMA's form), which inductor leaves to eager:
    the alternative to ravlt.rope's real arithmetic, for eager speed."""
    cos, sin = rot  # (d/2, N) each
    pairs = torch.view_as_complex(x.transpose(-2, -1).float().unflatten(-1, (-1, 2)).contiguous())  # (..., N, d/2)
    out = torch.view_as_real(pairs * torch.complex(cos, sin).T).flatten(-2)  # (..., N, d)
    return out.to(x.dtype).transpose(-2, -1)


def layer_norm_affine_outside(self, x):
    """LayerNorm2d.forward's compiled form run eagerly: the affine after the permute back."""
    x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], eps=self.norm.eps).permute(0, 3, 1, 2)
    return x * self.norm.weight[:, None, None] + self.norm.bias[:, None, None]


def heads_as_views(self, x):
    """Attention.heads with q and k left as views into the qkvo map (no copy)."""
    B, C, H, W = x.shape
    q, k, v, o = self.qkvo(x).chunk(4, dim=1)
    q, k, v = (t.reshape(B, self.num_heads, -1, H * W) for t in (q, k, v))
    return q, k, v, o


def without_channels_last(model):
    model.memory_format = torch.contiguous_format
    return model.to(memory_format=torch.contiguous_format)


class Without(nn.Module):
    """The same model (same weights) with some of ravlt's functions or methods swapped for others
    while it runs: {(owner, name): replacement}."""

    def __init__(self, model, swaps):
        super().__init__()
        self.model, self.swaps = model, swaps

    def forward(self, x):
        saved = {key: getattr(*key) for key in self.swaps}
        for (owner, name), new in self.swaps.items():
            setattr(owner, name, new)
        try:
            return self.model(x)
        finally:
            for (owner, name), old in saved.items():
                setattr(owner, name, old)


def bench(variants=("ravlt_t", "ravlt_s"), size=224, batch=16, train_batch=8,
          layer_sides=(14, 28, 56, 112), highres=((512, 512), (1024, 1024), (800, 1333)), repeats=7,
          device="cpu", compile=False, amp=False, release_file=None,
          sections=("models", "layer", "highres"), references=None):
    """Print speed and memory: whole models, the attention layer alone, high-resolution backbones,
    and the ablation of ravlt.py's speed tricks. references: optional {name: image model} timed
    like the variants, as a yardstick."""
    device = torch.device(device)
    release = load_release(release_file) if release_file else None

    def run(fn, grad=False):  # fn under the benchmark's precision, without autograd unless training
        def call():
            with torch.set_grad_enabled(grad), torch.autocast(device.type, torch.bfloat16, enabled=amp):
                return fn()
        return call

    def twin(name, **kw):  # the release's model (when given) and ours, with the same weights
        ref = getattr(release, "RAVLT_" + name[-1].upper())() if release and name in ravlt.PRETRAINED else None
        ours = ravlt.create_model(name, compile_attn=False, **kw)
        if ref is not None:
            ours.load_state_dict(ref.state_dict(), strict=not ours.features_only)
        return ref, ours

    print(f"{machine(device)} | {torch.get_num_threads()} threads | torch {torch.__version__} | "
          f"{'bf16 autocast' if amp else 'fp32'} | medians of {repeats} rounds | MB: extra peak memory | "
          f"x: speed-up over the first row of each model")
    x = torch.randn(batch, 3, size, size, device=device)
    xt, target = x[:train_batch], torch.randint(0, 1000, (train_batch,), device=device)

    def time_models(name, paths, macs):  # one row per path: inference, then a training step
        infer, train, first = [], [], []
        for path, model in paths.items():
            model.to(device)
            opt = torch.optim.AdamW(model.parameters())

            def train_step(model=model, opt=opt):  # forward + backward + AdamW
                F.cross_entropy(model.train()(xt), target).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            infer.append(run(lambda model=model: model.eval()(x)))
            train.append(run(train_step, grad=True))
            if path in COMPILED:  # the first calls compile: timed apart, and no CPU memory count
                first.append(f"{timed(infer[-1], device):>9.1f}{timed(train[-1], device):>9.1f}")
                infer[-1].compiled = train[-1].compiled = True
            else:
                first.append("")
        (t_inf, mb_inf), (t_train, mb_train) = measure(infer, device, repeats), measure(train, device, repeats)
        for i, path in enumerate(paths):  # img/s from the median time; x: speed-up over the first row
            print(f"{name:<15}{path:<22}{macs:>6.2f}"
                  f"{batch / statistics.median(t_inf[i]):>12.1f}{ratio(t_inf[0], t_inf[i]):>6.2f}{mb_inf[i]:>7.0f}"
                  f"{train_batch / statistics.median(t_train[i]):>12.2f}{ratio(t_train[0], t_train[i]):>6.2f}"
                  f"{mb_train[i]:>7.0f}{first[i]}")

    header = (f"{'model':<15}{'path':<22}{'GMACs':>6}{'infer img/s':>12}{'x':>6}{'MB':>7}{'train img/s':>12}"
              f"{'x':>6}{'MB':>7}" + ("  1st call s: infer, train" if compile else ""))
    if "models" in sections:
        print(f"\nwhole models, {size}², inference batch {batch}, training step batch {train_batch}\n{header}")
        for name in variants:
            ref, ours = twin(name)
            paths = {"release": ref, "ravlt.py": ours} if ref is not None else {"ravlt.py": ours}
            if compile:  # the same weights compiled: the attention cores alone, and the whole model
                cores = ravlt.create_model(name, compile_attn=True)
                cores.load_state_dict(ours.state_dict())
                paths[COMPILED[0]], paths[COMPILED[1]] = cores, torch.compile(copy.deepcopy(ours))
            time_models(name, paths, ravlt.count_macs(ours, size) / 1e9)
        for name, model in (references or {}).items():
            model = model.to(memory_format=torch.channels_last)
            time_models(name, {"reference": model}, ravlt.count_macs(model, size) / 1e9)

    if "ablation" in sections:  # each trick off, alone; the first row has all of them on
        print(f"\nspeed tricks and compile-friendly forms of ravlt.py, eager, {variants[0]} ({size}²): each row "
              f"swaps one for its alternative\n{header}")
        _, base = twin(variants[0])
        macs = ravlt.count_macs(base, size) / 1e9
        copies = [twin(variants[0])[1] for _ in range(4)]
        for twin_copy in copies:
            twin_copy.load_state_dict(base.state_dict())
        time_models(variants[0], {
            "as is": base,
            "no channels-last": without_channels_last(copies[0]),
            # forms torch.compile needs: RoPE and q, k in them always, each row times the eager alternative;
            # LayerNorm2d has two forms (eager's own faster), the row times its compiled form run eagerly
            "complex RoPE": Without(copies[1], {(ravlt, "rope"): rope_complex}),
            "LN affine outside": Without(copies[2], {(ravlt.LayerNorm2d, "forward"): layer_norm_affine_outside}),
            "q, k as views": Without(copies[3], {(ravlt.Attention, "heads"): heads_as_views}),
        }, macs)

    if "checkpointing" in sections:  # the training step's memory and time, blocks recomputed or kept
        print(f"\ngradient checkpointing, {variants[0]} ({size}²)\n{header}")
        _, base = twin(variants[0])
        recompute = twin(variants[0])[1]
        recompute.load_state_dict(base.state_dict())
        recompute.set_grad_checkpointing(True)
        time_models(variants[0], {"as is": base, "grad checkpointing": recompute}, ravlt.count_macs(base, size) / 1e9)

    if "profile" in sections:  # where the time goes, eager and compiled (CPU: torch.profiler)
        print(f"\nwhere the time goes, {variants[0]} ({size}²): ms per call, torch.profiler's self CPU time "
              f"by kind of op\n{'path':<22}" + "".join(f"{g:>16}" for g in PROFILE_GROUPS) + f"{'total':>10}")
        _, base = twin(variants[0])
        paths = {"ravlt.py (eager)": base.to(device), COMPILED[1]: torch.compile(copy.deepcopy(base))}
        opts = {path: torch.optim.AdamW(model.parameters()) for path, model in paths.items()}

        def train_step(model, opt):
            F.cross_entropy(model.train()(xt), target).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        for call in (f"inference, batch {batch}", f"training step, batch {train_batch}"):
            print(call)
            for path, model in paths.items():
                fn = (run(lambda model=model: model.eval()(x)) if call.startswith("inference") else
                      run(lambda model=model, opt=opts[path]: train_step(model, opt), grad=True))
                ms = profile_ms(fn)
                print(f"{path:<22}" + "".join(f"{ms[g]:>16.1f}" for g in PROFILE_GROUPS) + f"{sum(ms.values()):>10.1f}")

    if "layer" in sections:
        print("\nattention layer alone (C=64, 1 head, batch 1, inference): ms | extra peak MB")
        print(f"{'side':>5}{'tokens':>8}{'RALA':>16}{'softmax (SDPA)':>16}"
              + ("    release RALA  x (release / ours)" if release else ""))
        cl = torch.channels_last
        for side in layer_sides:
            xl = torch.randn(1, side, side, 64, device=device).permute(0, 3, 1, 2)  # channels-last
            rala_layer = ravlt.Attention(64, 1, "rala", compile_attn=False).to(device, memory_format=cl)
            softmax_layer = ravlt.Attention(64, 1, "softmax", compile_attn=False).to(device, memory_format=cl)
            rot = ravlt.RoPE2d(64).to(device)(side, side)
            calls = [run(lambda: rala_layer(xl, rot)), run(lambda: softmax_layer(xl, rot))]
            if release:  # the release's layer, same weights; it takes (x, sin, cos) from its own RoPE
                rel_layer = release.GateLinearAttentionNoSilu(64, 1).to(device)
                rel_layer.load_state_dict(rala_layer.state_dict())
                rel_sin, rel_cos = release.RoPE(64, 1).to(device)((side, side))
                calls.append(run(lambda: rel_layer(xl, rel_sin, rel_cos)))
            times, mbs = measure(calls, device, repeats)
            print(f"{side:>5}{side * side:>8}" + "".join(
                f"{statistics.median(t) * 1e3:>9.2f} |{mb:>5.0f}" for t, mb in zip(times, mbs))
                  + (f"{ratio(times[2], times[0]):>10.2f}" if release else ""))

    if "highres" in sections:
        ref, hybrid = twin(variants[0], features_only=True)
        linear = ravlt.create_model(variants[0], features_only=True, compile_attn=False, attn=("rala",) * 4)
        linear.load_state_dict(hybrid.state_dict())
        backbones = [hybrid.eval().to(device), linear.eval().to(device)]
        if ref is not None:  # the release's backbone: its stem and four stages
            ref.eval().to(device)
            backbones.append(nn.Sequential(ref.patch_embed, *ref.layers))
        print(f"\nhigh resolution, batch 1, inference, {variants[0]} backbone (features_only): s | extra peak MB")
        print(f"{'input':>10}{'hybrid':>16}{'fully linear':>16}"
              + ("         release  x (release / hybrid)" if ref is not None else ""))
        # every size in every round, so that the ratios between sizes are taken within rounds too
        inputs = [torch.randn(1, 3, h, w, device=device) for h, w in highres]
        calls = [run(lambda b=b, xh=xh: b(xh)) for xh in inputs for b in backbones]  # size-major
        times, mbs = measure(calls, device, repeats)
        k = len(backbones)
        for i, (h, w) in enumerate(highres):
            t, mb = times[i * k:(i + 1) * k], mbs[i * k:(i + 1) * k]
            print(f"{h}x{w}".rjust(10)
                  + "".join(f"{statistics.median(ti):>9.3f} |{m:>5.0f}" for ti, m in zip(t, mb))
                  + (f"{ratio(t[2], t[0]):>10.2f}" if ref is not None else ""))
        if len(highres) > 1:
            (h0, w0), (h1, w1) = highres[:2]
            names = ["hybrid", "fully linear", "release"][:k]
            print(f"{h0}x{w0} -> {h1}x{w1} ({h1 * w1 / (h0 * w0):.2f}× the pixels), time ×: "
                  + ", ".join(f"{name} {ratio(times[k + j], times[j]):.2f}" for j, name in enumerate(names)))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--input-size", type=int, default=224, help="image side in pixels (default 224)")
    parser.add_argument("--quick", action="store_true", help="ravlt_nano at tiny sizes, one repeat: a smoke test in seconds")
    parser.add_argument("--variants", nargs="+", default=["ravlt_t", "ravlt_s"], choices=list(ravlt.VARIANTS))
    parser.add_argument("--batch", type=int, default=16, help="inference batch (training uses half)")
    parser.add_argument("--repeats", type=int, default=7, help="rounds per measurement (medians kept)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also time the compiled paths, "
                        "compile_attn=True and torch.compile(model), first calls apart (always on CUDA)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--sections", nargs="+", default=["models", "layer", "highres"],
                        choices=["models", "ablation", "checkpointing", "profile", "layer", "highres"], help="parts to run")
    parser.add_argument("--release-file", help="the release's RALA.py, timed side by side on the same "
                        "weights (needs timm, einops and fvcore)")
    parser.add_argument("--reuse-freed-memory", action="store_true", help="glibc keeps freed memory for "
                        "reuse: no fresh, zeroed pages for each tensor over 32 MiB (see bench/README.md)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.batch < 1:
        parser.error("--repeats and --batch must be at least 1")
    if "profile" in args.sections and args.device != "cpu":
        parser.error("--sections profile reads CPU times: run it with --device cpu")
    if args.reuse_freed_memory:
        reuse_freed_memory()
        print("malloc: freed memory reused (glibc: no mmap for large blocks, trim threshold 2 GiB)")
    if args.threads:
        torch.set_num_threads(args.threads)
    compile = args.compile or args.device.startswith("cuda")
    if args.quick:
        bench(("ravlt_nano",), 64, 2, 2, (8, 16), ((64, 64), (96, 128)), 1, args.device, compile,
              args.amp, args.release_file, args.sections)
    else:
        bench(args.variants, args.input_size, args.batch, max(1, args.batch // 2), repeats=args.repeats,
              device=args.device, compile=compile, amp=args.amp, release_file=args.release_file,
              sections=args.sections)


if __name__ == "__main__":
    main()
