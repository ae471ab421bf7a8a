"""Runs side by side: one row of numbers per run, its HParams session in TensorBoard, and the
privacy/utility trade-off figure of a sweep.

`run_row` reads what a run's files say: the resolved config (what was trained, with what
guarantee), `metrics.json` (achieved epsilon, noise), `utility.json` and `attack.json`. A file
that is missing leaves its fields None; so does a number that does not apply (no epsilon without DP).

HParams. TensorBoard's hparams plugin keeps only the *first* session record of a run directory
(its event reader stores a tag's metadata once), so a second `add_hparams` into the same `tb/` is
silently ignored; and it takes the dashboard's columns from the first experiment record it finds
in any run. `write_hparams` therefore removes the HParams-only event file that training wrote at
its end (its numbers are also in metrics.json) and writes one session whose experiment record
declares every hparam and metric below, the same in every run: one row per run, all columns.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedgen.evaluation.markdown import sweep_table  # noqa: E402
from fedgen.privacy.randomness import dp_noise_label  # noqa: E402
from fedgen.run_dir import RunDir, read_json  # noqa: E402

# Every HParams session declares these (value: an example of the type); absent values stay blank.
HPARAMS = {
    "setting": "",
    "privacy": "",
    "target_epsilon": 0.0,
    "achieved_epsilon": 0.0,
    "delta": 0.0,
    "accountant": "",
    "dp_noise": "",
    "noise_multiplier": 0.0,
    "noise_multiplicity": 0,
    "max_grad_norm": 0.0,
    "rounds": 0,
    "hospitals": 0,
    "local_epochs": 0,
    "batch_size": 0,
    "strategy": "",
    "model": "",
}
# Row field -> HParams metric tag.
METRICS = {
    "epsilon": "hparam/epsilon",
    "val_loss": "hparam/val_loss",
    "frechet_distance": "hparam/frechet_distance",
    "precision": "hparam/precision",
    "recall": "hparam/recall",
    "downstream_auc": "hparam/downstream_auc",
    "attack_auc": "hparam/attack_auc",
    "tpr_at_1pct_fpr": "hparam/tpr_at_1pct_fpr",
    "epsilon_lb": "hparam/epsilon_lb",
    "extraction_flagged": "hparam/extraction_flagged",
}
HPARAMS_TAGS = (
    "_hparams_/experiment",
    "_hparams_/session_start_info",
    "_hparams_/session_end_info",
)


def number(value) -> float | None:
    """A finite float, or None (missing, null, "nan", "inf": JSON files spell those as strings)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def run_row(run_dir: str | Path) -> dict:
    """One flat record of a run's setting, guarantee, utility and leakage (None where unknown)."""
    run = RunDir(run_dir)
    cfg = run.experiment_config()
    p, f, t = cfg.privacy, cfg.federation, cfg.training
    metrics = run.read_metrics()
    summary = metrics.get("summary", {})
    ledgers = metrics.get("ledgers", {}).values()
    utility = read_json(run.root / "utility.json")
    attack = read_json(run.root / "attack.json")
    row = {
        "setting": run.root.name,
        "training": metrics.get("status", "not started"),
        "privacy": "dp" if p.enabled else "none",
        "target_epsilon": p.target_epsilon if p.enabled else None,
        "epsilon": number(summary.get("epsilon_max")) if p.enabled else None,
        "delta": p.delta if p.enabled else None,
        "accountant": p.accountant if p.enabled else None,
        "dp_noise": dp_noise_label(summary, p.reproducible_noise) if p.enabled else None,
        "noise_multiplier": number(summary.get("noise_multiplier")) if p.enabled else 0.0,
        "sample_rate": max((number(v.get("sample_rate")) or 0.0 for v in ledgers), default=None),
        "max_grad_norm": p.max_grad_norm if p.enabled else None,
        "noise_multiplicity": t.noise_multiplicity,
        "rounds": f.num_rounds,
        "rounds_completed": summary.get("rounds_completed"),
        "hospitals": f.num_hospitals,
        "local_epochs": f.local_epochs,
        "batch_size": t.batch_size,
        "strategy": f.strategy,
        "model": cfg.model.name,
        # The utility evaluation's loss when there is one (fixed protocol, the same for every run).
        "val_loss": number(utility.get("val_loss", summary.get("val_loss"))),
        "frechet_distance": number(utility.get("frechet_distance")),
        "frechet_distance_real": number(utility.get("frechet_distance_real")),
        "val_loss_untrained": number(utility.get("val_loss_untrained")),
        "frechet_distance_untrained": number(utility.get("frechet_distance_untrained")),
        "precision_untrained": number(utility.get("precision_untrained")),
        "start_model": utility.get("start_model", "base" if cfg.model.init else "untrained"),
        "precision": number(utility.get("precision")),
        "precision_real": number(utility.get("precision_real")),
        "recall": number(utility.get("recall")),
        "recall_real": number(utility.get("recall_real")),
        # How far the samples' mix of hospital styles is from the real one (0: the same).
        "style_mix_gap": number((utility.get("style_mix") or {}).get("gap")),
        "downstream_auc": number((utility.get("downstream") or {}).get("auc")),
        "downstream_baseline_auc": number((utility.get("downstream") or {}).get("baseline_auc")),
    }
    row.update(_attack_fields(attack))
    return row


