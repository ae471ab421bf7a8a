"""A model state on the wire as one flat vector.

Flower sends every array of a record as objects of their own, one request each, signed with the
node's key over TLS in a deployment: the tiny UNet's 152 tensors made 225 objects per message,
and on 2 busy cores moving one model took longer than training it (issue 18). `pack` concatenates
the state into one float32 vector (one array, one or a few objects); the receiver, which builds the
same UNet from the same config, `unpack`s it along its own state dict. Exact: the same float32
values, in the state dict's order; FedAvg's weighted mean of flat vectors is the same arithmetic,
element by element, as of the tensors.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

FLAT_KEY = "fedgen-flat"  # the record's only key when its state is packed

StateDict = dict[str, torch.Tensor]


def pack(state: Mapping[str, torch.Tensor]) -> StateDict:
    """{FLAT_KEY: the float32 tensors of `state`, flattened and concatenated in its order}."""
    for name, tensor in state.items():
        if tensor.dtype != torch.float32:
            raise ValueError(f"{name}: only float32 states are packed, got {tensor.dtype}")
    flat = torch.cat([t.detach().reshape(-1) for t in state.values()]) if state else torch.zeros(0)
    return {FLAT_KEY: flat}


def unpack(received: Mapping[str, torch.Tensor], template: Mapping[str, torch.Tensor]) -> StateDict:
    """A state as received: a packed one is cut back into `template`'s names and shapes; any
    other (a plain state dict, as SecAgg+ rounds send) is returned as it is."""
    if set(received) != {FLAT_KEY}:
        return dict(received)
    flat = received[FLAT_KEY]
    sizes = [t.numel() for t in template.values()]
    if flat.ndim != 1 or flat.numel() != sum(sizes) or flat.dtype != torch.float32:
        raise ValueError(f"a packed state of {flat.numel()} {flat.dtype} values ({flat.ndim}-d) does not fit "
                         f"this model ({sum(sizes)} float32 values)")
    return {name: piece.reshape(t.shape) for (name, t), piece in zip(template.items(), flat.split(sizes))}
