"""Reference-model attacks (offline LiRA, offline RMIA) against a tiny UNet that partly memorised.

Setup (one module fixture, about 35 s on one thread): 16 members, 16 held-out and 32 population
images (one synthetic source, different patients: one distribution); the target trains on the
members and each of 3 references on 16 of the population, all with the same recipe (full-batch Adam
2e-3, 4 draws, 120 steps) from the same starting weights. At 120 steps the target memorises only
partly, where per-example calibration matters (at 200 steps single statistics already reach AUC
0.99 and leave nothing to beat). Measured when this was written (data seed 0): best single-model
statistic SimA AUC 0.922, TPR 0.44 at 0 false positives; on SimA, LiRA 1.000 and 1.00, RMIA
0.980 and 0.81 (a tuned to 0.7). With 16 non-members, "TPR at 1% FPR" is the TPR at zero false
positives: the test compares it and the AUC. Not every seed is this clear: at data seed 1 the target barely leaks (single AUC <= 0.68)
and LiRA on SimA matched the best single AUC (0.672 vs 0.680), while LiRA on the loss reached 0.75.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from attacks.audit import AuditSettings, check_attacks
from attacks.membership import ATTACKS, build_attack
from attacks.metrics import auc, roc_curve, tpr_at_fpr
from attacks.reference import (
    ReferenceAttackConfig,
    lira_offline,
    reference_attack_scores,
    rmia_offline,
    statistic_direction,
    tune_a,
)
from attacks.reference_models import (
    ReferenceRecipe,
    check_disjoint,
    train_like_target,
    train_references,
)
from attacks.tuned import fit_in_out, in_out_ratio, reference_rates
from fedgen.config import ConfigError, ModelConfig, TrainingConfig
from fedgen.data.dataset import DataError
from fedgen.data.synthetic import generate_xrays
from fedgen.model import build_scheduler, build_unet

N = 16  # members, and as many held-out images
POPULATION = 32
STEPS = 120
K = 3
STATISTIC = "sima"


def _recipe(steps: int = STEPS) -> ReferenceRecipe:
    # One hospital, batch = its size (q = 1): full-batch steps, one per "epoch".
    training = TrainingConfig(batch_size=N, learning_rate=2e-3, noise_multiplicity=4)
    return ReferenceRecipe(ModelConfig(), 16, training, (N,), num_rounds=1, local_epochs=steps)


def _rates(scores: np.ndarray, is_member: np.ndarray) -> tuple[float, float]:
    return auc(scores, is_member), tpr_at_fpr(roc_curve(scores, is_member), 0.01)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    torch.set_num_threads(1)  # after conftest's per-test set_num_threads(2)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    torch.set_num_threads(1)
    x = generate_xrays(2 * N + POPULATION + 48, 1, 16, 1, 0.3, seed=0).images
    members, heldout, population, fresh = x[:N], x[N : 2 * N], x[2 * N : 2 * N + POPULATION], x[2 * N + POPULATION :]
    torch.manual_seed(0)
    init, scheduler = build_unet(ModelConfig(), 16), build_scheduler(ModelConfig())
    started = time.perf_counter()
    target, _ = train_like_target(init, scheduler, [members], _recipe(), ("target",))
    refs = train_references(init, scheduler, population, _recipe(), K, tmp_path_factory.mktemp("refs"), seed=0)
    print(f"\ntarget and {K} references: {time.perf_counter() - started:.1f} s ({refs.steps} reference steps)")
    return {"init": init, "scheduler": scheduler, "target": target, "refs": refs, "members": members,
            "heldout": heldout, "population": population, "fresh": fresh}


def test_lira_and_rmia_beat_every_single_model_statistic(setting):
    s = setting
    candidates = torch.cat([s["members"], s["heldout"]])
    is_member = np.r_[np.ones(N, bool), np.zeros(N, bool)]
    single = {name: _rates(build_attack(name).score(s["target"], s["scheduler"], candidates), is_member)
              for name in ATTACKS}
    best_auc = max(r[0] for r in single.values())
    best_tpr = max(r[1] for r in single.values())
    scores, info = reference_attack_scores(s["target"], s["scheduler"], candidates, s["refs"], s["population"],
                                           ReferenceAttackConfig(statistic=STATISTIC, k=K))
    assert info["direction"] == "as published"  # SimA rises on training images, and the references say so
    assert info["direction_p_value"] < 0.05
    found = {name: _rates(v, is_member) for name, v in scores.items()}
    print(f"single: {single}\nreference: {found}")
    assert best_auc < 0.95 and best_tpr < 0.6, "the target memorised too much to leave room to calibrate"
    for name, (a, tpr) in found.items():
        assert a > best_auc, f"{name}: AUC {a:.3f} not above the best single-model AUC {best_auc:.3f}"
        assert tpr > best_tpr, f"{name}: TPR at 1% FPR {tpr:.2f} not above the best single-model {best_tpr:.2f}"


def test_reference_attacks_are_at_chance_on_an_untrained_target(setting):
    """The same references and candidates against weights that trained on nothing: the signal must
    come from the target's training, not from the references or the images. 16 members against 48
    non-members: the AUC's null standard deviation is 0.084; the band is +-0.2."""
    s = setting
    candidates = torch.cat([s["members"], s["heldout"], s["fresh"][:32]])
    is_member = np.r_[np.ones(N, bool), np.zeros(len(candidates) - N, bool)]
    scores, _ = reference_attack_scores(s["init"], s["scheduler"], candidates, s["refs"], s["population"],
                                        ReferenceAttackConfig(statistic=STATISTIC, k=K))
    print(f"\nuntrained target: { {name: round(auc(v, is_member), 3) for name, v in scores.items()} }")
    for name, v in scores.items():
        assert np.isfinite(v).all() and np.ptp(v) > 0, f"{name}: degenerate scores"
        assert abs(auc(v, is_member) - 0.5) < 0.2, f"{name}: AUC {auc(v, is_member):.3f} on an untrained target"


