"""Time one DP-SGD training step against one plain training step, on the default model and batch.

    python benchmarks/dp_step.py [--out benchmarks/results/dp_step.json] [--model tiny]
                                 [--batch 32] [--repeats 15] [--warmup 3] [--threads N]
                                 [--skip-memory]

Both steps are the loop body of `fedgen.privacy.dp_sgd.train_locally`, built from the same pieces
(`make_optimizer`, `Diffusion.per_example_loss`, `per_sample_gradients`, fedgen's
`NoisingDPOptimizer` with its secret noise, configured as there):

- plain: zero_grad, per_example_loss(...).mean().backward(), Adam step;
- dp:    zero_grad, per_sample_gradients(...) into `p.grad_sample`, DPOptimizer.pre_step()
         (per-example norms, clip to C, sum, Gaussian noise, divide by the expected batch size,
         accountant hook), Adam step on the original optimizer.

Each step gets a fixed batch of exactly `--batch` images and fresh (t, eps) draws; Poisson
sampling, data loading and logging are left out. After warm-up, A/B repetitions are interleaved
(plain, dp, plain, dp, ...) so that load from other processes hits both alike; the report gives
medians and the median of the paired dp/plain ratios (with their interquartile range), for
wall-clock time and, as a cross-check on a shared machine, for the process's CPU time. The model
is the `--model` preset at the default image size; noise multiplicity K and the optimizer come
from the default config. CUDA is used when available (steps end with a synchronize).

Peak memory: each mode runs in a fresh subprocess (the same script, `--memory-probe MODE`).
On CPU it reports the increase of the process's peak resident set size (Linux `VmHWM`, reset to
the current RSS after setup where the kernel allows; `ru_maxrss` elsewhere) over its value after
setup (model, optimizer, batch), across a few steps: activations, gradients, per-example
gradients, optimizer state and allocator effects included. On CUDA it reports
`torch.cuda.max_memory_allocated` minus the memory allocated before the steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from opacus.accountants import RDPAccountant

from fedgen.config import ExperimentConfig, load_config
from fedgen.diffusion import Diffusion, unet_denoiser
from fedgen.model import build_scheduler, build_unet, count_parameters
from fedgen.privacy.dp_sgd import make_optimizer
from fedgen.privacy.per_sample_grads import per_sample_gradients
from fedgen.privacy.randomness import NoisingDPOptimizer, SecretRandomness

# Any values: a step's cost depends on neither (the accountant hook only records them).
NOISE_MULTIPLIER = 1.0
SAMPLE_RATE = 0.05
MODES = ("plain", "dp")


class Bench:
    """One model, one batch, and a step function per mode. Both modes share the UNet's weights
    but have their own optimizer state (Adam moments), as two separate training runs would."""

    def __init__(self, cfg: ExperimentConfig, batch: int, device: torch.device, seed: int = 0):
        torch.manual_seed(seed)
        self.cfg = cfg
        self.device = device
        self.unet = build_unet(cfg.model, cfg.data.image_size).to(device)
        self.unet.train()
        self.diffusion = Diffusion(build_scheduler(cfg.model))
        self.denoiser = unet_denoiser(self.unet)
        self.k = cfg.training.noise_multiplicity
        size = cfg.data.image_size
        self.x0 = (torch.rand(batch, 1, size, size) * 2 - 1).to(device)
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.named = [(n, p) for n, p in self.unet.named_parameters() if p.requires_grad]
        params = [p for _, p in self.named]
        self.plain_opt = make_optimizer(cfg, params)
        self.dp_opt = NoisingDPOptimizer(
            make_optimizer(cfg, params),
            noise_multiplier=NOISE_MULTIPLIER,
            max_grad_norm=cfg.privacy.max_grad_norm,
            expected_batch_size=batch,
            loss_reduction="mean",
            randomness=SecretRandomness(),  # what training uses: the OS's CSPRNG, not a seed
        )
        self.accountant = RDPAccountant()
        self.dp_opt.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=SAMPLE_RATE))

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        t, eps = self.diffusion.draw(self.x0.cpu(), self.k, generator=self.gen)
        return t.to(self.device), eps.to(self.device)

    def plain_step(self) -> None:
        t, eps = self._draw()
        self.plain_opt.zero_grad(set_to_none=True)
        losses = self.diffusion.per_example_loss(self.denoiser, self.x0, t, eps)
        losses.mean().backward()
        self.plain_opt.step()
        self._sync()

    def dp_step(self) -> None:
        t, eps = self._draw()
        self.dp_opt.zero_grad(set_to_none=True)
        grads, _ = per_sample_gradients(self.unet, self.diffusion, self.x0, t, eps)
        for name, p in self.named:
            p.grad_sample = grads[name]
        self.dp_opt.pre_step()
        self.dp_opt.original_optimizer.step()
        self._sync()

    def step(self, mode: str) -> None:
        (self.plain_step if mode == "plain" else self.dp_step)()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def config_for(model: str, batch: int) -> ExperimentConfig:
    return load_config([f"model={model}", f"training.batch_size={batch}"])


def time_steps(bench: Bench, repeats: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """Wall-clock and process CPU seconds per step for each mode, A/B interleaved after `warmup`
    steps of each: {"wall": {mode: [...]}, "cpu": {mode: [...]}}."""
    for _ in range(warmup):
        for mode in MODES:
            bench.step(mode)
    seconds: dict[str, dict[str, list[float]]] = {
        clock: {mode: [] for mode in MODES} for clock in ("wall", "cpu")
    }
    for _ in range(repeats):
        for mode in MODES:
            wall, cpu = time.perf_counter(), time.process_time()
            bench.step(mode)
            seconds["cpu"][mode].append(time.process_time() - cpu)
            seconds["wall"][mode].append(time.perf_counter() - wall)
    return seconds


def _reset_peak_rss() -> None:
    # Linux >= 4.0: writing 5 resets the peak RSS (VmHWM) to the current RSS.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_bytes() -> int:
    """This process's peak resident set size. Linux's VmHWM belongs to the process image, whereas
    ru_maxrss after fork+exec still holds the parent's peak (which would mask the child's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if platform.system() == "Darwin" else rss * 1024  # KiB on Linux, bytes on macOS


