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

Wrapping diffusers' UNet2DModel for Opacus: nothing special. It passes Opacus's ModuleValidator
and `GradSampleModule(strict=True)` (no buffers, no BatchNorm), and the attention (diffusers'
default `AttnProcessor2_0`, scaled_dot_product_attention) has no parameters of its own: its
projections are `nn.Linear` layers, which Opacus hooks like any other. `unet_denoiser(module)` calls
the wrapper as fedgen calls the UNet. Two things are the benchmark's: (1) `loss_reduction="sum"`
on the wrapper and `losses.sum().backward()`, so that `p.grad_sample` is each example's gradient
of its own loss, as `per_sample_gradients` returns it (with "mean", Opacus rescales the output
gradients by the rows it sees, B*K, not by B); the DP optimizer keeps fedgen's
`loss_reduction="mean"` (divide by the expected batch size). (2) With noise multiplicity K > 1 the
UNet's batch is the B*K (example, draw) rows (consecutive per example), and Opacus's layer hooks
see only those rows, so its `grad_sample` has B*K rows; the K rows of each example are summed
before clipping (the per-example loss averages the draws), which is what fedgen's rules do inside.
Each Opacus mode runs on its own deep copy of the UNet (Opacus's hooks stay on the modules they
wrap and would slow the other steps down) with its own optimizer state; the weights start equal.