def _attack_fields(attack: dict) -> dict:
    """The strongest attack's AUC, and the largest TPR@1%FPR and epsilon lower bound of any attack."""
    results = attack.get("attacks", {})
    if not results:
        keys = (
            "best_attack",
            "attack_auc",
            "tpr_at_1pct_fpr",
            "epsilon_lb",
            "extraction_flagged",
            "extraction_samples",
            "alarms",
        )
        return dict.fromkeys(keys)
    best = attack["best_attack"]
    extraction = attack.get("extraction", {})
    return {
        "best_attack": best,
        "attack_auc": number(results[best]["auc"]),
        "tpr_at_1pct_fpr": max(number(r["tpr_at_1pct_fpr"]) or 0.0 for r in results.values()),
        "epsilon_lb": max(number(r["epsilon_lb_clopper_pearson"]) or 0.0 for r in results.values()),
        "extraction_flagged": extraction.get("num_flagged"),
        "extraction_samples": extraction.get("num_samples"),
        "alarms": list(attack.get("alarms", [])),
    }


# --- HParams -------------------------------------------------------------------------------------
def session_hparams(row: dict) -> dict:
    values = {k: row.get(k) for k in HPARAMS} | {"achieved_epsilon": row.get("epsilon")}
    return {k: v for k, v in values.items() if v is not None}


def _is_hparams_only(path: Path) -> bool:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    tags = {v.tag for event in EventFileLoader(str(path)).Load() for v in event.summary.value}
    return bool(tags & set(HPARAMS_TAGS)) and all(
        t in HPARAMS_TAGS or t.startswith("hparam/") for t in tags
    )


def write_hparams(run_dir: str | Path, row: dict) -> None:
    """Replace the run's HParams session with one holding the sweep's hparams and metrics."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    logdir = RunDir(run_dir).tensorboard
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        if _is_hparams_only(path):
            path.unlink()
    experiment, _, end = hparams(HPARAMS, dict.fromkeys(METRICS.values(), 0.0))
    _, start, _ = hparams(session_hparams(row), {})
    step = int(row.get("rounds") or 0)
    with warnings.catch_warnings(), SummaryWriter(log_dir=str(logdir)) as writer:
        warnings.simplefilter("ignore")
        writer.file_writer.add_summary(experiment, step)
        writer.file_writer.add_summary(start, step)
        for field, tag in METRICS.items():
            value = number(row.get(field))
            if value is not None:
                writer.add_scalar(tag, value, step)
        writer.file_writer.add_summary(end, step)


def hparams_sessions(logdir: str | Path) -> dict[str, dict]:
    """What TensorBoard's HParams dashboard shows for `logdir`, read through the plugin's own code:
    {session (run path): {"hparams": {name: value}, "metrics": {tag: value}}}."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    tb = base_plugin.TBContext(logdir=str(logdir), multiplexer=multiplexer, data_provider=provider)
    request = api_pb2.ListSessionGroupsRequest(
        start_index=0, slice_size=10_000, allowed_statuses=list(api_pb2.Status.values())
    )
    response = list_session_groups.Handler(
        context.RequestContext(), backend_context.Context(tb), "", request
    ).run()
    sessions = {}
    for group in response.session_groups:
        for session in group.sessions:
            sessions[session.name] = {
                "hparams": {k: _proto_value(v) for k, v in group.hparams.items()},
                "metrics": {m.name.tag: m.value for m in session.metric_values},
            }
    return sessions


def _proto_value(value):
    kind = value.WhichOneof("kind")
    return {
        "number_value": value.number_value,
        "string_value": value.string_value,
        "bool_value": value.bool_value,
    }.get(kind)


# --- the trade-off figure ------------------------------------------------------------------------
def tradeoff_points(rows: list[dict]) -> list[dict]:
    """The plotted points: runs with an epsilon (or no DP) and a utility or attack number, by epsilon.
    `x` is the achieved epsilon; runs without DP have x None and sit at the right edge."""
    utility = (
        "frechet_distance"
        if any(r.get("frechet_distance") is not None for r in rows)
        else "val_loss"
    )
    points = []
    for r in rows:
        dp = r.get("privacy") == "dp"
        if (dp and r.get("epsilon") is None) or (
            r.get(utility) is None and r.get("attack_auc") is None
        ):
            continue
        points.append(
            {
                "setting": r["setting"],
                "x": r["epsilon"] if dp else None,
                "utility": r.get(utility),
                "utility_metric": utility,
                "attack_auc": r.get("attack_auc"),
            }
        )
    return sorted(points, key=lambda p: math.inf if p["x"] is None else p["x"])