def memory_probe(model: str, batch: int, mode: str, steps: int = 3) -> dict:
    """Peak memory of `steps` steps of one mode, in this (fresh) process."""
    device = pick_device()
    bench = Bench(config_for(model, batch), batch, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            bench.step(mode)
        peak = torch.cuda.max_memory_allocated(device) - before
        kind = "cuda max_memory_allocated increase"
    else:
        _reset_peak_rss()
        before = _peak_rss_bytes()
        for _ in range(steps):
            bench.step(mode)
        peak = _peak_rss_bytes() - before
        kind = "peak RSS (VmHWM) increase over the post-setup peak"
    return {"mode": mode, "peak_bytes": peak, "measure": kind, "steps": steps}


def measure_memory(model: str, batch: int, mode: str) -> dict:
    """Run `memory_probe` in a fresh interpreter so the other mode's peak cannot mask this one."""
    cmd = [sys.executable, __file__, "--model", model, "--batch", str(batch), "--memory-probe", mode,
           "--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def summarize(seconds: dict[str, dict[str, list[float]]]) -> dict:
    """Medians per mode and the median of the paired dp/plain ratios, for wall-clock time (the
    headline) and for process CPU time (less sensitive to other processes on a shared machine;
    with several threads it adds up their time, busy-waiting included)."""
    out: dict = {}
    for clock, prefix in (("wall", ""), ("cpu", "cpu_")):
        by_mode = seconds[clock]
        ratios = [d / p for p, d in zip(by_mode["plain"], by_mode["dp"])]
        out[f"{prefix}plain_s_per_step"] = statistics.median(by_mode["plain"])
        out[f"{prefix}dp_s_per_step"] = statistics.median(by_mode["dp"])
        out[f"{prefix}dp_over_plain"] = statistics.median(ratios)
        out[f"{prefix}dp_over_plain_iqr"] = _quartiles(ratios)
    out["seconds"] = seconds
    return out


def _quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]] if values else []
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/dp_step.json")
    parser.add_argument("--model", default="tiny", help="a conf/model preset")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15, help="timed steps of each mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each mode first")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--skip-memory", action="store_true", help="no memory subprocesses")
    parser.add_argument("--memory-probe", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    # vmap's fallback warnings (if any op lacks a batching rule) are noise in a benchmark's output.
    warnings.filterwarnings("ignore", message="There is a performance drop")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    if args.memory_probe:
        print(json.dumps(memory_probe(args.model, args.batch, args.memory_probe)))
        return None

    device = pick_device()
    cfg = config_for(args.model, args.batch)
    bench = Bench(cfg, args.batch, device)
    summary = summarize(time_steps(bench, args.repeats, args.warmup))
    memory = {} if args.skip_memory else {m: measure_memory(args.model, args.batch, m) for m in MODES}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": commit,
        "load_average": os.getloadavg(),
        "model": args.model,
        "batch": args.batch,
        "image_size": cfg.data.image_size,
        "noise_multiplicity": cfg.training.noise_multiplicity,
        "parameters": count_parameters(bench.unet),
        "optimizer": cfg.training.optimizer,
        "device": str(device),
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        **summary,
        "peak_memory_bytes": {m: memory[m]["peak_bytes"] for m in memory},
        "peak_memory_measure": next(iter(memory.values()))["measure"] if memory else None,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    _print_table(result)
    print(f"wrote {out}")
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _print_table(r: dict) -> None:
    print(
        f"{r['model']} UNet ({r['parameters']:,} parameters), batch {r['batch']}, "
        f"{r['image_size']}x{r['image_size']}, K={r['noise_multiplicity']}, {r['device']}, "
        f"torch {r['torch']}, {r['threads']} threads"
    )
    mem = r["peak_memory_bytes"]
    print(f"{'step':<6} {'median s/step':>14} {'CPU s/step':>11} {'peak memory MiB':>16}")
    for mode in MODES:
        mib = f"{mem[mode] / 2**20:.1f}" if mode in mem else "-"
        print(f"{mode:<6} {r[f'{mode}_s_per_step']:>14.4f} {r[f'cpu_{mode}_s_per_step']:>11.4f} {mib:>16}")
    for prefix, clock in (("", "wall-clock"), ("cpu_", "CPU time")):
        lo, hi = r[f"{prefix}dp_over_plain_iqr"]
        print(f"dp/plain, {clock} (median of {r['repeats']} paired ratios): "
              f"{r[f'{prefix}dp_over_plain']:.2f}x (IQR {lo:.2f}-{hi:.2f})")


if __name__ == "__main__":
    main()
