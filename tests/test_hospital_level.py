"""Hospital-level DP at the coordinator (`privacy.hospital_level`, `fedgen.privacy.hospital_level`):
the settings it refuses, the clipping bound on one hospital's share, the noise's standard
deviation measured over many draws, Poisson sampling, the ledger across resumes and at the budget,
and the privacy card's epsilon recomputed with Google's dp-accounting."""

import json
import math

import dp_accounting as dpa
import pytest
import torch
from opacus.accountants import RDPAccountant
from test_privacy_card import independent_epsilon
from test_update_checks import TINY, good_metrics

from fedgen.config import ConfigError, load_config
from fedgen.federation.coordinator import Coordinator
from fedgen.privacy.accounting import BudgetExceededError
from fedgen.privacy.hospital_level import LEDGER_FILE, clip_update, noisy_mean
from fedgen.privacy.randomness import ReproducibleRandomness, SecretRandomness
from fedgen.run_dir import RunDir

ON = ["privacy.hospital_level.enabled=true"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small tensors: a second thread only waits


@pytest.mark.parametrize(("overrides", "setting"), [
    (["privacy.hospital_level.sample_rate=0"], "privacy.hospital_level.sample_rate"),
    (["privacy.hospital_level.sample_rate=1.5"], "privacy.hospital_level.sample_rate"),
    (["privacy.hospital_level.delta=0.34"], "privacy.hospital_level.delta"),  # 3 hospitals: 1/n = 0.333
    (["privacy.hospital_level.target_epsilon=0"], "privacy.hospital_level.target_epsilon"),
    (["privacy.hospital_level.clipping_norm=0"], "privacy.hospital_level.clipping_norm"),
    (["federation.secure_aggregation=true"], "federation.secure_aggregation"),
    (["federation.strategy=fedadam"], "federation.strategy"),
    (["federation.fraction_train=0.5"], "federation.fraction_train"),
])
def test_impossible_settings_are_refused(overrides, setting):
    with pytest.raises(ConfigError, match=f"^{setting}:"):
        load_config([*ON, "federation.num_hospitals=3", *overrides])


def test_off_by_default_and_both_levels_together():
    assert not load_config([]).privacy.hospital_level.enabled
    both = load_config([*ON, "privacy=eps8"])
    assert both.privacy.enabled and both.privacy.hospital_level.enabled


def _state(n: int = 20_000) -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(n), "b": torch.zeros(7), "steps": torch.tensor(3)}


def test_clipping_scales_the_whole_update_to_the_norm():
    g = _state(100)
    update = {"w": torch.full((100,), 3.0), "b": torch.full((7,), 4.0), "steps": torch.tensor(99)}
    clipped, norm = clip_update(update, g, clipping_norm=2.0)
    assert norm == pytest.approx(math.sqrt(100 * 9 + 7 * 16))
    assert math.sqrt(sum(float((d**2).sum()) for d in clipped.values())) == pytest.approx(2.0)
    assert "steps" not in clipped  # a counter is not part of the update
    small, _ = clip_update({**update, "w": torch.full((100,), 0.01), "b": torch.zeros(7)}, g, clipping_norm=2.0)
    assert torch.allclose(small["w"], torch.full((100,), 0.01, dtype=torch.float64))  # within the bound: unchanged


def test_a_huge_update_moves_the_model_by_at_most_clip_over_expected_count():
    """The same noise twice (reproducible randomness, same seed): the huge hospital's share of the
    release is exactly its clipped update over the expected count, whatever it sent."""
    g, C, expected = _state(), 1.5, 4.0
    honest = [{"w": torch.randn(20_000) * 1e-3, "b": torch.zeros(7), "steps": torch.tensor(3)} for _ in range(3)]
    huge = {"w": torch.full((20_000,), 1e6), "b": torch.full((7,), -1e6), "steps": torch.tensor(3)}
    without, _ = noisy_mean(g, honest, C, 0.8, expected, ReproducibleRandomness(0, "t"))
    with_huge, norms = noisy_mean(g, [*honest, huge], C, 0.8, expected, ReproducibleRandomness(0, "t"))
    share = math.sqrt(sum(float(((with_huge[k] - without[k]).double() ** 2).sum()) for k in ("w", "b")))
    assert norms[-1] > 1e8
    assert share == pytest.approx(C / expected, rel=1e-4)
    assert with_huge["steps"] == g["steps"]


