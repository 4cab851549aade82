"""The training steps of the default denoiser against the levers that might speed them up, in one run:
GFLOP per step, achieved GFLOPS, images per second and the speed-up over the current step.

    PYTHONPATH=src python benchmarks/train_step.py [--threads 2] [--rounds 8] [--compile] [key=value ...]
    PYTHONPATH=src taskset -c 0 python benchmarks/train_step.py --threads 1     # the one-core machine

Pretraining: `stages.pretrain.pretraining_step` (bf16 autocast, NCHW, Adam) at `pretrain.batch_size`, against
float32, channels_last, fused Adam, the bare U-Net without the EDM preconditioning (what fusing the
preconditioning could gain at most), larger batches (images per second), other denoisers (`--denoisers`, each a
set of `model.` overrides: narrower, or on 2 × 2 patches; fewer FLOP per image, whose quality is an experiment's
question), and with `--compile`
torch.compile (inductor) of the denoiser, whose compile seconds are measured apart in child processes
sharing a fresh inductor cache: the first on an empty cache, the second on the cache the first left.
DP-SGD: one `privacy.dpsgd.DPSGD` step (torch.func vmap per-sample gradients) on `finetune.batch_size`
samples (the expected logical batch), against other `max_physical_batch`es, float32, stock Opacus'
per-sample-gradient hooks (GradSampleModule) with the same clipping and noise, and the other denoisers.

FLOP are counted by torch.utils.flop_counter.FlopCounterMode on each pretraining arm's own eager step (a bf16
FLOP counts as one; the compiled arm does the eager step's math). A DP-SGD step is credited with the FLOP of
a non-private step on its logical batch, the useful work: the counter's formula for the grouped convolutions
that vmap turns per-sample weight gradients into counts many times the work done. Random weights and data
of the default shapes: the cost does not depend on their values. The arms take turns, round after round,
each round starting one arm later, so that a change in the load of a shared machine hits them alike; the
median of each arm's rounds is reported, with the spread (slowest round / fastest).

The ceiling, measured in the same run: the GFLOPS of a large matrix product on the same threads (bf16 and
float32), and the share of the current step's time spent in convolutions (torch.profiler) with their own
GFLOPS. Together they bound what any lever that keeps the step's FLOP can give: the step cannot run faster
than its FLOP at the matrix product's rate, nor than its convolutions alone at their measured rate.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch
from opacus import GradSampleModule
from torch.utils.flop_counter import FlopCounterMode

from privimage.config import load_config
from privimage.privacy.dpsgd import DPSGD
from privimage.builders import build_denoiser, diffusion_loss, pretraining_step

CLASSES = 10
# Denoisers with fewer FLOP per image: narrower, or the U-Net on 2 x 2 patches (model.patch_size), which drops
# the full-resolution level and runs wider convolutions at half the resolution.
DENOISERS = ("model.base_channels=12", "model.base_channels=8",
             "model.patch_size=2 model.channel_mult=[1,1] model.base_channels=32")


@dataclass
class Arm:
    name: str
    step: Callable[[], object]
    images: int  # per step
    flop: float = 0.0
    seconds: list[float] | None = None


def count_flop(step: Callable[[], object], op_name: str = "") -> float:
    """FLOP of one call of `step`, of the operators whose name holds `op_name` (all by default)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return float(sum(flop for op, flop in counter.get_flop_counts()["Global"].items() if op_name in str(op)))


CONVOLUTION_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward")


def matmul_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """GFLOPS of a size x size matrix product: what these cores reach on the densest work there is."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size ** 3 * repeats / (time.perf_counter() - started) / 1e9


def convolution_share(step: Callable[[], object], steps: int = 3) -> float:
    """The share of the step's time (torch.profiler, self times) in convolutions, forward and backward."""
    with torch.profiler.profile() as profiler:
        for _ in range(steps):
            step()
    events = profiler.key_averages()
    return (sum(e.self_cpu_time_total for e in events if e.key in CONVOLUTION_OPS)
            / sum(e.self_cpu_time_total for e in events))


def print_ceiling(current: Arm) -> None:
    seconds = statistics.median(current.seconds)
    share, conv_flop = convolution_share(current.step), count_flop(current.step, "convolution")
    bf16, fp32 = matmul_gflops(torch.bfloat16), matmul_gflops(torch.float32)
    conv_gflops = conv_flop / (share * seconds) / 1e9
    print(f"\nCeiling: a 2048x2048 matrix product runs at {bf16:.0f} GFLOPS in bf16, {fp32:.0f} in float32, "
          f"on these threads.")
    print(f"The current step: {current.flop / seconds / 1e9:.0f} GFLOPS, {current.flop / seconds / 1e9 / bf16:.0%} "
          f"of bf16's; its convolutions take {share:.0%} of its time at {conv_gflops:.0f} GFLOPS "
          f"({conv_gflops / bf16:.0%} of bf16's).")
    print(f"Bounds on a lever that keeps the step's FLOP: all of them at the matrix product's rate "
          f"{bf16 * 1e9 * seconds / current.flop:.2f}x; the convolutions alone, the rest free, {1 / share:.2f}x.")