Exactness: before timing, one (t, eps) draw on the fixed batch goes through fedgen's exact
`per_sample_gradients` (itself tested against a one-example loop) and through each Opacus mode,
with the Opacus copy's weights set to the UNet's. Per parameter, Opacus's per-example gradients
[B, *shape] mismatch when max|opacus - fedgen| > 1e-4 * max(max|fedgen|, max|opacus|); the JSON
names each mismatched parameter (and whether Opacus's values were all zero). A mode that is not
exact is still timed; a mode that raises (an unsupported layer, at wrapping or in the first step)
is reported with its error and left out of the timing.

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
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import torch
from opacus.accountants import RDPAccountant
from opacus.grad_sample import prepare_module
from opacus.validators import ModuleValidator

from fedgen.config import CONF_DIR, ExperimentConfig, load_config
from fedgen.diffusion import Diffusion, unet_denoiser
from fedgen.model import build_scheduler, build_unet, count_parameters
from fedgen.privacy.dp_sgd import make_optimizer
from fedgen.privacy.per_sample_grads import per_sample_gradients
from fedgen.privacy.randomness import NoisingDPOptimizer, SecretRandomness

# Any values: a step's cost depends on neither (the accountant hook only records them).
NOISE_MULTIPLIER = 1.0
SAMPLE_RATE = 0.05
# Benchmark mode -> Opacus grad_sample_mode.
OPACUS_MODES = {"opacus_functorch": "functorch", "opacus_hooks": "hooks"}
MODES = ("plain", "dp", *OPACUS_MODES)
# Per-example gradients of one parameter mismatch when their largest difference exceeds this
# fraction of their largest magnitude (two exact float32 computations agree to ~1e-6 of it).
EXACT_RTOL = 1e-4


class OpacusPeer:
    """Opacus's per-sample gradients on its own deep copy of the UNet, wrapped as its PrivacyEngine
    wraps a model for `grad_sample_mode`, with a DP optimizer configured as fedgen's."""

    def __init__(
        self,
        unet: torch.nn.Module,
        grad_sample_mode: str,
        dp_optimizer: Callable[[list[torch.nn.Parameter]], NoisingDPOptimizer],
    ):
        self.unet = copy.deepcopy(unet)
        errors = ModuleValidator.validate(self.unet, strict=False)  # what PrivacyEngine refuses
        if errors:
            raise NotImplementedError(f"Opacus's ModuleValidator: {errors}")
        # loss_reduction="sum": p.grad_sample is each example's gradient of its own loss (see the
        # module docstring); strict=True (PrivacyEngine's default): refuse layers with buffers.
        self.module = prepare_module(
            self.unet, grad_sample_mode=grad_sample_mode, batch_first=True, loss_reduction="sum",
            strict=True,
        )
        self.named = [(n, p) for n, p in self.unet.named_parameters() if p.requires_grad]
        self.optimizer = dp_optimizer([p for _, p in self.named])

    def grad_samples(
        self, diffusion: Diffusion, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
    ) -> None:
        """Forward and backward of the summed per-example loss, leaving `p.grad_sample` [B, *shape]
        on every trainable parameter. x0 [B,C,H,W]; t [B,K]; eps [B,K,C,H,W]."""
        losses = diffusion.per_example_loss(unet_denoiser(self.module), x0, t, eps)  # [B]
        losses.sum().backward()
        b, k = t.shape
        for name, p in self.named:
            gs = p.grad_sample  # type: ignore[attr-defined]
            if not isinstance(gs, torch.Tensor):  # None: not computed; a list: accumulated
                raise RuntimeError(f"Opacus left no single grad_sample tensor for {name}: {type(gs)}")
            if k > 1:  # the UNet's rows are (example, draw) pairs: sum each example's K rows
                p.grad_sample = gs.reshape(b, k, *p.shape).sum(dim=1)  # type: ignore[attr-defined]


class Bench:
    """One model, one batch, and a step function per mode. plain and dp share the UNet's weights
    but have their own optimizer state (Adam moments), as two separate training runs would; each
    Opacus mode has its own copy of the UNet (same initial weights). An Opacus mode that cannot
    wrap the UNet is left out, its error in `errors`."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        batch: int,
        device: torch.device,
        seed: int = 0,
        modes: tuple[str, ...] = MODES,
    ):
        torch.manual_seed(seed)
        self.cfg = cfg
        self.device = device
        self.unet = build_unet(cfg.model, cfg.data.image_size).to(device)
        self.unet.train()
        self.diffusion = Diffusion(build_scheduler(cfg.model))
        self.denoiser = unet_denoiser(self.unet)
        self.k = cfg.training.noise_multiplicity
        self.batch = batch
        size = cfg.data.image_size
        self.x0 = (torch.rand(batch, 1, size, size) * 2 - 1).to(device)
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.named = [(n, p) for n, p in self.unet.named_parameters() if p.requires_grad]
        params = [p for _, p in self.named]
        self.plain_opt = make_optimizer(cfg, params)
        self.dp_opt = self._dp_optimizer(params)
        self.peers: dict[str, OpacusPeer] = {}
        self.errors: dict[str, str] = {}
        for mode in modes:
            if mode not in OPACUS_MODES:
                continue
            try:
                self.peers[mode] = OpacusPeer(self.unet, OPACUS_MODES[mode], self._dp_optimizer)
            except Exception as e:  # an unsupported layer: reported, not fatal
                self.errors[mode] = f"{type(e).__name__}: {e}"
        self.modes = tuple(m for m in modes if m not in self.errors)

    def _dp_optimizer(self, params: list[torch.nn.Parameter]) -> NoisingDPOptimizer:
        optimizer = NoisingDPOptimizer(
            make_optimizer(self.cfg, params),
            noise_multiplier=NOISE_MULTIPLIER,
            max_grad_norm=self.cfg.privacy.max_grad_norm,
            expected_batch_size=self.batch,
            loss_reduction="mean",
            randomness=SecretRandomness(),  # what training uses: the OS's CSPRNG, not a seed
        )
        accountant = RDPAccountant()
        optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=SAMPLE_RATE))
        return optimizer

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh (t [B,K], eps [B,K,C,H,W]) for the fixed batch."""
        t, eps = self.diffusion.draw(self.x0.cpu(), self.k, generator=self.gen)
        return t.to(self.device), eps.to(self.device)

    def plain_step(self) -> None:
        t, eps = self.draw()
        self.plain_opt.zero_grad(set_to_none=True)
        losses = self.diffusion.per_example_loss(self.denoiser, self.x0, t, eps)
        losses.mean().backward()
        self.plain_opt.step()
        self._sync()

    def dp_step(self) -> None:
        t, eps = self.draw()
        self.dp_opt.zero_grad(set_to_none=True)
        grads, _ = per_sample_gradients(self.unet, self.diffusion, self.x0, t, eps)
        for name, p in self.named:
            p.grad_sample = grads[name]
        self.dp_opt.pre_step()
        self.dp_opt.original_optimizer.step()
        self._sync()

    def opacus_step(self, mode: str) -> None:
        peer = self.peers[mode]
        t, eps = self.draw()
        peer.optimizer.zero_grad(set_to_none=True)  # also clears p.grad_sample
        peer.grad_samples(self.diffusion, self.x0, t, eps)
        peer.optimizer.pre_step()
        peer.optimizer.original_optimizer.step()
        self._sync()

    def step(self, mode: str) -> None:
        if mode == "plain":
            self.plain_step()
        elif mode == "dp":
            self.dp_step()
        else:
            self.opacus_step(mode)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def compare_grad_samples(
    reference: dict[str, torch.Tensor], candidate: dict[str, torch.Tensor | None]
) -> dict:
    """Per-parameter comparison of per-example gradients {name: [B, *shape]} with the exact ones.
    A parameter mismatches when its largest difference exceeds EXACT_RTOL times the larger of the
    two's largest magnitudes, or when the candidate has none or another shape."""
    mismatched: dict[str, dict] = {}
    worst = 0.0  # the largest relative difference among the parameters that match
    for name, ref in reference.items():
        got = candidate.get(name)
        if got is None or got.shape != ref.shape:
            mismatched[name] = {"problem": "missing" if got is None else f"shape {list(got.shape)}"}
            continue
        diff = (got - ref).abs().max().item()
        scale = max(ref.abs().max().item(), got.abs().max().item())
        if diff > EXACT_RTOL * scale:
            mismatched[name] = {
                "max_abs_diff": diff,
                "scale": scale,
                "opacus_all_zero": bool((got == 0).all()),
            }
        elif scale > 0:
            worst = max(worst, diff / scale)
    return {
        "compared_parameters": len(reference),
        "mismatched_parameters": len(mismatched),
        "names": sorted(mismatched),
        "details": mismatched,
        "rtol": EXACT_RTOL,
        "max_relative_diff_of_matching": worst,
    }


def check_exact(bench: Bench) -> dict[str, dict]:
    """{Opacus mode: compare_grad_samples(...) or {"error": ...}} on one (t, eps) draw of the batch,
    each Opacus copy holding the UNet's weights. A mode whose step raises is left out of timing."""
    report: dict[str, dict] = {mode: {"error": err} for mode, err in bench.errors.items()}
    if not bench.peers:
        return report
    t, eps = bench.draw()
    reference, _ = per_sample_gradients(bench.unet, bench.diffusion, bench.x0, t, eps)
    for mode, peer in list(bench.peers.items()):
        peer.unet.load_state_dict(bench.unet.state_dict())
        peer.optimizer.zero_grad(set_to_none=True)
        try:
            peer.grad_samples(bench.diffusion, bench.x0, t, eps)
        except Exception as e:  # an unsupported layer surfaces in the first backward pass
            report[mode] = {"error": f"{type(e).__name__}: {e}"}
            del bench.peers[mode]
            bench.modes = tuple(m for m in bench.modes if m != mode)
            continue
        got = {name: p.grad_sample for name, p in peer.named}  # type: ignore[attr-defined]
        report[mode] = compare_grad_samples({n: g.detach() for n, g in reference.items()}, got)
        peer.optimizer.zero_grad(set_to_none=True)
    return report


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_presets() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def config_for(
    model: str, batch: int, image_size: int | None = None, noise_multiplicity: int | None = None
) -> ExperimentConfig:
    overrides = [f"model={model}", f"training.batch_size={batch}"]
    if image_size is not None:
        overrides.append(f"data.image_size={image_size}")
    if noise_multiplicity is not None:
        overrides.append(f"training.noise_multiplicity={noise_multiplicity}")
    return load_config(overrides)


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