def test_a_population_that_holds_a_candidate_is_refused(setting):
    s = setting
    candidates = torch.cat([s["members"], s["heldout"]])
    check_disjoint(s["population"], candidates)  # the fixture's own population is disjoint
    leaky = s["population"].clone()
    leaky[5] = s["heldout"][3]
    with pytest.raises(DataError, match=r"holds 1 of the candidates \(population images \[5\]"):
        check_disjoint(leaky, candidates)
    # Float noise far below one grey level moves this image's 8-bit hash (a pixel of it sits 0.002
    # from a rounding boundary): only the pixel-distance check catches the copy.
    leaky[5] = s["heldout"][3] + 1e-4
    assert leaky[5:6].mul(127.5).add(127.5).round().ne(s["heldout"][3:4].mul(127.5).add(127.5).round()).any()
    with pytest.raises(DataError, match=r"holds 1 of the candidates \(population images \[5\]"):
        check_disjoint(leaky, candidates)
    leaky[7] = s["members"][0]
    with pytest.raises(DataError, match=r"holds 2 of the candidates \(population images \[5, 7\]"):
        check_disjoint(leaky, candidates)
    check_disjoint(s["population"] + 0.02, candidates)  # five grey levels off everywhere: not a copy


def test_references_are_cached_by_fingerprint(tmp_path):
    x = generate_xrays(12, 1, 16, 1, 0.3, seed=3).images
    torch.manual_seed(0)
    init, scheduler = build_unet(ModelConfig(), 16), build_scheduler(ModelConfig())
    recipe = ReferenceRecipe(ModelConfig(), 16, TrainingConfig(batch_size=4), (3, 2), num_rounds=2, local_epochs=1)
    first = train_references(init, scheduler, x, recipe, 2, tmp_path, log=lambda _: None)
    again = train_references(init, scheduler, x, recipe, 2, tmp_path, log=lambda _: None)
    assert first.cached == 0 and first.steps > 0 and first.trained_on.sum(axis=1).tolist() == [5, 5]
    assert again.cached == 2 and again.steps == 0 and again.fingerprint == first.fingerprint
    for a, b in zip(first.models, again.models):
        assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert all(not torch.equal(a, b) for a, b in zip(first.models[0].state_dict().values(), init.state_dict().values())
               if a.is_floating_point() and a.numel() > 100)  # they trained
    other = train_references(init, scheduler, x, ReferenceRecipe(ModelConfig(), 16, TrainingConfig(batch_size=4),
                                                                 (3, 2), 1, 1), 1, tmp_path, log=lambda _: None)
    assert other.fingerprint != first.fingerprint and other.cached == 0


