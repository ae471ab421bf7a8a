"""benchmarks/dp_step.py's Opacus peers (benchmarks/dp_step_peers.py): Opacus's per-example
gradients set side by side with fedgen's exact ones (which tests/test_per_sample_grads checks
against a one-example loop)."""

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

# PyTorch notes that Opacus's full backward hooks fire on the UNet's first layers (no input grad).
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

BENCHMARKS = str(Path(__file__).resolve().parent.parent / "benchmarks")


@pytest.fixture(scope="module")
def dp_step():
    # As when it runs as a script: the benchmark imports dp_step_peers from its own folder.
    sys.path.insert(0, BENCHMARKS)
    try:
        return importlib.import_module("dp_step")
    finally:
        sys.path.remove(BENCHMARKS)


@pytest.fixture(scope="module")
def peers(dp_step):
    return sys.modules["dp_step_peers"]


def test_compare_grad_samples_flags_each_kind_of_mismatch(peers):
    ref = {"a": torch.ones(3, 2), "b": torch.ones(3, 2), "c": torch.ones(3, 2), "d": torch.ones(3)}
    got = {"a": torch.ones(3, 2) * (1 + 1e-6), "b": torch.zeros(3, 2), "c": None,
           "d": torch.ones(2)}
    report = peers.compare_grad_samples(ref, got)
    assert report["compared_parameters"] == 4
    assert report["names"] == ["b", "c", "d"]
    assert report["details"]["b"]["opacus_all_zero"] is True
    assert report["details"]["c"] == {"problem": "missing"}


@pytest.mark.usefixtures("one_torch_thread")
def test_opacus_modes_against_exact_gradients_with_noise_multiplicity(dp_step):
    # K = 2: Opacus sees the B*K (example, draw) rows; the benchmark sums each example's rows.
    cfg = dp_step.config_for("tiny", 3, image_size=16, noise_multiplicity=2)
    bench = dp_step.Bench(cfg, 3, torch.device("cpu"))
    exact = dp_step.check_exact(bench)
    assert exact["opacus_functorch"]["mismatched_parameters"] == 0
    hooks = exact["opacus_hooks"]
    # Opacus's conv unfold reads channels_last inputs (after diffusers' attention) in the wrong
    # layout: exactly zero. If this fails after an Opacus upgrade, update fedgen's README.
    assert "mid_block.resnets.1.conv1.weight" in hooks["names"]
    assert all(name.endswith("conv1.weight") or name.endswith("conv2.weight")
               for name in hooks["names"])
    assert all(d["opacus_all_zero"] for d in hooks["details"].values())
    # Every mode steps its own weights, twice (the second checks that nothing accumulates).
    before = {m: [p.detach().clone() for p in bench.peers[m].module.parameters()]
              for m in bench.peers}
    for mode in bench.modes:
        bench.step(mode)
        bench.step(mode)
    for mode, weights in before.items():
        after = list(bench.peers[mode].module.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(after, weights)), mode


@pytest.mark.usefixtures("one_torch_thread")
def test_main_writes_every_mode(dp_step, tmp_path):
    out = tmp_path / "dp_step.json"
    result = dp_step.main(["--out", str(out), "--batch", "2", "--image-size", "16", "--repeats",
                           "2", "--warmup", "0", "--threads", "1", "--skip-memory"])
    saved = json.loads(out.read_text())
    assert saved["modes"] == list(dp_step.MODES) == result["modes"]
    for mode in ("dp", "opacus_functorch", "opacus_hooks"):
        assert saved[f"{mode}_over_plain"] > 0 and len(saved[f"cpu_{mode}_over_plain_iqr"]) == 2
    assert "dp_over_opacus_hooks" in saved
    assert set(saved["exact"]) == {"opacus_functorch", "opacus_hooks"}


def test_an_opacus_mode_that_cannot_wrap_is_reported_not_fatal(dp_step, peers, monkeypatch):
    def refuse(*args, **kwargs):
        raise NotImplementedError("no grad sampler for this layer")

    monkeypatch.setattr(peers, "prepare_module", refuse)
    cfg = dp_step.config_for("tiny", 2, image_size=16)
    bench = dp_step.Bench(cfg, 2, torch.device("cpu"))
    assert bench.modes == ("plain", "dp")
    exact = dp_step.check_exact(bench)
    assert exact["opacus_hooks"] == {"error": "NotImplementedError: no grad sampler for this layer"}