def time_arms(arms: list[Arm], rounds: int) -> None:
    """Each arm once to warm up, then `rounds` rounds in which every arm runs once, in turn; each round
    starts one arm later than the one before, so that no arm always follows the same one."""
    for arm in arms:
        arm.step()
        arm.seconds = []
    for round_ in range(rounds):
        for arm in arms[round_ % len(arms):] + arms[:round_ % len(arms)]:
            started = time.perf_counter()
            arm.step()
            arm.seconds.append(time.perf_counter() - started)


def print_table(title: str, arms: list[Arm]) -> None:
    baseline = statistics.median(arms[0].seconds)
    print(f"\n{title}")
    print(f"{'arm':44s} {'s/step':>7s} {'spread':>6s} {'GFLOP':>6s} {'GFLOPS':>6s} {'img/s':>6s} {'speed-up':>8s}")
    for arm in arms:
        seconds = statistics.median(arm.seconds)
        spread = max(arm.seconds) / min(arm.seconds)
        images_per_second = arm.images / seconds
        speedup = images_per_second / (arms[0].images / baseline)
        print(f"{arm.name:44s} {seconds:7.3f} {spread:6.2f} {arm.flop / 1e9:6.1f} {arm.flop / seconds / 1e9:6.1f} "
              f"{images_per_second:6.0f} {speedup:7.2f}x")


def batch(cfg, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    d = cfg.data
    return (torch.rand(size, d.channels, d.resolution, d.resolution, generator=generator) * 2 - 1,
            torch.randint(0, CLASSES, (size,), generator=generator))


def pretraining_arm(cfg, base: torch.nn.Module, name: str, *, batch_size: int | None = None, bf16: bool = True,
                    channels_last: bool = False, fused_adam: bool = False, bare_unet: bool = False,
                    compiled: bool = False) -> Arm:
    """`pretraining_step` on its own copy of `base`, changed by one lever."""
    size = batch_size or cfg.pretrain.batch_size
    net = copy.deepcopy(base)
    x, y = batch(cfg, size)
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4, fused=True if fused_adam else None)
    loss_fn = diffusion_loss(cfg, CLASSES)
    if bare_unet:  # the U-Net at the noise levels of the loss, its preconditioning skipped
        unet = net.unet
        forward = lambda noisy, sigma, labels: unet(noisy, sigma.log() / 4, labels)  # noqa: E731
    else:
        forward = net
    if compiled:
        forward = torch.compile(net)

    def step() -> None:
        pretraining_step(forward, loss_fn, optimizer, x, y, bf16=bf16)

    arm = Arm(name, step, size)
    if not compiled:
        arm.flop = count_flop(step)
    return arm


def opacus_dp_step(cfg, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, engine: DPSGD) -> Callable[[], None]:
    """The DPSGD engine's step with Opacus' hooks computing the per-sample gradients (K = 1): same
    micro-batches, clipping, noise and update, so only the per-sample path differs."""
    model = GradSampleModule(net, batch_first=True, loss_reduction="sum")
    loss_fn = diffusion_loss(cfg, CLASSES)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-4)

    def step() -> None:
        sums = [torch.zeros_like(p) for p in params]
        for start in range(0, len(x), engine.samples_per_chunk):
            end = start + engine.samples_per_chunk
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=engine.bf16):
                losses = loss_fn(model, x[start:end], y[start:end]).float()
            losses.sum().backward()
            grads = [p.grad_sample.float() for p in params]
            norms = torch.linalg.vector_norm(torch.stack([g.flatten(1).norm(dim=1) for g in grads], dim=1), dim=1)
            scale = (engine.clip_norm / (norms + 1e-6)).clamp(max=1.0)
            for total, g in zip(sums, grads):
                total += torch.tensordot(scale, g, dims=1)
            model.zero_grad(set_to_none=True)
        engine._add_noise_once(sums)
        for p, total in zip(params, sums):
            p.grad = total.div_(engine.expected_batch_size)
        optimizer.step()

    return step


def dp_arm(cfg, base: torch.nn.Module, name: str, size: int, *, max_physical_batch: int | None = None,
           bf16: bool = True, opacus: bool = False) -> Arm:
    f = cfg.finetune
    net = copy.deepcopy(base)
    x, y = batch(cfg, size, seed=1)
    engine = DPSGD(net, diffusion_loss(cfg, CLASSES), clip_norm=f.clip_norm, noise_multiplier=1.0,
                   expected_batch_size=size, noise_multiplicity=1,
                   max_physical_batch=max_physical_batch or f.max_physical_batch, bf16=bf16)
    if opacus:
        step = opacus_dp_step(cfg, net, x, y, engine)
    else:
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
        step = lambda: engine.step(x, y, optimizer)  # noqa: E731
    return Arm(name, step, size)