def _synthetic_scores(effect: float, seed: int = 0):
    """Scores = minus an error exp(difficulty + effect * trained + noise): effect < 0, training on
    an image lowers its error (the published direction); effect > 0, it runs backwards."""
    rng = np.random.default_rng(seed)
    k, p, n = 8, 200, 200
    hard_pop, hard_x = rng.normal(0, 1, p), rng.normal(0, 1, n)
    trained_on = rng.random((k, p)) < 0.5
    ref_z = -np.exp(hard_pop + effect * trained_on + 0.1 * rng.normal(size=(k, p)))
    ref_x = -np.exp(hard_x + 0.1 * rng.normal(size=(k, n)))
    is_member = np.arange(n) < n // 2
    target_x = -np.exp(hard_x + effect * is_member + 0.1 * rng.normal(size=n))
    target_z = -np.exp(hard_pop + 0.1 * rng.normal(size=p))
    return target_x, ref_x, target_z, ref_z, trained_on, is_member


@pytest.mark.parametrize("effect", [-0.3, 0.3])
def test_the_direction_is_learned_from_the_references(effect):
    """A statistic that runs backwards (training raises the error: PIA on fedgen's memorising
    models) is flipped by what the references show, with no candidate label; a global threshold on
    it would sit far below chance."""
    target_x, ref_x, target_z, ref_z, trained_on, is_member = _synthetic_scores(effect)
    direction, agreement, _ = statistic_direction(ref_z, trained_on)
    assert direction == (1.0 if effect < 0 else -1.0)
    assert agreement > 0.9 if effect < 0 else agreement < 0.1  # the share of images whose error fell
    assert (auc(target_x, is_member) < 0.5) == (effect > 0)
    assert auc(lira_offline(target_x, ref_x, direction), is_member) > 0.95
    z = (~trained_on).any(axis=0)  # population samples with an OUT reference, as the driver takes them
    a, _ = tune_a(ref_z, trained_on, direction)
    rmia = rmia_offline(target_x, ref_x, target_z[z], ref_z[:, z], ~trained_on[:, z], direction, a)
    assert auc(rmia, is_member) > 0.95
    assert auc(lira_offline(target_x, ref_x, -direction), is_member) < 0.05  # the direction matters


def test_bad_settings_and_inputs_are_refused():
    check_attacks(("loss", "lira", "rmia"), "--attacks")
    assert AuditSettings().reference.statistic == "sima" and "lira" not in AuditSettings().attacks
    with pytest.raises(ConfigError, match="unknown attack 'lirra'"):
        check_attacks(("lirra",), "--attacks")
    with pytest.raises(ConfigError, match="not a single-model attack"):
        ReferenceAttackConfig(statistic="rmia")
    with pytest.raises(ConfigError, match="k must be >= 1"):
        ReferenceAttackConfig(k=0)
    with pytest.raises(ValueError, match="target scores"):
        lira_offline(np.zeros(3), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="no OUT reference"):
        rmia_offline(-np.ones(2), -np.ones((1, 2)), -np.ones(3), -np.ones((1, 3)), np.zeros((1, 3), bool))


SMALL_RUN = ["model.init=null", "data.num_patients=48", "data.image_size=16", "training.batch_size=16",
             "federation.num_hospitals=2", "federation.num_rounds=1", "federation.local_epochs=2"]


def test_fedgen_attack_runs_lira_and_rmia_and_caches_the_references(tmp_path, capsys):
    """The command end to end on a run whose released model is its untrained starting point (so
    the attacks should find nothing); a second call finds the references in the cache."""
    from test_utility import make_run

    from fedgen.cli import main

    run = make_run(tmp_path / "runs" / "tiny", SMALL_RUN)
    args = ["attack", str(run.root), "--attacks", "sima,lira,rmia", "--references", "2", "--samples", "0"]
    assert main(args) == 0
    first = json.loads((run.root / "attack.json").read_text())
    info = first["reference_models"]
    assert set(first["attacks"]) == {"sima", "lira", "rmia"}
    assert info["k"] == 2 and info["from_cache"] == 0 and info["training_steps"] == 2 * 2 * 2 * 2  # k x hospitals x epochs x steps
    assert info["training_seconds"] > 0 and info["population"] == "public" and info["statistic"] == "sima"
    for name in ("lira", "rmia"):
        assert 0.2 < first["attacks"][name]["auc"] < 0.8  # untrained target: chance, within a wide band
        assert name in first["hospitals"]["0"]["auc"]
    assert main(args) == 0
    again = json.loads((run.root / "attack.json").read_text())["reference_models"]
    assert again["from_cache"] == 2 and again["training_steps"] == 0 and again["fingerprint"] == info["fingerprint"]
    assert "reference model" in capsys.readouterr().out
    # A cache shared between runs (--reference-cache): filled on first use, by the same fingerprint.
    shared = tmp_path / "shared-references"
    assert main([*args, "--reference-cache", str(shared)]) == 0
    moved = json.loads((run.root / "attack.json").read_text())["reference_models"]
    assert moved["from_cache"] == 0 and (shared / info["fingerprint"]).is_dir()