def shared_value(rows: list[dict], key: str) -> float | None:
    """A reference value the runs of a sweep share (e.g. the real images' Frechet distance)."""
    return next((r[key] for r in rows if r.get(key) is not None), None)


def tradeoff_figure(rows: list[dict], title: str = "privacy budget trade-off"):
    """Achieved epsilon (log x; no DP at the right edge) against utility (left y) and the strongest
    membership attack's AUC (right y). Returns (figure, points)."""
    points = tradeoff_points(rows)
    finite = [p["x"] for p in points if p["x"] is not None]
    no_dp_x = max(finite, default=1.0) * 4
    xs = [p["x"] if p["x"] is not None else no_dp_x for p in points]
    fig, left = plt.subplots(figsize=(7, 4.5))
    right = left.twinx()
    metric = points[0]["utility_metric"] if points else "val_loss"
    label = {
        "frechet_distance": "Frechet distance (lower = better)",
        "val_loss": "validation loss (lower = better)",
    }[metric]
    _plot(left, xs, points, "utility", "o-", "tab:blue", label)
    a = [p["attack_auc"] for p in points if p["attack_auc"] is not None]
    floor = shared_value(rows, "frechet_distance_real")
    if metric == "frechet_distance" and floor is not None:
        left.axhline(floor, color="tab:blue", ls=":", lw=1, label="real training images (floor)")
    untrained = shared_value(rows, f"{metric}_untrained")
    if untrained is not None:
        left.axhline(untrained, color="tab:gray", ls="--", lw=1, label="untrained model (nothing learned)")
    _plot(right, xs, points, "attack_auc", "s--", "tab:red", "best attack AUC")
    if finite and len(finite) < len(points):  # no DP sits apart: epsilon is not a number there
        left.axvline(math.sqrt(max(finite) * no_dp_x), color="gray", ls=":", lw=0.8)
    right.axhline(0.5, color="tab:red", ls=":", lw=1, label="chance (AUC 0.5)")
    for x, p in zip(xs, points):
        left.annotate(
            p["setting"],
            (x, 0),
            xycoords=("data", "axes fraction"),
            xytext=(0, 4),
            textcoords="offset points",
            ha="center",
            fontsize=8,
        )
    left.set_xscale("log")
    left.set_xticks(xs, [f"{x:.3g}" if p["x"] is not None else "no DP" for x, p in zip(xs, points)])
    left.minorticks_off()
    left.set(xlabel="achieved epsilon (largest over hospitals)", ylabel=label, title=title)
    left.yaxis.label.set_color("tab:blue")
    right.set_ylabel("best membership attack AUC", color="tab:red")
    right.set_ylim(min([0.45, *a]) - 0.02, max([0.6, *a]) + 0.02)
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    fig.legend(handles=handles, fontsize=7, loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return fig, points


def _plot(
    ax, xs: list[float], points: list[dict], key: str, style: str, color: str, label: str
) -> None:
    """DP runs joined by a line; runs without DP as lone markers."""
    dp = [(x, p[key]) for x, p in zip(xs, points) if p[key] is not None and p["x"] is not None]
    no_dp = [(x, p[key]) for x, p in zip(xs, points) if p[key] is not None and p["x"] is None]
    if dp:
        ax.plot(*zip(*dp), style, color=color, label=label)
    if no_dp:
        ax.plot(*zip(*no_dp), style[0], color=color, label=None if dp else label)


def write_tradeoff(sweep_dir: str | Path, rows: list[dict], title: str) -> Path:
    """`<sweep>/tradeoff.png` (its plotted numbers in the PNG's Description text) and the same
    figure, plus the sweep's table as text, in `<sweep>/tb`."""
    from torch.utils.tensorboard import SummaryWriter

    sweep_dir = Path(sweep_dir)
    fig, points = tradeoff_figure(rows, title)
    path = sweep_dir / "tradeoff.png"
    fig.savefig(path, dpi=120, metadata={"Title": title, "Description": json.dumps(points)})
    logdir = sweep_dir / "tb"
    for old in logdir.glob("events.out.tfevents.*"):  # this folder holds only the latest figure
        old.unlink()
    with warnings.catch_warnings(), SummaryWriter(log_dir=str(logdir)) as writer:
        warnings.simplefilter("ignore")
        writer.add_figure("sweep/tradeoff", fig, 0)  # closes the figure
        writer.add_text("sweep/table", sweep_table(rows, links=False), 0)
    return path
