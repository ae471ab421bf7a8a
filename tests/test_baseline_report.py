"""Reports say what a run started from, and call an attack on a model that learned nothing beyond
its start uninformative instead of reassuring."""

from fedgen.evaluation.baseline import learned_beyond_start, start_label, starting_point


def test_a_run_no_better_than_its_base_is_flagged():
    row = {"frechet_distance": 9.8, "frechet_distance_untrained": 10.0, "start_model": "base"}
    assert learned_beyond_start(row) is False
    assert start_label(row) == "the public base it started from"
    assert learned_beyond_start({**row, "frechet_distance": 5.0}) is True
    # Without the utility evaluation, the validation loss decides.
    assert learned_beyond_start({"val_loss": 0.99, "val_loss_untrained": 1.0}) is False
    assert learned_beyond_start({"val_loss": 0.5, "val_loss_untrained": 1.0}) is True
    assert learned_beyond_start({}) is None


def test_the_starting_point_names_the_base_and_what_the_guarantee_covers():
    base = {"init": "pretrained", "path": "/runs/pretrained/ab/pipeline", "weights_sha256": "f" * 64,
            "pretrain": {"archive": {"images": 1600, "patients": 1600, "source": "synthetic", "num_sources": 8},
                         "steps": 300}}
    text = starting_point(base)
    assert "1600 images" in text and "/runs/pretrained/ab/pipeline" in text and "ffffffffffffffff" in text
    assert "fine-tuning data only" in text
    assert "Random weights" in starting_point({"init": "random", "weights_sha256": "0" * 64})
    assert "Not recorded" in starting_point({})
