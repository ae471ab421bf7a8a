"""The `fedgen` command. Heavy imports (torch, diffusers, flwr) happen inside the commands, so
`fedgen --help` answers at once."""

from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  fedgen simulate                                   # the default: 3 hospitals, epsilon 8
  fedgen simulate privacy=eps1 federation.num_hospitals=5 name=eps1-5h
  fedgen simulate privacy=none federation.num_rounds=10 name=nodp
  fedgen xrays --out xrays.png                      # look at the synthetic X-rays
Overrides are Hydra's (group=option, key.path=value); see conf/ for every setting."""


def _simulate(args: argparse.Namespace) -> int:
    from fedgen.simulate import simulate

    simulate(args.overrides, argv=["fedgen", "simulate", *args.overrides])
    return 0


def _xrays(args: argparse.Namespace) -> int:
    from fedgen.images import save_grid
    from fedgen.synthetic import generate_xrays

    data = generate_xrays(
        num_patients=args.patients, images_per_patient=1, image_size=args.size,
        num_sources=args.sources, finding_rate=0.3, seed=args.seed,
    )
    # One row per source (hospital), so acquisition differences show.
    order = sorted(range(len(data)), key=lambda i: (data.sources[i], i))
    path = save_grid(data.images[order], args.out, nrow=args.patients // args.sources, upscale=max(1, 128 // args.size))
    findings = int((data.labels == 1).sum())
    print(f"wrote {path}: {len(data)} synthetic X-rays at {args.size}x{args.size}, one row per hospital "
          f"({findings} with a nodule)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedgen",
        description="Federated, differentially private diffusion models for medical images.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    sim = commands.add_parser("simulate", help="train a federation of simulated hospitals (Flower simulation)")
    sim.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. privacy=eps1 federation.num_rounds=3")
    sim.set_defaults(run=_simulate)
    xr = commands.add_parser("xrays", help="write a PNG grid of synthetic chest X-rays")
    xr.add_argument("--out", default="xrays.png")
    xr.add_argument("--size", type=int, default=64)
    xr.add_argument("--patients", type=int, default=24)
    xr.add_argument("--sources", type=int, default=3)
    xr.add_argument("--seed", type=int, default=0)
    xr.set_defaults(run=_xrays)
    args = parser.parse_args(argv)

    from fedgen.config import ConfigError
    from fedgen.dataset import DataError

    try:
        return args.run(args)
    except (ConfigError, DataError) as err:
        print(f"fedgen: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # Hydra's composition errors name the bad override
        if type(err).__module__.startswith(("hydra", "omegaconf")):
            cause = f" ({err.__cause__})" if err.__cause__ else ""
            print(f"fedgen: error: {err}{cause}", file=sys.stderr)
            return 2
        if type(err).__name__ == "SimulationError":
            print(f"fedgen: error: {err}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