def test_noise_has_the_calibrated_std_and_the_huge_update_only_its_share():
    """Secret noise, measured over many draws: per coordinate (sigma C) / expected count around the
    clipped share C / expected count of a hospital that sent a huge update."""
    g, C, sigma, expected, draws = {"w": torch.zeros(64)}, 2.0, 1.3, 5.0, 3000
    huge = {"w": torch.full((64,), 1e9)}
    secret = SecretRandomness()  # one keystream, many draws
    out = torch.stack([noisy_mean(g, [huge], C, sigma, expected, secret)[0]["w"] for _ in range(draws)]).double()
    share = C / expected / math.sqrt(64)  # per coordinate: the clipped update points along (1, ..., 1)
    assert float(out.mean()) == pytest.approx(share, abs=4 * sigma * C / expected / math.sqrt(out.numel()))
    measured = float(out.std())
    # The std of a std estimate from N normals is std / sqrt(2N): 5 of them is far beyond chance.
    assert measured == pytest.approx(sigma * C / expected, rel=5 / math.sqrt(2 * out.numel()))


def test_noise_std_on_a_model_sized_sum():
    g = _state(200_000)
    released, _ = noisy_mean(g, [], clipping_norm=0.7, noise_multiplier=2.0, expected_count=3.0,
                             randomness=SecretRandomness())
    measured = float(released["w"].double().std()) * 3.0
    assert measured == pytest.approx(2.0 * 0.7, rel=5 / math.sqrt(2 * 200_000))


def _coordinator(tmp_path, *overrides, name="h") -> Coordinator:
    cfg = load_config([*TINY, *ON, f"runs_dir={tmp_path}", f"name={name}", "federation.num_rounds=3", *overrides])
    return Coordinator(cfg, RunDir(tmp_path / name), log=lambda _: None)


def test_sampling_is_poisson_and_secret(tmp_path):
    dp = _coordinator(tmp_path, "privacy.hospital_level.sample_rate=0.3").hospital_dp
    assert dp is not None
    picks = []
    for r in range(40):
        dp.begin_round(1 + r % 3)
        picks += dp.sample(250)
    assert sum(picks) / len(picks) == pytest.approx(0.3, abs=4 * math.sqrt(0.3 * 0.7 / len(picks)))
    dp.begin_round(1)
    first = dp.sample(64)
    dp.begin_round(1)
    assert dp.sample(64) != first  # same round, same seed: secret draws differ (2^-64 to fail)


def test_reproducible_noise_is_the_test_switch(tmp_path):
    draws = []
    for name in ("a", "b"):
        dp = _coordinator(tmp_path, "privacy.reproducible_noise=true", name=name).hospital_dp
        assert dp is not None
        dp.begin_round(1)
        draws.append((dp.sample(32), dp.release(1, _state(100), [])[0]["w"]))
    assert draws[0][0] == draws[1][0] and torch.equal(draws[0][1], draws[1][1])
    assert json.loads((tmp_path / "a" / LEDGER_FILE).read_text())["guarantee"].startswith("no guarantee")


def test_ledger_carries_across_resumes_and_stops_at_the_budget(tmp_path):
    coordinator = _coordinator(tmp_path, "federation.num_rounds=2")
    dp = coordinator.hospital_dp
    assert dp is not None
    for r in (1, 2):
        dp.begin_round(r)
        _, info = dp.release(r, _state(100), [])  # nobody sampled: noise alone, and the round counts
        assert info["summed"] == 0 and info["rounds_spent"] == r
    assert dp.ledger.epsilon <= 8.0 + 1e-9
    again = _coordinator(tmp_path, "federation.num_rounds=2").hospital_dp  # a resumed coordinator
    assert again is not None and again.ledger.steps == 2 and again.ledger.trained_rounds == [1, 2]
    with pytest.raises(BudgetExceededError, match="Refusing"):
        again.begin_round(3)
    with pytest.raises(ConfigError, match="privacy.hospital_level.target_epsilon"):
        _coordinator(tmp_path, "federation.num_rounds=2", "privacy.hospital_level.target_epsilon=4")


