"""The privacy-card check the scale benchmark and the slow simulations rely on: it must name every
kind of wrong card, not only pass right ones."""

import copy
import json

from omegaconf import OmegaConf

from fedgen.config import load_config
from fedgen.evaluation.card_check import card_problems
from fedgen.run_dir import RunDir


def _run(tmp_path, hospitals: dict) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.root.mkdir(parents=True, exist_ok=True)
    run.config.write_text(OmegaConf.to_yaml(OmegaConf.structured(load_config(["privacy=eps8"]))))
    run.privacy_card.write_text(json.dumps({"hospitals": hospitals}))
    return run


RIGHT = {
    str(h): {"epsilon": 7.5, "epsilon_recomputed": 7.5, "steps": 30, "history": [[2.0, 0.5, 10], [2.0, 0.5, 20]]}
    for h in range(3)
}


def test_a_right_card_passes_and_each_wrong_one_is_named(tmp_path):
    assert card_problems(_run(tmp_path, RIGHT).root, hospitals=3, rounds=2) == []
    assert card_problems(tmp_path / "nowhere", hospitals=3, rounds=2) == ["no privacy.json"]

    def problems(change) -> list[str]:
        card = copy.deepcopy(RIGHT)
        change(card)
        return card_problems(_run(tmp_path, card).root, hospitals=3, rounds=2)

    assert problems(lambda c: c.pop("2")) == ["ledgers for 2 of 3 hospitals"]
    assert problems(lambda c: c["1"].update(epsilon=7.0)) == ["hospital 1: epsilon 7.0 but recomputed 7.5"]
    over = problems(lambda c: c["0"].update(epsilon=8.5, epsilon_recomputed=8.5))
    assert over == ["hospital 0: epsilon 8.5 over the budget 8.0"]
    assert problems(lambda c: c["2"].update(steps=31)) == ["hospital 2: 31 steps over 2 rounds"]
    assert problems(lambda c: c["2"]["history"].pop()) == ["hospital 2: 30 steps over 1 rounds"]
