"""Time the textual-inversion training step: ours with each speed-up on or off, the original's form, and Lightning's.

Random weights of the real architectures (nothing is downloaded). For each setting: median seconds per step over
``--steps`` steps after ``--warmup``, images/s, peak memory, the FLOPs of one step (torch.utils.flop_counter) and,
on CUDA, the fraction of a measured bf16 matmul rate. A table is printed last and JSON written.

    python scripts/benchmark.py --config tests/configs/ldm-tiny-finetune.yaml --batch 4 --device cpu
    python scripts/benchmark.py --config configs/stable-diffusion/v1-finetune.yaml --batch 1 4 8 --precision fp32 bf16
    python scripts/benchmark.py --count-ops --config tests/configs/sd-tiny-finetune.yaml   # ops per step instead of times

"The original" is re-created from our own code (which computes the same function): fp32, no latent cache, eager.
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ldm.config import load_model_config  # noqa: E402
from ldm.data.personalized import imagenet_templates_small  # noqa: E402
from ldm.models.diffusion.fast_step import CompileOptions, OpCounter, compile_training_step  # noqa: E402
from ldm.modules.diffusionmodules.util import set_gradient_checkpointing  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

logger = logging.getLogger("benchmark")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


MODES = ("eager", "compiled", "graphs")  # graphs: inductor's reduce-overhead mode, i.e. CUDA graphs


@dataclass
class Result:
    name: str
    batch: int
    precision: str
    cache: bool
    checkpointing: bool
    sec_per_step: float
    images_per_s: float
    peak_mem_gib: float
    tflop_per_step: float
    matmul_fraction: float | None
    mode: str = "eager"


@dataclass
class OpCount:
    """Ops of one training step: aten ops dispatched (eager only: a dispatch mode makes compiled code run eagerly),
    and from the profiler the top-level aten ops plus compiled kernels the host calls, and on CUDA the kernel
    launches."""

    name: str
    mode: str
    batch: int
    dispatched: int | None
    profiled: int
    launches: int | None


def compile_options(mode: str, backend: str) -> CompileOptions:
    return CompileOptions.from_config("off" if mode == "eager" else "unet", "reduce-overhead" if mode == "graphs" else None, backend)


def load_config(config_path: str, size: int | None = None) -> Any:
    """The config, its images (and the models' sizes) set to ``size`` pixels when given."""
    config = load_model_config(config_path, "--config")
    if size:
        params = config.model.params
        factor = 2 ** (len(params.first_stage_config.params.ddconfig.ch_mult) - 1)
        params.image_size = params.unet_config.params.image_size = size // factor
        config.data.params.train.params.size = size
    return config


def build_model(config_path: str, device: torch.device, cache: bool, checkpointing: bool, size: int | None = None,
                compile: CompileOptions | None = None) -> Any:
    """The config's model with random weights, its placeholder initialised from the config's init word; compiled
    for training as ``compile`` says (off by default)."""
    config = load_config(config_path, size)
    params = config.model.params
    params.cache_latents = cache
    params.gradient_checkpointing = checkpointing
    params.pop("ckpt_path", None)
    torch.manual_seed(0)
    model = instantiate_from_config(config.model).to(device)
    model.learning_rate = 5e-3
    model.train()
    compile_training_step(model, compile or CompileOptions.from_config("off"))
    return model, config


def synthetic_batch(config: Any, batch: int, device: torch.device, cache: bool) -> dict:
    size = config.data.params.train.params.get("size", 256)
    rng = np.random.default_rng(0)
    b: dict[str, Any] = {
        "image": torch.from_numpy(rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)).to(device),
        "caption": [imagenet_templates_small[i % len(imagenet_templates_small)].format("*") for i in range(batch)],
    }
    if cache:
        b["index"] = torch.arange(batch) % 5
        b["flip"] = torch.zeros(batch, dtype=torch.bool)
    return b


