"""Time fedgen's DP-SGD step against a plain step and against Opacus's own per-sample gradients
(its `functorch` and `hooks` grad-sample modes), on one model and batch, and check that Opacus's
per-sample gradients are exact.

    python benchmarks/dp_step.py [--out benchmarks/results/dp_step.json] [--model tiny|small]
                                 [--batch 32] [--image-size S] [--noise-multiplicity K]
                                 [--repeats 15] [--warmup 3] [--threads N] [--skip-memory]
                                 [--modes plain,dp,opacus_functorch,opacus_hooks]

All steps are the loop body of `fedgen.privacy.dp_sgd.train_locally`, built from the same pieces
(`make_optimizer`, `Diffusion.per_example_loss`, fedgen's `NoisingDPOptimizer` with its secret
noise, configured as there); only the per-example gradient engine differs between the DP ones:

- plain:            zero_grad, per_example_loss(...).mean().backward(), Adam step;
- dp:               zero_grad, fedgen's `per_sample_gradients` (exact; layer rules) into
                    `p.grad_sample`, DPOptimizer.pre_step() (per-example norms, clip to C, sum,
                    Gaussian noise, divide by the expected batch size, accountant hook), Adam step
                    on the original optimizer;
- opacus_functorch: the UNet wrapped as Opacus's PrivacyEngine would wrap it
                    (`prepare_module(unet, grad_sample_mode="functorch")`: a `GradSampleModule`
                    whose hook on every trainable layer computes that layer's per-example
                    gradients with vmap(grad) of the layer), per_example_loss(...).sum().backward(),
                    then the same pre_step and Adam step;
- opacus_hooks:     the same with `grad_sample_mode="hooks"` (Opacus's hand-written rule per layer
                    type: unfold + einsum for convolutions).

The steps, how the UNet is wrapped for Opacus, and the check, before timing, that Opacus's
per-example gradients are exact (reported under "exact" in the JSON; a mode that is not exact is
still timed, one that raises is left out): `dp_step_peers.py`, beside this script.

Each step gets a fixed batch of exactly `--batch` images and fresh (t, eps) draws; Poisson
sampling, data loading and logging are left out. After warm-up, repetitions are interleaved
(plain, dp, opacus_functorch, opacus_hooks, plain, ...) so that load from other processes hits all
alike; the report gives medians and, for each mode, the median of its paired ratios over plain
(`<mode>_over_plain`, with their interquartile range; `dp_over_<opacus mode>` too), for
wall-clock time and, as a cross-check on a shared machine, for the process's CPU time. The model
is the `--model` preset at the default image size unless `--image-size`; noise multiplicity K and
the optimizer come from the default config unless `--noise-multiplicity`. CUDA is used when
available (steps end with a synchronize).

Peak memory: each mode runs in a fresh subprocess (the same script, `--memory-probe MODE`).
On CPU it reports the increase of the process's peak resident set size (Linux `VmHWM`, reset to
the current RSS after setup where the kernel allows; `ru_maxrss` elsewhere) over its value after
setup (model, optimizer, batch, Opacus's wrapper), across a few steps: activations, gradients,
per-example gradients, optimizer state and allocator effects included. On CUDA it reports
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
from importlib.metadata import version
from pathlib import Path

import torch
from dp_step_peers import MODES, OPACUS_MODES, Bench, check_exact, config_for  # beside this script

from fedgen.config import CONF_DIR, ExperimentConfig
from fedgen.model import count_parameters


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_presets() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def time_steps(bench: Bench, repeats: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """Wall-clock and process CPU seconds per step for each of the bench's modes, interleaved
    after `warmup` steps of each: {"wall": {mode: [...]}, "cpu": {mode: [...]}}."""
    for _ in range(warmup):
        for mode in bench.modes:
            bench.step(mode)
    seconds: dict[str, dict[str, list[float]]] = {
        clock: {mode: [] for mode in bench.modes} for clock in ("wall", "cpu")
    }
    for _ in range(repeats):
        for mode in bench.modes:
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


def memory_probe(cfg: ExperimentConfig, batch: int, mode: str, steps: int = 3) -> dict:
    """Peak memory of `steps` steps of one mode, in this (fresh) process."""
    device = pick_device()
    bench = Bench(cfg, batch, device, modes=(mode,))
    if mode in bench.errors:
        raise RuntimeError(bench.errors[mode])
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


def measure_memory(args: argparse.Namespace, mode: str) -> dict:
    """Run `memory_probe` in a fresh interpreter so another mode's peak cannot mask this one.
    A probe that fails gives {"mode", "error"}."""
    cmd = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch),
           "--memory-probe", mode, "--threads", str(torch.get_num_threads())]
    if args.image_size is not None:
        cmd += ["--image-size", str(args.image_size)]
    if args.noise_multiplicity is not None:
        cmd += ["--noise-multiplicity", str(args.noise_multiplicity)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return {"mode": mode, "error": lines[-1] if lines else f"exit status {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(seconds: dict[str, dict[str, list[float]]]) -> dict:
    """Medians per mode, the median of each mode's paired ratios over plain and of dp's over each
    Opacus mode, for wall-clock time (the headline) and for process CPU time (less sensitive to
    other processes on a shared machine; with several threads it adds up their time,
    busy-waiting included). Keys: `[cpu_]<mode>_s_per_step`, `[cpu_]<a>_over_<b>[_iqr]`."""
    out: dict = {}
    for clock, prefix in (("wall", ""), ("cpu", "cpu_")):
        by_mode = seconds[clock]
        for mode, values in by_mode.items():
            out[f"{prefix}{mode}_s_per_step"] = statistics.median(values)
        pairs = [(mode, "plain") for mode in by_mode if mode != "plain" and "plain" in by_mode]
        if "dp" in by_mode:
            pairs += [("dp", mode) for mode in by_mode if mode in OPACUS_MODES]
        for num, den in pairs:
            ratios = [a / b for a, b in zip(by_mode[num], by_mode[den])]
            out[f"{prefix}{num}_over_{den}"] = statistics.median(ratios)
            out[f"{prefix}{num}_over_{den}_iqr"] = _quartiles(ratios)
    out["seconds"] = seconds
    return out


def _quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]] if values else []
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def _parse_modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {unknown}; known: {','.join(MODES)}")
    if "plain" not in modes:
        raise argparse.ArgumentTypeError("the modes must include plain (ratios are over plain)")
    return tuple(m for m in MODES if m in modes)  # the canonical order


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/dp_step.json")
    parser.add_argument("--model", default="tiny", choices=model_presets(), help="a conf/model preset")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, help="data.image_size (default: the config's)")
    parser.add_argument("--noise-multiplicity", type=int,
                        help="training.noise_multiplicity K (default: the config's)")
    parser.add_argument("--repeats", type=int, default=15, help="timed steps of each mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each mode first")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--modes", type=_parse_modes, default=MODES,
                        help=f"comma-separated, plain included (default: {','.join(MODES)})")
    parser.add_argument("--skip-memory", action="store_true", help="no memory subprocesses")
    parser.add_argument("--memory-probe", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    # vmap's fallback warnings (if any op lacks a batching rule) and PyTorch's note that Opacus's
    # full backward hooks fire on the UNet's input-less first layers are noise in a benchmark.
    warnings.filterwarnings("ignore", message="There is a performance drop")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = config_for(args.model, args.batch, args.image_size, args.noise_multiplicity)

    if args.memory_probe:
        print(json.dumps(memory_probe(cfg, args.batch, args.memory_probe)))
        return None

    device = pick_device()
    bench = Bench(cfg, args.batch, device, modes=args.modes)
    exact = check_exact(bench)
    summary = summarize(time_steps(bench, args.repeats, args.warmup))
    memory = {} if args.skip_memory else {m: measure_memory(args, m) for m in bench.modes}
    measured = [m for m in memory.values() if "peak_bytes" in m]
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
        "opacus": version("opacus"),
        "diffusers": version("diffusers"),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "modes": list(bench.modes),
        **summary,
        "exact": exact,
        "peak_memory_bytes": {m: r["peak_bytes"] for m, r in memory.items() if "peak_bytes" in r},
        "peak_memory_errors": {m: r["error"] for m, r in memory.items() if "error" in r},
        "peak_memory_measure": measured[0]["measure"] if measured else None,
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
        f"torch {r['torch']}, opacus {r['opacus']}, {r['threads']} threads"
    )
    mem = r["peak_memory_bytes"]
    print(f"{'step':<17} {'median s/step':>14} {'CPU s/step':>11} {'peak memory MiB':>16} "
          f"{'over plain (IQR)':>22}")
    for mode in r["modes"]:
        mib = f"{mem[mode] / 2**20:.1f}" if mode in mem else "-"
        ratio = "" if mode == "plain" else (
            f"{r[f'{mode}_over_plain']:.2f}x ({r[f'{mode}_over_plain_iqr'][0]:.2f}-"
            f"{r[f'{mode}_over_plain_iqr'][1]:.2f})")
        print(f"{mode:<17} {r[f'{mode}_s_per_step']:>14.4f} {r[f'cpu_{mode}_s_per_step']:>11.4f} "
              f"{mib:>16} {ratio:>22}")
    for prefix, clock in (("", "wall-clock"), ("cpu_", "CPU time")):
        for key in [k for k in r if k.startswith(f"{prefix}dp_over_") and not k.endswith("_iqr")]:
            lo, hi = r[f"{key}_iqr"]
            other = key.removeprefix(f"{prefix}dp_over_")
            print(f"dp/{other}, {clock} (median of {r['repeats']} paired ratios): "
                  f"{r[key]:.2f}x (IQR {lo:.2f}-{hi:.2f})")
    for mode, report in r["exact"].items():
        if "error" in report:
            print(f"{mode}: not run: {report['error']}")
        else:
            names = ", ".join(report["names"]) or "none"
            print(f"{mode}: per-example gradients mismatch fedgen's exact ones for "
                  f"{report['mismatched_parameters']} of {report['compared_parameters']} "
                  f"parameters: {names} (the others agree to "
                  f"{report['max_relative_diff_of_matching']:.1e} of their scale)")
    for mode, error in r["peak_memory_errors"].items():
        print(f"{mode}: memory probe failed: {error}")


if __name__ == "__main__":
    main()
