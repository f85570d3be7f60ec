"""Time the textual-inversion training step: ours with each speed-up on or off, the original's form, and Lightning's.

Random weights of the real architectures (nothing is downloaded). For each setting: median seconds per step over
``--steps`` steps after ``--warmup``, images/s, peak memory, the FLOPs of one step (torch.utils.flop_counter) and,
on CUDA, the fraction of a measured bf16 matmul rate. A table is printed last and JSON written.

    python scripts/benchmark.py --config tests/configs/ldm-tiny-finetune.yaml --batch 4 --device cpu
    python scripts/benchmark.py --config configs/stable-diffusion/v1-finetune.yaml --batch 1 4 8 --precision fp32 bf16

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
from ldm.util import instantiate_from_config  # noqa: E402

logger = logging.getLogger("benchmark")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def build_model(config_path: str, device: torch.device, cache: bool, checkpointing: bool) -> Any:
    """The config's model with random weights, its placeholder initialised from the config's init word."""
    config = load_model_config(config_path, "--config")
    params = config.model.params
    params.cache_latents = cache
    params.gradient_checkpointing = checkpointing
    params.pop("ckpt_path", None)
    torch.manual_seed(0)
    model = instantiate_from_config(config.model).to(device)
    model.learning_rate = 5e-3
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


def make_step(model: Any, batch: dict, precision: str, device: torch.device) -> Callable[[], torch.Tensor]:
    opt = torch.optim.AdamW(list(model.embedding_manager.embedding_parameters()), lr=model.learning_rate)
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


def measure(name: str, args: argparse.Namespace, batch: int, precision: str, cache: bool, checkpointing: bool, peak_rate: float | None) -> Result:
    device = torch.device(args.device)
    model, config = build_model(args.config, device, cache, checkpointing)
    data = synthetic_batch(config, batch, device, cache)
    step = make_step(model, data, precision, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_steps(step, device, args.warmup, args.steps)
    flops = step_flops(step)
    median = statistics.median(times)
    fraction = flops / median / peak_rate if peak_rate else None
    return Result(name, batch, precision, cache, checkpointing, median, batch / median, peak_memory_gib(device), flops, fraction)


def measure_peer(args: argparse.Namespace, batch: int, precision: str, peak_rate: float | None) -> Result | None:
    """The diffusers textual-inversion step at the same architecture (CLIP configs, diffusers installed)."""
    config = load_model_config(args.config, "--config")
    if "CLIP" not in config.model.params.cond_stage_config.target:
        return None
    try:
        from peer_step import build_peer, make_peer_step
    except ImportError:
        return None
    device = torch.device(args.device)
    torch.manual_seed(0)
    peer = build_peer(config, device, DTYPES[precision])
    step = make_peer_step(peer, synthetic_batch(config, batch, device, cache=False), device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_steps(step, device, args.warmup, args.steps)
    flops = step_flops(step)
    median = statistics.median(times)
    return Result("peer: diffusers TI step", batch, precision, False, False, median, batch / median, peak_memory_gib(device), flops,
                  flops / median / peak_rate if peak_rate else None)


def lightning_overhead(args: argparse.Namespace, batch: int) -> tuple[float, float]:
    """Median step time of the same model and batch under the Lightning Trainer and in a bare loop."""
    import pytorch_lightning as pl

    device = torch.device(args.device)
    model, config = build_model(args.config, device, True, False)
    data = synthetic_batch(config, batch, device, True)
    bare = statistics.median(time_steps(make_step(model, data, "fp32", device), device, args.warmup, args.steps))
    stamps: list[float] = []

    class Stamp(pl.Callback):
        def on_train_batch_end(self, *a: Any) -> None:
            sync(device)
            stamps.append(time.perf_counter())

    loader = torch.utils.data.DataLoader([{k: (v[i] if k != "caption" else v[i]) for k, v in data.items()} for i in range(batch)] * (args.warmup + args.steps + 1), batch_size=batch)
    trainer = pl.Trainer(max_steps=args.warmup + args.steps + 1, accelerator=device.type, devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Stamp()], limit_val_batches=0)
    trainer.fit(model, loader)
    lit = statistics.median(np.diff(stamps[args.warmup:]).tolist())
    return bare, lit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tests/configs/ldm-tiny-finetune.yaml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[4])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (tiny models run fastest on one)")
    parser.add_argument("--no-lightning", action="store_true", help="skip the Lightning-versus-bare-loop measurement")
    parser.add_argument("--no-peer", action="store_true", help="skip the diffusers peer step")
    parser.add_argument("--out", default="benchmark.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("ldm").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peak = bf16_matmul_tflops(device)
    results = []
    for batch in args.batch:
        results.append(measure("original (fp32, uncached, eager)", args, batch, "fp32", cache=False, checkpointing=False, peak_rate=peak))
        for precision in args.precision:
            results.append(measure("ours", args, batch, precision, cache=True, checkpointing=False, peak_rate=peak))
        results.append(measure("ours + checkpointing", args, batch, args.precision[-1], cache=True, checkpointing=True, peak_rate=peak))
        if not args.no_peer:
            results += [r for r in (measure_peer(args, batch, precision, peak) for precision in args.precision) if r is not None]
    overhead = None if args.no_lightning else lightning_overhead(args, args.batch[0])
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    Path(args.out).write_text(json.dumps({"config": args.config, "device": device_name, "bf16_matmul_tflops": peak,
                                          "results": [asdict(r) for r in results], "lightning_vs_bare_s": overhead,
                                          "date": time.strftime("%Y-%m-%d")}, indent=1))
    print(f"\n{args.config} on {device_name}" + (f", bf16 matmul {peak:.0f} TFLOP/s" if peak else ""))
    print(f"{'setting':34} {'batch':>5} {'prec':>5} {'cache':>5} {'ckpt':>5} {'ms/step':>9} {'img/s':>8} {'peak GiB':>9} {'TFLOP':>8} {'of peak':>8}")
    for r in results:
        frac = f"{100 * r.matmul_fraction:.1f}%" if r.matmul_fraction is not None else "-"
        print(f"{r.name:34} {r.batch:5d} {r.precision:>5} {str(r.cache):>5} {str(r.checkpointing):>5} {1000 * r.sec_per_step:9.1f} "
              f"{r.images_per_s:8.1f} {r.peak_mem_gib:9.2f} {r.tflop_per_step:8.4f} {frac:>8}")
    if overhead:
        print(f"Lightning step {1000 * overhead[1]:.1f} ms vs bare loop {1000 * overhead[0]:.1f} ms (batch {args.batch[0]}, fp32, cached)")


if __name__ == "__main__":
    main()
