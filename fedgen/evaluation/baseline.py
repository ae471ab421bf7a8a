"""The model a run started from, as the reports tell it: where its weights came from (base.json)
and whether the federation measurably improved on it. An attack at chance on a model that learned
nothing beyond its start proves nothing, so the reports say when that is the case."""

from __future__ import annotations

from fedgen.evaluation.markdown import fmt


def starting_point(base: dict) -> str:
    """Where round 0's weights came from (base.json), and what the guarantee does not cover."""
    head = "## What it started from"
    if not base:
        return f"{head}\n\nNot recorded (a run from before fedgen recorded its starting weights)."
    sha = f"sha256 `{str(base.get('weights_sha256', ''))[:16]}...`"
    if base.get("init") in (None, "random"):
        return f"{head}\n\nRandom weights drawn from the config's seed ({sha}): a model trained from scratch."
    text = f"The weights of `{base.get('path')}` ({sha})"
    pre = base.get("pretrain")
    if pre:
        archive = pre.get("archive", {})
        text = (
            f"fedgen's public base: trained without DP on {fmt(archive.get('images'))} images of "
            f"{fmt(archive.get('patients'))} patients from a public archive ({archive.get('source')}, "
            f"{fmt(archive.get('num_sources'))} scanners; none of them a hospital's patient or scanner), "
            f"{fmt(pre.get('steps'))} steps, saved at `{base.get('path')}` ({sha})"
        )
    return (
        f"{head}\n\n{text}. The hospitals fine-tuned it. The privacy guarantee below covers the "
        "hospitals' fine-tuning data only: the base was trained on public images, which it may reveal."
    )


def learned_beyond_start(row: dict) -> bool | None:
    """Did the federation measurably improve on the model it started from? By the Frechet
    distance when the utility evaluation ran (10% better), else by the validation loss (5%)."""
    fd, fd0 = row.get("frechet_distance"), row.get("frechet_distance_untrained")
    if fd is not None and fd0 is not None:
        return fd < 0.9 * fd0
    loss, loss0 = row.get("val_loss"), row.get("val_loss_untrained")
    if loss is not None and loss0 is not None:
        return loss < 0.95 * loss0
    return None


def start_label(row: dict) -> str:
    return "the public base it started from" if row.get("start_model") == "base" else "the untrained model"
