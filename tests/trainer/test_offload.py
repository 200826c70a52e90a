"""``HostParking`` (``model.teacher_offload``): parameters move to host buffers and back, keep
their identity and ties, and what is done to them on the device survives parking."""

import pytest
import torch

from srpo_megatron.trainer.offload import HostParking


def _tied_model(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False)).to(device)
    model[1].weight = model[0].weight  # tied, as Qwen3's small models are
    return model


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
        ),
    ],
)
def test_parking_round_trip(device):
    model = _tied_model(device)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    allocated = torch.cuda.memory_allocated() if device == "cuda" else 0

    parking = HostParking(dict(model.named_parameters()))  # parks at once
    assert list(model.parameters()) == params  # the same Parameter objects, still tied
    assert model[1].weight is model[0].weight
    assert all(p.device.type == "cpu" for p in params)
    if device == "cuda":
        assert all(p.is_pinned() for p in params)
        assert torch.cuda.memory_allocated() < allocated  # the device copy is gone
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.cpu(), b.cpu())

    with parking.on_device():
        assert all(p.device.type == torch.device(device).type for p in params)
        with torch.no_grad():
            for p in params:
                p.mul_(2.0)  # e.g. the EMA update
        out = model(torch.tensor([1, 2], device=device))
    assert out.shape == (2, 10)
    assert all(p.device.type == "cpu" for p in params)
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.cpu(), 2.0 * b.cpu())