def make_step(model: Any, batch: dict, precision: str, device: torch.device, optimizer: torch.optim.Optimizer | None = None) -> Callable[[], torch.Tensor]:
    """One step as Lightning's automatic optimisation runs it, with the optimizer the model configures."""
    opt = optimizer or model.configure_optimizers()
    dtype = DTYPES[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss, _ = model.shared_step(batch)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in tqdm(range(steps), desc="timing", leave=False):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def step_flops(step: Callable[[], Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops() / 1e12


def bf16_matmul_tflops(device: torch.device) -> float | None:
    """A measured dense bf16 matmul rate on this device (CUDA only; the yardstick for the step's efficiency)."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    sync(device)
    t0 = time.perf_counter()
    for _ in range(20):
        a @ a
    sync(device)
    return 20 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Steps:
    """Builds each model once and hands out training steps for the settings (mode, precision, cache, batch) asked."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.device = args, torch.device(args.device)
        self.model, self.config = build_model(args.config, self.device, True, False, args.size)
        self.peers: dict[str, Any] = {}

    def ours(self, batch: int, precision: str, mode: str = "eager", cache: bool = True, checkpointing: bool = False,
             original: bool = False) -> Callable[[], torch.Tensor]:
        """Our step; ``original``: the original's form (plain AdamW, no cache, eager, fp32)."""
        model = self.model
        model.cache_latents = cache
        set_gradient_checkpointing(model.model, checkpointing)
        compile_training_step(model, compile_options(mode, self.args.compile_backend))
        optimizer = torch.optim.AdamW(list(model.embedding_manager.embedding_parameters()), lr=model.learning_rate) if original else None
        return make_step(model, synthetic_batch(self.config, batch, self.device, cache), precision, self.device, optimizer)

    def peer(self, batch: int, precision: str, mode: str = "eager") -> Callable[[], torch.Tensor] | None:
        """The diffusers textual-inversion step at the same architecture (CLIP configs, diffusers installed)."""
        if "CLIP" not in self.config.model.params.cond_stage_config.target:
            return None
        try:
            from peer_step import build_peer, make_peer_step
        except ImportError:
            return None
        if precision not in self.peers:
            self.peers.clear()  # one peer at a time: the real architectures are gigabytes
            torch.manual_seed(0)
            self.peers[precision] = build_peer(self.config, self.device, DTYPES[precision])
        peer = dict(self.peers[precision])
        if mode != "eager":
            options = compile_options(mode, self.args.compile_backend)
            peer["unet"] = torch.compile(peer["unet"], backend=options.backend, mode=options.mode, dynamic=False)
        return make_peer_step(peer, synthetic_batch(self.config, batch, self.device, cache=False), self.device)


def measure(name: str, step: Callable[[], Any], args: argparse.Namespace, batch: int, precision: str, mode: str, cache: bool,
            checkpointing: bool, peak_rate: float | None) -> Result:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_steps(step, device, args.warmup, args.steps)
    flops = step_flops(step)
    median = statistics.median(times)
    fraction = flops / median / peak_rate if peak_rate else None
    return Result(name, batch, precision, cache, checkpointing, median, batch / median, peak_memory_gib(device), flops, fraction, mode)


KERNEL_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")


def is_compiled_kernel(name: str) -> bool:
    return "cpp_fused" in name or name.startswith("triton_")


def inside_op(event: Any) -> bool:
    """Whether a profiler event runs inside an aten op or a compiled kernel (then it is part of that one's cost)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::") or is_compiled_kernel(parent.name):
            return True
        parent = parent.cpu_parent
    return False


def profiled_ops(step: Callable[[], Any], device: torch.device) -> tuple[int, int | None]:
    """(aten ops called from Python, autograd or a compiled graph's wrapper, plus compiled kernels; CUDA kernel
    launches) of one step, from the profiler: what the host dispatches one by one."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    events = prof.events()
    ops = sum(1 for e in events if is_compiled_kernel(e.name) or (e.name.startswith("aten::") and not inside_op(e)))
    launches = sum(1 for e in events if e.name in KERNEL_LAUNCHES) if device.type == "cuda" else None
    return ops, launches


def count_ops(name: str, step: Callable[[], Any], mode: str, batch: int, device: torch.device) -> OpCount:
    for _ in range(3):  # compile, fill the caches; CUDA graphs are recorded on a later call than the first
        step()
    dispatched = None
    if mode == "eager":
        with OpCounter() as counter:
            step()
        dispatched = counter.total
    profiled, launches = profiled_ops(step, device)
    return OpCount(name, mode, batch, dispatched, profiled, launches)


def lightning_overhead(steps: Steps, batch: int) -> tuple[float, float]:
    """Median step time of the same model and batch under the Lightning Trainer and in a bare loop."""
    import pytorch_lightning as pl

    args, device, model = steps.args, steps.device, steps.model
    bare = statistics.median(time_steps(steps.ours(batch, "fp32"), device, args.warmup, args.steps))
    data = synthetic_batch(steps.config, batch, device, True)
    stamps: list[float] = []

    class Stamp(pl.Callback):
        def on_train_batch_end(self, *a: Any) -> None:
            sync(device)
            stamps.append(time.perf_counter())

    loader = torch.utils.data.DataLoader([{k: v[i] for k, v in data.items()} for i in range(batch)] * (args.warmup + args.steps + 1), batch_size=batch)
    trainer = pl.Trainer(max_steps=args.warmup + args.steps + 1, accelerator=device.type, devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Stamp()], limit_val_batches=0)
    trainer.fit(model, loader)
    lit = statistics.median(np.diff(stamps[args.warmup:]).tolist())
    return bare, lit


def timing_jobs(steps: Steps, args: argparse.Namespace, peak: float | None) -> list[tuple[str, Callable[[], Any]]]:
    """Every timed setting as (label, thunk), the ones that answer most first (a time budget cuts the tail): ours in
    the first precision asked (bf16 in the GPU check) per mode and the peer eager, for each batch in the order given; then
    the original's form and ours in the other precisions; then ours without the cache or with checkpointing and the
    peer in its other modes."""
    tiers: list[list[tuple[str, Callable[[], Any]]]] = [[], [], []]
    first = args.precision[0]

    def ours(name: str, batch: int, precision: str, mode: str = "eager", **kw: Any) -> tuple[str, Callable[[], Any]]:
        return (f"{name} b{batch} {precision} {mode}", lambda: measure(name, steps.ours(batch, precision, mode, **kw), args, batch, precision, mode,
                                                                       kw.get("cache", True), kw.get("checkpointing", False), peak))

    def peer(batch: int, precision: str, mode: str) -> tuple[str, Callable[[], Any]]:
        def run() -> Result | None:
            step = steps.peer(batch, precision, mode)
            return None if step is None else measure("peer: diffusers TI step", step, args, batch, precision, mode, False, False, peak)
        return (f"peer b{batch} {precision} {mode}", run)

    for batch in args.batch:
        tiers[0] += [ours("ours", batch, first, mode) for mode in args.modes]
        tiers[1].append(ours("original (fp32, uncached, eager)", batch, "fp32", cache=False, original=True))
        tiers[1] += [ours("ours", batch, precision, mode) for precision in args.precision[1:] for mode in args.modes]
        tiers[2].append(ours("ours, no latent cache", batch, first, args.modes[-1], cache=False))
        tiers[2].append(ours("ours + checkpointing", batch, first, checkpointing=True))
        if not args.no_peer:
            tiers[0] += [peer(batch, precision, args.peer_modes[0]) for precision in args.precision]
            tiers[2] += [peer(batch, precision, mode) for mode in args.peer_modes[1:] for precision in args.precision]
    return tiers[0] + tiers[1] + tiers[2]


def count_jobs(steps: Steps, args: argparse.Namespace) -> list[tuple[str, Callable[[], Any]]]:
    """Ops per fp32 step: the original's form, ours and the peer in each mode."""
    device = steps.device
    jobs: list[tuple[str, Callable[[], Any]]] = []
    for batch in args.batch:
        jobs.append((f"original b{batch}", lambda b=batch: count_ops("original (uncached, eager)", steps.ours(b, "fp32", cache=False, original=True), "eager", b, device)))
        for mode in args.modes:
            jobs.append((f"ours b{batch} {mode}", lambda b=batch, m=mode: count_ops("ours", steps.ours(b, "fp32", m), m, b, device)))
            if not args.no_peer:
                def peer(b: int = batch, m: str = mode) -> OpCount | None:
                    step = steps.peer(b, "fp32", m)
                    return None if step is None else count_ops("peer: diffusers TI step", step, m, b, device)
                jobs.append((f"peer b{batch} {mode}", peer))
    return jobs


def run_jobs(jobs: list[tuple[str, Callable[[], Any]]], budget_s: float | None,
             save: Callable[[list[Any]], None] = lambda done: None) -> tuple[list[Any], list[str]]:
    """Run the jobs in order (the first always), handing the results so far to ``save`` after each (a crash or a
    timeout later keeps them); once ``budget_s`` seconds have passed, the rest are listed as skipped."""
    t0, done, skipped = time.perf_counter(), [], []
    for label, job in jobs:
        if budget_s is not None and done and time.perf_counter() - t0 > budget_s:
            skipped.append(label)
            continue
        logger.info("%s ...", label)
        result = job()
        if result is not None:
            done.append(result)
            save(done)
    if skipped:
        logger.warning("time budget of %.0f s spent: skipped %s", budget_s, ", ".join(skipped))
    return done, skipped


def timing_table(results: list[Result]) -> list[str]:
    lines = ["| setting | mode | batch | precision | cache | ckpt | ms/step | images/s | peak GiB | TFLOP/step | of bf16 peak |",
             "| --- | --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        frac = f"{100 * r.matmul_fraction:.1f}%" if r.matmul_fraction is not None else "-"
        lines.append(f"| {r.name} | {r.mode} | {r.batch} | {r.precision} | {r.cache} | {r.checkpointing} | {1000 * r.sec_per_step:.1f} | "
                     f"{r.images_per_s:.1f} | {r.peak_mem_gib:.2f} | {r.tflop_per_step:.4f} | {frac} |")
    return lines


def count_table(results: list[OpCount]) -> list[str]:
    lines = ["| step | mode | batch | aten ops dispatched | profiled ops + compiled kernels | CUDA kernel launches |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r.name} | {r.mode} | {r.batch} | {r.dispatched if r.dispatched is not None else '-'} | {r.profiled} | "
                     f"{r.launches if r.launches is not None else '-'} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tests/configs/ldm-tiny-finetune.yaml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[4])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=None,
                        help="our step eager, compiled (torch.compile of the UNet) and/or graphs (plus CUDA graphs); default: all three "
                             "on CUDA, eager on CPU (eager and compiled with --count-ops)")
    parser.add_argument("--peer-modes", nargs="+", choices=MODES, default=["eager"], help="the same for the peer's UNet (timing)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: capture without code generation)")
    parser.add_argument("--size", type=int, default=None, help="image size in pixels (default: the config's); op counts do not depend on it")
    parser.add_argument("--count-ops", action="store_true", help="count the ops of one training step instead of timing steps")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=None, help="skip the remaining settings once this many seconds have passed")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (tiny models run fastest on one)")
    parser.add_argument("--no-lightning", action="store_true", help="skip the Lightning-versus-bare-loop measurement")
    parser.add_argument("--no-peer", action="store_true", help="skip the diffusers peer step")
    parser.add_argument("--out", default="benchmark.json")
    parser.add_argument("--markdown", default=None, help="also write the table to this markdown file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("ldm").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.modes is None:
        args.modes = ["eager", "compiled"] if args.count_ops else (list(MODES) if device.type == "cuda" else ["eager"])
    if args.count_ops:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True  # CPU kernels show in the profiler as CUDA ones do
    peak = None if args.count_ops else bf16_matmul_tflops(device)
    steps = Steps(args)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    size = args.size or steps.config.data.params.train.params.get("size", 256)

    def save(results: list[Any], skipped: list[str] | None = None, overhead: tuple[float, float] | None = None) -> None:
        Path(args.out).write_text(json.dumps({"config": args.config, "device": device_name, "size": size, "bf16_matmul_tflops": peak,
                                              "count_ops": args.count_ops, "results": [asdict(r) for r in results], "skipped": skipped,
                                              "lightning_vs_bare_s": overhead, "finished": skipped is not None,
                                              "date": time.strftime("%Y-%m-%d")}, indent=1))

    results, skipped = run_jobs(count_jobs(steps, args) if args.count_ops else timing_jobs(steps, args, peak), args.budget_s, save)
    overhead = None if args.no_lightning or args.count_ops or skipped else lightning_overhead(steps, args.batch[0])
    save(results, skipped, overhead)
    lines = [f"{args.config} at {size} px on {device_name}" + (f", bf16 matmul {peak:.0f} TFLOP/s" if peak else ""), ""]
    lines += count_table(results) if args.count_ops else timing_table(results)
    if overhead:
        lines += ["", f"Lightning step {1000 * overhead[1]:.1f} ms vs bare loop {1000 * overhead[0]:.1f} ms (batch {args.batch[0]}, fp32, cached)"]
    if skipped:
        lines += ["", f"skipped (time budget): {', '.join(skipped)}"]
    print("\n" + "\n".join(lines))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