def test_fedgen_attack_refuses_a_population_folder_holding_a_candidate(tmp_path, capsys):
    from PIL import Image
    from test_utility import make_run

    from attacks.targets import candidates_from_run
    from fedgen.cli import main

    run = make_run(tmp_path / "runs" / "tiny", SMALL_RUN)
    folder = tmp_path / "population"
    folder.mkdir()
    candidates, _ = candidates_from_run(run.root)
    images = torch.cat([candidates.images[2:3], generate_xrays(130, 1, 16, 1, 0.3, seed=7).images])
    for i, x in enumerate(images):  # 8-bit PNGs: the candidate comes back within half a grey level
        Image.fromarray(((x[0].numpy() + 1) * 127.5).round().astype(np.uint8)).save(folder / f"{i:03d}.png")
    args = ["attack", str(run.root), "--attacks", "lira", "--references", "2", "--samples", "0", "--population", str(folder)]
    assert main(args) == 2  # the CLI's exit status for bad input: one line, no traceback
    error = capsys.readouterr().err
    assert "holds 1 of the candidates" in error and not (run.root / "attack.json").exists()


def _floor_scores(k: int = 8, population: int = 400, candidates: int = 2000, seed: int = 0):
    """Log errors where training pulls an image towards one floor whatever its difficulty m, as on
    fedgen's small memorising models (more strongly than there): OUT s = m + noise, IN s = 1 + 0.1 m
    + noise. A hard image (large m) that was trained on scores below its OUT mean: offline LiRA reads
    that as "not a member"; the fitted IN line does not."""
    rng = np.random.default_rng(seed)

    def draw(m, is_in):
        return np.where(is_in, 1.0 + 0.1 * m, m) + 0.2 * rng.standard_normal(m.shape)

    m_pop, m_cand = rng.standard_normal(population), rng.standard_normal(candidates)
    trained_on = np.stack([rng.permutation(population) < population // 2 for _ in range(k)])
    pop = np.stack([draw(m_pop, t) for t in trained_on])
    is_member = np.arange(candidates) < candidates // 10
    refs = np.stack([draw(m_cand, np.zeros(candidates, bool)) for _ in range(k)])
    return pop, trained_on, draw(m_cand, is_member), refs, is_member


def test_the_in_out_rule_learns_a_member_floor_that_offline_lira_misses():
    pop, trained_on, target, refs, is_member = _floor_scores()
    fits = fit_in_out(pop, trained_on)
    assert fits[True][1] == pytest.approx(0.1, abs=0.1) and fits[False][1] == pytest.approx(1.0, abs=0.1)
    ratio = in_out_ratio(target, refs.mean(axis=0), fits)
    lira = lira_offline(-np.exp(-target), -np.exp(-refs))  # lira_offline takes negated errors
    in_out_rate, lira_rate = _rates(ratio, is_member), _rates(lira, is_member)
    print(f"\nin-out {in_out_rate}, offline LiRA {lira_rate}, raw {_rates(target, is_member)}")
    assert in_out_rate[0] > lira_rate[0] + 0.1 and in_out_rate[1] > lira_rate[1]  # measured: AUC 0.98 vs 0.84
    # On the references alone (each playing the target in turn), the rule shows the same advantage.
    assert reference_rates(pop, trained_on, "in-out")[0] > reference_rates(pop, trained_on, "raw")[0] + 0.2


def test_tuned_chooses_on_the_references_and_finds_the_partly_memorised_members(setting):
    s = setting
    candidates = torch.cat([s["members"], s["heldout"], s["fresh"]])
    is_member = np.r_[np.ones(N, bool), np.zeros(len(candidates) - N, bool)]
    scores, info = reference_attack_scores(s["target"], s["scheduler"], candidates, s["refs"], s["population"],
                                           ReferenceAttackConfig(statistic=STATISTIC, k=K), names=("tuned",))
    chosen = info["tuned"]
    assert chosen["statistic"] in chosen["reference_tpr_at_1pct_fpr"]
    assert chosen["reference_tpr_at_1pct_fpr"][chosen["statistic"]] == max(chosen["reference_tpr_at_1pct_fpr"].values())
    default = build_attack(STATISTIC).score(s["target"], s["scheduler"], candidates)
    print(f"\ntuned {chosen['statistic']}: {_rates(scores['tuned'], is_member)}, default {STATISTIC}: "
          f"{_rates(default, is_member)}")
    assert auc(scores["tuned"], is_member) > 0.85
    untrained, _ = reference_attack_scores(s["init"], s["scheduler"], candidates, s["refs"], s["population"],
                                           ReferenceAttackConfig(statistic=STATISTIC, k=K), names=("tuned",))
    assert abs(auc(untrained["tuned"], is_member) - 0.5) < 0.2


def test_fresh_nonmembers_are_new_patients_of_each_hospitals_scanner(tmp_path):
    from test_utility import make_run

    from attacks.reference_models import population_images
    from attacks.targets import candidates_from_run

    run = make_run(tmp_path / "runs" / "tiny", SMALL_RUN)
    plain, training = candidates_from_run(run.root)
    more, _ = candidates_from_run(run.root, fresh=30)
    n = len(plain.images)
    assert torch.equal(more.images[:n], plain.images) and (more.is_member[:n] == plain.is_member).all()
    fresh = more.images[n:]
    assert len(fresh) == 30 and not more.is_member[n:].any()
    for hospital, patient in zip(more.hospital[n:], more.patient[n:]):
        assert patient.startswith(f"s{hospital}-")  # the synthetic generator's id: its scanner
    assert not set(more.patient[n:]) & set(plain.patient)
    check_disjoint(fresh, torch.cat([plain.images, training]), "the run's images")
    cfg = run.experiment_config()
    check_disjoint(population_images(cfg, 200, "hospitals").images, fresh, "fresh non-members")
    iid = make_run(tmp_path / "runs" / "iid", [*SMALL_RUN, "federation.partitioning=iid"])
    with pytest.raises(ConfigError, match="federation.partitioning=source"):
        candidates_from_run(iid.root, fresh=10)


def test_fedgen_attack_adds_fresh_nonmembers_and_runs_tuned(tmp_path):
    from test_utility import make_run

    from fedgen.cli import main

    run = make_run(tmp_path / "runs" / "tiny", SMALL_RUN)
    args = ["attack", str(run.root), "--attacks", "sima,tuned", "--references", "3", "--samples", "0",
            "--population", "hospitals", "--fresh-nonmembers", "40"]
    assert main(args) == 0
    report = json.loads((run.root / "attack.json").read_text())
    assert report["fresh_nonmembers"] == 40
    sima, tuned = report["attacks"]["sima"], report["attacks"]["tuned"]
    assert sima["num_nonmembers"] == sima["num_members"] + 40 and tuned["num_nonmembers"] == sima["num_nonmembers"]
    assert report["reference_models"]["tuned"]["statistic"].startswith("sima t=")
    assert 0.2 < tuned["auc"] < 0.8  # the released model is untrained: chance
    assert main([*args[:-2], "--fresh-nonmembers", "-1"]) == 2
    assert main([*args[:4], "--references", "2", *args[6:]]) == 2  # tuned needs k >= 3


def test_references_repeat_images_as_the_target_did(tmp_path):
    """A hospital that trained 2 of its images 3 extra times: each pseudo-hospital trains on 4
    distinct population images plus 6 copies, so its steps (Poisson rate batch / 10) and its share
    of the population are the target's."""
    training = TrainingConfig(batch_size=4, learning_rate=1e-3)
    repeated = ReferenceRecipe(ModelConfig(), 16, training, (10,), num_rounds=1, local_epochs=1, duplicated=((2, 3),))
    assert repeated.distinct_sizes == (4,) and repeated.train_size == 10
    population = generate_xrays(12, 1, 16, 1, 0.3, seed=3).images
    init, scheduler = build_unet(ModelConfig(), 16), build_scheduler(ModelConfig())
    refs = train_references(init, scheduler, population, repeated, 2, tmp_path, seed=0, log=lambda *_: None)
    assert (refs.trained_on.sum(axis=1) == 4).all() and refs.steps == 2 * 3  # 2 references x ceil(10 / 4) steps
    plain = train_references(init, scheduler, population, ReferenceRecipe(ModelConfig(), 16, training, (4,), 1, 1),
                             2, tmp_path, seed=0, log=lambda *_: None)
    assert plain.steps == 2 * 1 and plain.fingerprint != refs.fingerprint
    with pytest.raises(ValueError, match="does not fit"):
        ReferenceRecipe(ModelConfig(), 16, training, (10,), 1, 1, duplicated=((4, 3),))