def test_an_unreachable_budget_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="privacy.hospital_level.noise_multiplier"):
        _coordinator(tmp_path, "privacy.hospital_level.noise_multiplier=0.1")


@pytest.fixture(scope="module")
def card(tmp_path_factory) -> dict:
    """Three rounds through the Coordinator with both levels' records, as the ServerApp drives it."""
    root = tmp_path_factory.mktemp("hcard")
    coordinator = _coordinator(root, "federation.min_train_nodes=1", "privacy.hospital_level.sample_rate=0.6",
                               "privacy.hospital_level.target_epsilon=3", "privacy.hospital_level.delta=1e-2")
    dp = coordinator.hospital_dp
    assert dp is not None
    for r in (1, 2, 3):
        dp.begin_round(r)
        coordinator.begin_round(r, sampled=sum(dp.sample(3)))
        coordinator.record_train(0, {**good_metrics(0), "delta": 1e-5, "noise-multiplier": 1.0, "sample-rate": 0.5,
                                     "reproducible-noise": 0})
        state, info = dp.release(r, coordinator.global_state(), [])
        coordinator.record_hospital_level(info)
        coordinator.end_round(r, state)
    return json.loads(coordinator.run_dir.privacy_card.read_text())


def test_the_card_states_both_levels_and_the_hospital_level_epsilon_recomputes(card):
    assert "example-level" in card["level"] and "hospital-level" in card["level"]
    assert set(card["hospitals"]) == {"0"}
    h = card["hospital_level"]
    sigma = h["noise_multiplier"]
    assert h["history"] == [[sigma, 0.6, 3]] and h["rounds"] == h["planned_rounds"] == 3
    assert h["epsilon"] <= 3.0 + 1e-9 and not h["reproducible_noise"]
    # From the card alone: the Renyi divergence by numerical integration, dp-accounting's conversion...
    assert h["epsilon"] == pytest.approx(independent_epsilon(h["history"], h["delta"]), rel=1e-3)
    # ...and dp-accounting's own RDP accountant, at the integer orders where both are exact.
    orders = [float(a) for a in range(2, 65)]
    theirs = dpa.rdp.RdpAccountant(orders=orders)
    for s, q, n in h["history"]:
        theirs.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(s)), n)
    ours = RDPAccountant()
    ours.history = [tuple(x) for x in h["history"]]
    assert theirs.get_epsilon(h["delta"]) == pytest.approx(ours.get_privacy_spent(delta=h["delta"], alphas=orders)[0],
                                                           rel=1e-9)
    assert h["epsilon"] <= theirs.get_epsilon(h["delta"]) + 1e-9


def test_metrics_and_the_round_record_name_the_level(tmp_path, card):
    coordinator = _coordinator(tmp_path)
    lines: list[str] = []
    coordinator.log = lines.append
    dp = coordinator.hospital_dp
    assert dp is not None and coordinator.required_updates(3) == 0  # every round releases
    dp.begin_round(1)
    coordinator.begin_round(1, sampled=0)
    state, info = dp.release(1, coordinator.global_state(), [])
    coordinator.record_hospital_level(info)
    coordinator.end_round(1, state)
    assert "(hospital level, at the coordinator)" in lines[-1] and "(example level, at each hospital)" in lines[-1]
    metrics = json.loads(coordinator.run_dir.metrics.read_text())
    assert metrics["hospital_level"]["steps"] == 1 and metrics["history"][0]["hospital_level"]["summed"] == 0
    assert metrics["summary"]["hospital_level_epsilon"] == pytest.approx(dp.ledger.epsilon)


class Grid:
    """The two calls FedAvg's configure_train makes of a Grid."""

    def __init__(self, nodes: int):
        self.nodes = list(range(1, nodes + 1))

    def get_node_ids(self):
        return self.nodes


