"""The `fedgen` command. Heavy imports (torch, diffusers, flwr) happen inside the commands, so
`fedgen --help` answers at once."""

from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  fedgen simulate                                   # the default: 3 hospitals, epsilon 8
  fedgen simulate privacy=eps1 federation.num_hospitals=5 name=eps1-5h
  fedgen simulate privacy=none federation.num_rounds=10 name=nodp
  fedgen pretrain                                   # the public base the demo fine-tunes (cached)
  fedgen select experiment=tradeoff                 # private selection: reweight the base, train nothing
  fedgen attack runs/default                        # how much does the released model leak?
  fedgen audit-dp runs/default                      # does fedgen's DP-SGD privatise as claimed?
  fedgen simulate experiment=invert_easy            # the coordinator keeps every update ...
  fedgen invert runs/invert-easy                    # ... and turns one back into images
  fedgen sweep                                      # no DP, epsilon 10, 4, 1 side by side
  fedgen sweep sweep.privacy=[none,eps8] federation.num_rounds=10 sweep.name=r10
  fedgen report runs/budgets                        # rewrite a run's or a sweep's report.md
  fedgen budget runs                                # each hospital's spend per run and lifetime
  fedgen xrays --out xrays.png                      # look at the synthetic X-rays
Overrides are Hydra's (group=option, key.path=value); see conf/ for every setting."""


def _simulate(args: argparse.Namespace) -> int:
    from fedgen.config import load_config
    from fedgen.running.preflight import check_writable
    from fedgen.running.simulate import simulate

    check_writable(load_config(args.overrides).runs_dir, "runs_dir")
    simulate(args.overrides, argv=["fedgen", "simulate", *args.overrides])
    return 0


def _select(args: argparse.Namespace) -> int:
    from fedgen.config import load_config
    from fedgen.running.preflight import check_writable
    from fedgen.running.select import select

    check_writable(load_config(args.overrides).runs_dir, "runs_dir")
    select(args.overrides, argv=["fedgen", "select", *args.overrides])
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from fedgen.config import load_config
    from fedgen.running.preflight import check_writable
    from fedgen.running.pretrain import pretrain

    cfg = load_config(args.overrides)
    check_writable(cfg.runs_dir, "runs_dir")
    pretrain(cfg, cfg.runs_dir)
    return 0


def _attack(args: argparse.Namespace) -> int:
    import dataclasses

    from attacks.audit import AuditSettings, audit_run, check_attacks
    from fedgen.running.preflight import check_count, check_writable

    check_count(args.per_hospital, "--per-hospital", 1)
    check_count(args.samples, "--samples", 0)
    check_count(args.batch_size, "--batch-size", 1)
    check_writable(args.run_dir, "run_dir")  # attack.json, roc.png and TensorBoard events go there
    check_count(args.fresh_nonmembers, "--fresh-nonmembers", 0)
    settings = AuditSettings(per_hospital=args.per_hospital, batch_size=args.batch_size,
                             fresh_nonmembers=args.fresh_nonmembers)
    if args.attacks:
        settings = dataclasses.replace(settings, attacks=tuple(args.attacks.split(",")))
        check_attacks(settings.attacks, "--attacks")
    check_count(args.references, "--references", 2)  # RMIA tunes its a on the references: k >= 2
    if "tuned" in settings.attacks:  # it fits its lines on the references other than the one it tests
        check_count(args.references, "--references (with tuned)", 3)
    reference = dataclasses.replace(settings.reference, k=args.references, statistic=args.reference_statistic,
                                    population=args.population, cache_dir=args.reference_cache)
    settings = dataclasses.replace(settings, reference=reference)
    settings = dataclasses.replace(
        settings, extraction=dataclasses.replace(settings.extraction, num_samples=args.samples)
    )
    audit_run(args.run_dir, settings)
    return 0


def _audit_dp(args: argparse.Namespace) -> int:
    from fedgen.running.dp_audit import DpAuditSettings, audit_run_dp
    from fedgen.running.preflight import check_count, check_writable

    check_count(args.canaries, "--canaries", 2)
    check_count(args.images, "--images", 1)
    check_count(args.hospital, "--hospital", 0)
    check_writable(args.run_dir, "run_dir")  # dp_audit.json goes there
    given = {"hospital": args.hospital, "canaries": args.canaries, "images": args.images}
    settings = DpAuditSettings(**{k: v for k, v in given.items() if v is not None})
    audit_run_dp(args.run_dir, settings)
    return 0