def nonprivate_flop(cfg, base: torch.nn.Module, size: int) -> float:
    """FLOP of a non-private step on `size` samples: what a DP-SGD step is credited with."""
    x, y = batch(cfg, size, seed=1)
    net = copy.deepcopy(base)
    return count_flop(lambda: pretraining_step(net, diffusion_loss(cfg, CLASSES), torch.optim.SGD(net.parameters()),
                                               x, y, bf16=True))


def denoiser(cfg) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_denoiser(cfg, CLASSES).train()


def parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def compile_seconds(args: argparse.Namespace, cache: str) -> float:
    """Seconds of the first compiled pretraining step (compile included) in a new process using `cache`."""
    command = [sys.executable, __file__, "--threads", str(args.threads), "--first-compiled-step", *args.overrides]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return float(output.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--dp-rounds", type=int, default=3, help="rounds of the (slower) DP-SGD arms")
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[128, 256], help="pretraining batch arms")
    parser.add_argument("--physical-batches", type=int, nargs="*", default=[64, 256], help="DP-SGD micro-batch arms")
    parser.add_argument("--denoisers", nargs="*", default=list(DENOISERS),
                        help="arms of other denoisers, each a quoted set of model.key=value overrides")
    parser.add_argument("--compile", action="store_true", help="add torch.compile (minutes of compiling)")
    parser.add_argument("--steps", choices=["both", "pretrain", "dp"], default="both", help="which steps to time")
    parser.add_argument("--first-compiled-step", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config key=value, e.g. model.base_channels=32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config("default", overrides=args.overrides)
    base = denoiser(cfg)

    if args.first_compiled_step:
        step = pretraining_arm(cfg, base, "compiled", compiled=True).step
        started = time.perf_counter()
        step()
        print(f"{time.perf_counter() - started:.2f}")
        return

    print(f"{parameters(base):,} parameters, {cfg.data.channels}x{cfg.data.resolution}x{cfg.data.resolution}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds (DP-SGD {args.dp_rounds}), "
          f"torch {torch.__version__}")
    others = {arm: denoiser(load_config("default", overrides=[*args.overrides, *arm.split()])) for arm in args.denoisers}
    compiled = []
    if args.compile and args.steps != "dp":
        with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
            cold, warm = compile_seconds(args, cache), compile_seconds(args, cache)
            print(f"torch.compile: first compiled step {cold:.1f} s on an empty inductor cache, "
                  f"{warm:.1f} s on a warm one")
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
            compiled = [pretraining_arm(cfg, base, "torch.compile (inductor)", compiled=True)]
            compiled[0].step()  # compiles here, from the warm cache, outside the timing
    if args.steps != "dp":
        b = cfg.pretrain.batch_size
        arms = [
            pretraining_arm(cfg, base, f"current (bf16, NCHW, batch {b})"),
            pretraining_arm(cfg, base, "float32", bf16=False),
            pretraining_arm(cfg, base, "channels_last", channels_last=True),
            pretraining_arm(cfg, base, "fused Adam", fused_adam=True),
            pretraining_arm(cfg, base, "U-Net alone (no preconditioning)", bare_unet=True),
            *[pretraining_arm(cfg, base, f"batch {size}", batch_size=size) for size in args.batch_sizes],
            *[pretraining_arm(cfg, net, f"{arm} ({parameters(net):,} parameters)") for arm, net in others.items()],
            *compiled,
        ]
        if compiled:
            compiled[0].flop = arms[0].flop
        time_arms(arms, args.rounds)
        print_table("Pretraining step", arms)
        print_ceiling(arms[0])
    if args.steps != "pretrain":
        size, physical = cfg.finetune.batch_size, cfg.finetune.max_physical_batch
        dp_arms = [
            dp_arm(cfg, base, f"current (vmap, bf16, micro-batch {physical})", size),
            dp_arm(cfg, base, "float32", size, bf16=False),
            dp_arm(cfg, base, "Opacus hooks (GradSampleModule)", size, opacus=True),
            *[dp_arm(cfg, base, f"micro-batch {m}", size, max_physical_batch=m) for m in args.physical_batches],
        ]
        flop = nonprivate_flop(cfg, base, size)
        for arm in dp_arms:
            arm.flop = flop
        for arm, net in others.items():
            dp_arms.append(dp_arm(cfg, net, arm, size))
            dp_arms[-1].flop = nonprivate_flop(cfg, net, size)
        time_arms(dp_arms, args.dp_rounds)
        print_table(f"DP-SGD step, logical batch {size}", dp_arms)


if __name__ == "__main__":
    main()
