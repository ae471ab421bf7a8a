"""A model on the wire as one flat vector (`fedgen.federation.flat_state`): exact both ways, and
FedAvg's mean of packed states equals the mean of the tensors."""

import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedgen.config import load_config
from fedgen.federation.flat_state import FLAT_KEY, pack, unpack
from fedgen.model import build_unet


@pytest.fixture(scope="module")
def states():
    cfg = load_config(["data.image_size=16"])
    torch.manual_seed(0)
    first = build_unet(cfg.model, 16).state_dict()
    torch.manual_seed(1)
    second = build_unet(cfg.model, 16).state_dict()  # a separately built model: its template
    return first, second


def test_pack_then_unpack_is_exact_and_one_array(states):
    state, template = states
    packed = pack(state)
    assert list(packed) == [FLAT_KEY] and packed[FLAT_KEY].shape == (sum(t.numel() for t in state.values()),)
    assert len(list(ArrayRecord(packed).keys())) == 1  # one array, where the state has 152
    back = unpack(ArrayRecord(packed).to_torch_state_dict(), template)
    assert list(back) == list(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert unpack(state, template) == dict(state)  # a plain state dict (SecAgg+ rounds) passes as it is


def test_a_packed_state_that_does_not_fit_is_refused(states):
    state, template = states
    with pytest.raises(ValueError, match="does not fit"):
        unpack({FLAT_KEY: pack(state)[FLAT_KEY][:-1]}, template)
    with pytest.raises(ValueError, match="float32"):
        pack({"w": torch.zeros(2, dtype=torch.float64)})


def test_fedavg_of_packed_states_is_fedavg_of_the_tensors(states, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):  # as Flower's runtime sets them before messages are made
        monkeypatch.setattr(TaskIdentity, name, 1)
    a, b = states

    def replies(pk):
        return [Message(RecordDict({"arrays": ArrayRecord(pk(s)), "metrics": MetricRecord({"num-examples": n})}),
                        dst_node_id=0, message_type="train") for s, n in ((a, 3), (b, 5))]
    plain, _ = FedAvg().aggregate_train(1, replies(lambda s: s))
    packed, _ = FedAvg().aggregate_train(1, replies(pack))
    flat = unpack(packed.to_torch_state_dict(), a)
    reference = plain.to_torch_state_dict()
    assert all(torch.equal(flat[k], reference[k]) for k in a)