def _invert(args: argparse.Namespace) -> int:
    import dataclasses

    from attacks.inversion import InversionSettings
    from fedgen.running.invert import invert_run
    from fedgen.running.preflight import check_count, check_writable

    check_count(args.round, "--round", 1)
    check_count(args.hospital, "--hospital", 0)
    check_count(args.images, "--images", 1)
    check_count(args.iterations, "--iterations", 1)
    check_count(args.restarts, "--restarts", 1)
    check_writable(args.run_dir, "run_dir")  # invert/, TensorBoard events go there
    given = {"images": args.images, "iterations": args.iterations, "restarts": args.restarts}
    settings = dataclasses.replace(InversionSettings(), **{k: v for k, v in given.items() if v is not None})
    invert_run(args.run_dir, args.round, args.hospital, settings)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from fedgen.running.sweep import main

    return main(args.overrides, print_only=args.print_only)


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedgen.config import ConfigError
    from fedgen.running.preflight import check_writable

    folder = Path(args.path)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such directory (a run or a sweep)")
    check_writable(folder, "path")
    if (folder / "sweep.json").exists():
        from fedgen.running.sweep import refresh

        path = refresh(folder)
    elif (folder / "selection.json").exists():  # `fedgen select`'s run
        from fedgen.evaluation.selection_report import write_selection_report

        path = write_selection_report(folder)
    elif (folder / "config.yaml").exists():
        from fedgen.evaluation.report import write_run_report

        path = write_run_report(folder)
    else:
        raise ConfigError(f"{folder}: neither a run (config.yaml) nor a sweep (sweep.json)")
    print(f"wrote {path}")
    return 0


def _budget(args: argparse.Namespace) -> int:
    from fedgen.running.budget import main as budget_main

    return budget_main(args.path, args.budget)