def test_the_server_samples_clips_and_noises_through_the_strategy(tmp_path, monkeypatch):
    """The ServerApp's path: Poisson sampling in configure_train; the release in aggregate_train is
    exactly noisy_mean of the usable updates (a rejected one adds nothing) with the round's noise."""
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):  # what Flower's runtime sets before messages are made
        monkeypatch.setattr(TaskIdentity, name, 1)
    from test_update_checks import instruction, poisoned, shifted, train_reply

    from server.app import make_strategy

    cfg = load_config([*TINY, *ON, f"runs_dir={tmp_path}", "name=s", "federation.num_hospitals=30",
                       "data.num_patients=60", "privacy.hospital_level.sample_rate=0.5", "privacy.reproducible_noise=true",
                       "federation.max_update_norm=1e9"])  # the huge update is clipped, not rejected
    coordinator = Coordinator(cfg, RunDir(tmp_path / "s"), log=lambda _: None)
    strategy = make_strategy(cfg, coordinator)
    before = coordinator.global_state()
    sent = list(strategy.configure_train(1, ArrayRecord(before), ConfigRecord({}), Grid(30)))
    assert 0 < len(sent) < 30 and coordinator.current["sampled"] == len(sent)  # 2^-29 to fail
    strategy.instructions = [instruction(n) for n in (1, 2, 3)]
    huge = shifted(before, 1e3)
    replies = [train_reply(strategy.instructions[0], 0, shifted(before, 1e-3)),
               train_reply(strategy.instructions[1], 1, poisoned(before, "nan")),
               train_reply(strategy.instructions[2], 2, huge)]
    arrays, _ = strategy.aggregate_train(1, replies)
    expected, _ = noisy_mean(before, [shifted(before, 1e-3), huge], 1.0, coordinator.hospital_dp.noise_multiplier,
                             15.0, ReproducibleRandomness(cfg.seed, "hospital-level", 1))
    released = strategy.state_of(arrays)
    assert all(torch.allclose(released[k].to(v.dtype), v, atol=1e-6) for k, v in expected.items())
    assert coordinator.current["hospital_level"]["summed"] == 2 and len(coordinator.current["rejected"]) == 1
    # A round that samples nobody still releases (the noise alone) and counts.
    coordinator.end_round(1, released)
    strategy.instructions = []
    coordinator.hospital_dp.begin_round(2)
    coordinator.begin_round(2, sampled=0)
    arrays, _ = strategy.aggregate_train(2, [])
    assert arrays is not None and coordinator.hospital_dp.ledger.steps == 2
    moved = strategy.state_of(arrays)
    assert not all(torch.equal(moved[k], released[k]) for k in released)


@pytest.mark.slow
def test_a_federation_with_both_levels_completes_and_its_records_say_both(tmp_path):
    from test_simulation import run_fedgen, tiny_overrides

    done = run_fedgen([*tiny_overrides(tmp_path, "both"), *ON, "privacy.hospital_level.target_epsilon=20",
                       "privacy.hospital_level.clipping_norm=0.5"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "hospital level, at the coordinator: epsilon 20" in done.stdout
    assert "(hospital level, at the coordinator)" in done.stdout and "(example level, at each hospital)" in done.stdout
    run = tmp_path / "both"
    card = json.loads((run / "privacy.json").read_text())
    assert set(card["hospitals"]) == {"0", "1"} and card["hospital_level"]["rounds"] == 2
    h = card["hospital_level"]
    assert h["history"] == [[h["noise_multiplier"], 1.0, 2]]
    # q_h = 1: no subsampling, where dp-accounting's RDP is exact at every order (Opacus's among them).
    theirs = dpa.rdp.RdpAccountant(orders=[1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
    theirs.compose(dpa.GaussianDpEvent(h["noise_multiplier"]), 2)
    assert h["epsilon"] == pytest.approx(theirs.get_epsilon(h["delta"]), rel=1e-3)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["hospital_level"]["steps"] == 2
    assert [r["hospital_level"]["summed"] for r in metrics["history"]] == [2, 2]  # q_h = 1: both, each round
    assert "Hospital-level (epsilon, delta)-DP at the coordinator" in (run / "pipeline" / "README.md").read_text()
    assert json.loads((run / LEDGER_FILE).read_text())["guarantee"] == "secret noise and sampling"
