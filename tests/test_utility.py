"""evaluate_utility on a tiny run directory built without Flower: an untrained released model
(noise) against the run's real images, and a stand-in generator that returns real images."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedgen.base_model import initial_unet
from fedgen.config import load_config
from fedgen.data.dataset import ImageSet
from fedgen.data.silos import build_silos
from fedgen.evaluation import utility
from fedgen.evaluation.utility import evaluate_utility
from fedgen.model import build_scheduler
from fedgen.run_dir import RunDir, write_json

FINAL_ROUND = 3
TINY = [
    "model.init=null",
    "data.num_patients=120",
    "data.images_per_patient=1",
    "data.image_size=16",
    "data.finding_rate=0.5",
    "federation.num_hospitals=2",
    f"federation.num_rounds={FINAL_ROUND}",
    "federation.sampling_steps=2",
    "training.batch_size=16",  # the silos hold ~40 training images
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_run(root: Path, overrides: list[str]) -> RunDir:
    """A run directory as fedgen writes one (config, records, metrics, released pipeline), with
    the untrained UNet the run would have started from as the released model."""
    cfg = load_config(overrides)
    run = RunDir(root)
    run.root.mkdir(parents=True)
    run.config.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    for silo in build_silos(cfg):
        run.hospital_home(silo.hospital).mkdir(parents=True)
        (run.hospital_home(silo.hospital) / "records.json").write_text(json.dumps(silo.records()))
    unet = initial_unet(cfg, run.root.parent)
    DDPMPipeline(unet=unet, scheduler=build_scheduler(cfg.model)).save_pretrained(str(run.pipeline))
    history = [{"round": r, "val_loss": 1.0 / r} for r in range(1, FINAL_ROUND + 1)]
    summary = {"val_loss": history[-1]["val_loss"], "rounds_completed": FINAL_ROUND}
    write_json(run.metrics, {"status": "completed", "summary": summary, "history": history})
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> RunDir:
    return make_run(tmp_path_factory.mktemp("runs") / "tiny", TINY)


@pytest.fixture(scope="module")
def noise_result(run) -> dict:
    torch.set_num_threads(1)
    return evaluate_utility(
        run.root, num_samples=48, batch_size=16, progress=False, log=lambda _: None
    )


def test_untrained_model_is_far_from_the_real_floor(run, noise_result):
    r = json.loads((run.root / "utility.json").read_text())
    assert r == json.loads(json.dumps(noise_result))
    for key in ("val_loss", "frechet_distance", "precision", "recall", "frechet_distance_real"):
        assert math.isfinite(r[key]), key
    assert r["val_loss"] == pytest.approx(1.0 / FINAL_ROUND)
    assert r["round"] == FINAL_ROUND
    assert r["frechet_distance"] > 10 * r["frechet_distance_real"]
    # The released model here is the one the run started from: both ends agree.
    assert r["frechet_distance_untrained"] == pytest.approx(r["frechet_distance"])
    assert r["val_loss_untrained"] > 0.5  # eps predicted from scratch: error ~ the noise's variance
    assert r["precision"] < 0.1
    assert r["precision_real"] > 0.5
    assert r["num_samples"] == 48 and r["num_real_reference"] == 48
    assert r["num_heldout"] > 0 and r["num_training"] > r["num_heldout"]
    d = r["downstream"]
    assert set(d) >= {"auc", "accuracy", "baseline_auc", "baseline_accuracy"}
    assert all(0.0 <= d[k] <= 1.0 for k in ("auc", "accuracy", "baseline_auc", "baseline_accuracy"))


def test_encoder_is_cached_beside_the_run_and_scalars_are_in_tensorboard(run, noise_result):
    path = Path(noise_result["encoder_path"])
    assert path == run.root.parent / f"encoder-{noise_result['encoder_fingerprint']}.pt"
    assert path.exists() and noise_result["encoder_kind"] == "trained"
    events = EventAccumulator(str(run.tensorboard))
    events.Reload()
    for tag in ("frechet_distance", "precision", "recall", "downstream_auc"):
        (scalar,) = events.Scalars(f"utility/{tag}")
        assert scalar.step == FINAL_ROUND
    assert events.Scalars("utility/frechet_distance")[0].value == pytest.approx(
        noise_result["frechet_distance"]
    )


def test_a_generator_returning_real_images_sits_at_the_floor(run, noise_result, monkeypatch):
    cfg = run.experiment_config()
    unseen = ImageSet.concat([s.validation for s in build_silos(cfg)]).images

    def real_images(unet, scheduler, num_samples, *args, **kwargs):
        return unseen[torch.from_numpy(np.arange(num_samples) % len(unseen))]

    monkeypatch.setattr(utility, "generate", real_images)
    logs: list[str] = []
    r = evaluate_utility(run.root, num_samples=len(unseen), progress=False, log=logs.append)
    assert not any("trained on" in line for line in logs)  # the cached encoder and labeller were loaded
    assert r["encoder_fingerprint"] == noise_result["encoder_fingerprint"]
    assert len(list(run.root.parent.glob("labeller-*.pt"))) == 1
    assert r["downstream"]["baseline_auc"] == noise_result["downstream"]["baseline_auc"]
    assert r["frechet_distance"] < 3 * r["frechet_distance_real"]
    assert r["precision"] > 0.5
    # Real images take each hospital's style in its real share; the loaded encoder knows the sources.
    mix = r["style_mix"]
    sources = {str(s) for silo in build_silos(cfg) for s in silo.members.sources}
    assert set(mix["generated"]) == set(mix["heldout_true"]) == sources and len(sources) == 2
    assert mix["gap"] == pytest.approx(0.5 * sum(abs(mix["generated"][n] - mix["heldout"][n]) for n in mix["generated"]))
    assert mix["heldout_accuracy"] >= utility.MIX_MIN_ACCURACY and mix["gap"] < 0.25, mix
    assert noise_result["style_mix"]["generated"].keys() == mix["generated"].keys()


def test_records_that_disagree_with_the_rebuilt_split_are_refused(tmp_path):
    run = make_run(tmp_path / "runs" / "tampered", TINY)
    path = run.hospital_home(0) / "records.json"
    records = json.loads(path.read_text())
    records["roles"]["member"], records["roles"]["heldout"] = (
        records["roles"]["heldout"],
        records["roles"]["member"],
    )
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match="differ"):
        evaluate_utility(run.root, num_samples=8, progress=False, log=lambda _: None)


def test_bad_arguments_are_refused(run):
    with pytest.raises(ValueError, match="num_samples"):
        evaluate_utility(run.root, num_samples=3)
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        evaluate_utility(run.root.parent)


def test_generated_images_do_not_depend_on_the_batch_size(run):
    """DDPM draws fresh noise at every step: one stream per image keeps each image its own."""
    from fedgen.model import load_released

    unet, scheduler = load_released(run.root)
    args = (unet, scheduler, 5, 16, ("ddpm", 3))
    whole = utility.generate(*args, 5, 0, False, torch.device("cpu"))
    pieces = utility.generate(*args, 2, 0, False, torch.device("cpu"))
    torch.testing.assert_close(whole, pieces)
    assert not torch.equal(whole, utility.generate(*args, 5, 1, False, torch.device("cpu")))  # the seed matters


def test_the_start_models_samples_are_drawn_once_beside_the_runs(run, noise_result, monkeypatch):
    drawn: list[int] = []
    original = utility.generate

    def counting(*args, **kwargs):
        drawn.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(utility, "generate", counting)
    cached = sorted(run.root.parent.glob("start-samples-*.pt"))
    r = evaluate_utility(run.root, num_samples=48, batch_size=16, progress=False, log=lambda _: None)
    assert len(drawn) == 1  # the released model's; the start model's came from the first evaluation
    assert cached and sorted(run.root.parent.glob("start-samples-*.pt")) == cached
    assert r["frechet_distance_untrained"] == noise_result["frechet_distance_untrained"]


def test_the_mix_is_not_measured_where_the_encoder_cannot_tell_the_hospitals_apart(tmp_path):
    """Two 'hospitals' on one scanner: their images look alike, the source head reads them at
    chance, and the samples' mix is reported as not measured rather than as a number."""
    import dataclasses

    from fedgen.data.synthetic import generate_xrays
    from fedgen.evaluation.features import load_or_train_encoder

    data = generate_xrays(num_patients=240, images_per_patient=1, image_size=16, num_sources=1,
                          finding_rate=0.3, seed=0)
    data = dataclasses.replace(data, sources=np.array(["hospital-a", "hospital-b"] * 120))
    training, heldout = data.subset(np.arange(120)), data.subset(np.arange(120, 240))
    encoder = load_or_train_encoder(tmp_path / "encoder.pt", training, log=lambda _: None)
    mix = utility.sample_style_mix(encoder, heldout.images[:40], heldout)
    assert mix["heldout_true"] == {"hospital-a": 0.5, "hospital-b": 0.5}
    assert mix["heldout_accuracy"] < utility.MIX_MIN_ACCURACY and mix["gap"] is None, mix