def _xrays(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedgen.config import SYNTHETIC_MIN_SIZE
    from fedgen.running.preflight import check_count, check_writable

    check_count(args.size, "--size", SYNTHETIC_MIN_SIZE)
    check_count(args.sources, "--sources", 1)
    check_count(args.patients, "--patients", args.sources)  # one row per source, each with patients
    check_writable(Path(args.out).parent, "--out")
    from fedgen.data.images import save_grid
    from fedgen.data.synthetic import generate_xrays

    data = generate_xrays(
        num_patients=args.patients,
        images_per_patient=1,
        image_size=args.size,
        num_sources=args.sources,
        finding_rate=0.3,
        seed=args.seed,
    )
    # One row per source (hospital), so acquisition differences show.
    order = sorted(range(len(data)), key=lambda i: (data.sources[i], i))
    path = save_grid(
        data.images[order],
        args.out,
        nrow=args.patients // args.sources,
        upscale=max(1, 128 // args.size),
    )
    findings = int((data.labels == 1).sum())
    print(
        f"wrote {path}: {len(data)} synthetic X-rays at {args.size}x{args.size}, one row per hospital "
        f"({findings} with a nodule)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedgen",
        description="Federated, differentially private diffusion models for medical images.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    sim = commands.add_parser(
        "simulate", help="train a federation of simulated hospitals (Flower simulation)"
    )
    sim.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. privacy=eps1 federation.num_rounds=3"
    )
    sim.set_defaults(run=_simulate)
    sel = commands.add_parser(
        "select", help="private selection: the hospitals' noisy votes reweight the public base's samples (one Flower round)"
    )
    sel.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=tradeoff privacy=eps1")
    sel.set_defaults(run=_select)
    pre = commands.add_parser(
        "pretrain", help="train the public base model (model.init=pretrained) once; cached by its config"
    )
    pre.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. pretrain.epochs=10 data.image_size=16")
    pre.set_defaults(run=_pretrain)
    from fedgen.running.deploy_commands import add_deploy_commands

    add_deploy_commands(commands)  # fedgen deploy certs|superlink|register|supernode|run|demo
    att = commands.add_parser(
        "attack", help="measure how much a run's released model leaks (attack.json, TensorBoard)"
    )
    att.add_argument("run_dir", help="a run directory, e.g. runs/default")
    att.add_argument(
        "--attacks", help="comma-separated subset of: loss,pia,pian,secmi,sima,lira,rmia,tuned (default: all but "
        "lira,rmia,tuned, which first train --references reference models)"
    )
    att.add_argument("--references", type=int, default=4, help="lira/rmia/tuned: reference models to train (k >= 2)")
    att.add_argument("--reference-statistic", default="sima", help="lira/rmia: the per-image statistic they calibrate")
    att.add_argument("--reference-cache", default=None,
                     help="lira/rmia: where trained reference models are kept, by fingerprint (default: "
                          "<run>/reference_models; runs with the same recipe, base and population can share one)")
    att.add_argument("--population", default="public", help="lira/rmia: the references' data: public (public-archive "
                     "patients), hospitals (synthetic patients on the hospitals' scanners) or an image folder")
    att.add_argument(
        "--per-hospital", type=int, default=None, help="members (and non-members) per hospital"
    )
    att.add_argument(
        "--samples", type=int, default=256, help="generated images for extraction (0: skip)"
    )
    att.add_argument("--fresh-nonmembers", type=int, default=0,
                     help="synthetic federations: this many more non-members, new patients of the hospitals' "
                          "scanners (TPR at 1%% FPR needs ~1000 non-members to mean something)")
    att.add_argument("--batch-size", type=int, default=64)
    att.set_defaults(run=_attack)
    adp = commands.add_parser(
        "audit-dp",
        help="white-box audit of a run's DP-SGD with gradient canaries (dp_audit.json; fails when broken)",
    )
    adp.add_argument("run_dir", help="a run directory, e.g. runs/default")
    adp.add_argument("--hospital", type=int, help="whose DP-SGD recipe to audit (default 0)")
    adp.add_argument("--canaries", type=int, help="gradient canaries m (default 8000; more: tighter, slower)")
    adp.add_argument("--images", type=int, help="synthetic X-rays trained on with the canaries (default 64)")
    adp.set_defaults(run=_audit_dp)
    inv = commands.add_parser(
        "invert",
        help="the curious coordinator: invert a recorded hospital update into images (needs federation.record_updates=true)",
    )
    inv.add_argument("run_dir", help="a run trained with federation.record_updates=true, e.g. runs/invert-easy")
    inv.add_argument("--round", type=int, help="which round's update (default: the first recorded)")
    inv.add_argument("--hospital", type=int, help="whose update (default 0; under secure aggregation: the aggregate)")
    inv.add_argument("--images", type=int, help="candidate images (default: the hospital's expected batch size)")
    inv.add_argument("--iterations", type=int, help="iterations for the best start; one SGD step: L-BFGS iterations per start (default 300)")
    inv.add_argument("--restarts", type=int, help="short starts from spread timesteps before the best one runs on; one SGD step: starts at most, "
                          "stopping at the first that reproduces the update (default 8)")
    inv.set_defaults(run=_invert)
    sw = commands.add_parser(
        "sweep",
        help="train, attack and measure one federation per privacy setting, and compare them",
    )
    sw.add_argument(
        "overrides",
        nargs="*",
        help="sweep.* overrides change the sweep (conf/sweep.yaml); all others apply to every run",
    )
    sw.add_argument(
        "--print-only",
        action="store_true",
        help="print each run's fedgen simulate command and stop",
    )
    sw.set_defaults(run=_sweep)
    rep = commands.add_parser(
        "report", help="write the privacy report (report.md) of a run or a sweep"
    )
    rep.add_argument(
        "path", help="a run directory (runs/default) or a sweep directory (runs/budgets)"
    )
    rep.set_defaults(run=_report)
    bud = commands.add_parser("budget", help="each hospital site's privacy spend per run and over its lifetime")
    bud.add_argument("path", help="a runs dir (runs), a site dir (runs/sites/<fingerprint>) or a deployed data-dir")
    bud.add_argument("--budget", type=float, help="lifetime budget to compare with (default: the latest run's)")
    bud.set_defaults(run=_budget)
    xr = commands.add_parser("xrays", help="write a PNG grid of synthetic chest X-rays")
    xr.add_argument("--out", default="xrays.png")
    xr.add_argument("--size", type=int, default=64)
    xr.add_argument("--patients", type=int, default=24)
    xr.add_argument("--sources", type=int, default=3)
    xr.add_argument("--seed", type=int, default=0)
    xr.set_defaults(run=_xrays)
    args = parser.parse_args(argv)

    from fedgen.config import ConfigError

    try:
        return args.run(args)
    except ConfigError as err:
        return _error(str(err), 2)
    except KeyboardInterrupt:
        return 130
    except OSError as err:  # a file that cannot be read or written: the message names it
        return _error(str(err), 1)
    except Exception as err:
        # Matched by name: importing fedgen.data.dataset here would load torch into every
        # command, `fedgen simulate`'s launcher included (fedgen.running.apart says why not).
        if type(err).__name__ == "DataError":
            return _error(str(err), 2)
        if type(err).__module__.startswith(("hydra", "omegaconf")):  # e.g. a damaged config.yaml
            return _error(str(err).splitlines()[0], 2)
        if type(err).__name__ in ("SimulationError", "AuditAlarm", "DpAuditAlarm", "LifetimeBudgetError", "LedgerError"):  # a run's summary: a line per lost hospital
            return _error(str(err), 1, lines=True)
        raise


def _error(message: str, code: int, lines: bool = False) -> int:
    """One line on stderr (with `lines`, one per line of the message), each at most a few hundred characters."""
    parts = [" ".join(part.split()) for part in message.splitlines()] if lines else [" ".join(message.split())]
    for i, line in enumerate(p for p in parts if p):
        cut = f"{line[:600]}{' ...' if len(line) > 600 else ''}"
        print(f"fedgen: error: {cut}" if i == 0 else f"  {cut}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
