"""Expert parallelism on gloo: a training forward/backward of the tiny Qwen3-MoE at EP=2 gives the
gradients of EP=1, every parameter, with both of Megatron's token dispatchers (the "alltoall" one
needs runtime/cpu.py's numpy split sizes), the router's load-balancing and z-losses on.

EP=2 runs on 2 ranks (DP=2): rank r takes micro-batch r. Its attention and dense gradients are its
own batch's (summed here over the 2 ranks, as DDP's all-reduce would); its experts' gradients
already hold both batches' tokens, which the dispatcher brought to them. EP=1 runs in one process
over the two micro-batches in turn, accumulating. The auxiliary losses are per micro-batch in both.
"""

import pytest
import torch
from test_qwen3_moe_parity import VOCAB, make_hf_moe_model

from srpo_megatron.runtime.distributed import ParallelLayout
from srpo_megatron.runtime.launch import run_distributed

BATCH, SEQ = 2, 16


def make_micro_batches(n: int = 2):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (n, BATCH, SEQ + 1), generator=g)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def _train_grads_rank(hf_dir: str, dispatcher: str):
    """Loss per micro-batch of this rank, and {HF tensor names: gradient} of its parameters,
    the non-expert ones summed over the data-parallel group."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from srpo_megatron.models.qwen3.config import load_hf_config
    from srpo_megatron.models.qwen3.loader import load_hf_weights
    from srpo_megatron.models.qwen3.mapping import map_params
    from srpo_megatron.models.qwen3.provider import build_qwen3_model

    model = build_qwen3_model(
        load_hf_config(hf_dir),
        params_dtype=torch.float32,
        moe_token_dispatcher_type=dispatcher,
        moe_aux_loss_coeff=1e-2,
        moe_z_loss_coeff=1e-3,
    ).train()
    load_hf_weights(model, hf_dir)
    batches = make_micro_batches()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    losses = []
    for tokens, labels in batches[dp_rank::dp]:  # EP=2: one micro-batch per rank; EP=1: both
        position_ids = torch.arange(SEQ).expand(BATCH, SEQ)
        loss = model(tokens, position_ids, None, labels=labels).mean()  # labels -> [B, S] token losses
        loss.backward()
        losses.append(loss.item())
    grads = {}
    for pm in map_params(model):
        grad = dict(model.named_parameters())[pm.mcore_name].grad
        assert grad is not None, pm.mcore_name
        if pm.expert is None and dp > 1:
            dist.all_reduce(grad, group=ps.get_data_parallel_group())
        grads[pm.hf_names] = grad
    return losses, grads


@pytest.fixture(scope="module")
def ep1_reference(tmp_path_factory):
    hf_dir = tmp_path_factory.mktemp("hf_moe")
    make_hf_moe_model(hf_dir)
    ((losses, grads),) = run_distributed(_train_grads_rank, world_size=1, args=(str(hf_dir), "alltoall"))
    return str(hf_dir), losses, grads


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_ep2_gradients_equal_ep1(ep1_reference, dispatcher):
    hf_dir, losses, reference = ep1_reference
    per_rank = run_distributed(
        _train_grads_rank, world_size=2, layout=ParallelLayout(ep=2), args=(hf_dir, dispatcher)
    )
    torch.testing.assert_close([loss for rank_losses, _ in per_rank for loss in rank_losses], losses)
    experts = [{n for n in grads if ".experts." in n[0]} for _, grads in per_rank]
    assert len(experts[0]) == len(experts[1]) == 3 * 2 * 2  # 3 MoE layers x 2 experts x fc1, fc2
    assert not experts[0] & experts[1], "an expert on both EP ranks"
    gathered = {**per_rank[0][1], **per_rank[1][1]}  # non-expert gradients: the same on both ranks
    assert gathered.keys() == reference.keys()  # every parameter of the model
    for names, grad in reference.items():
        assert grad.abs().sum() > 0, names  # every expert had tokens, every router had a gradient
        torch.testing.assert_close(
            gathered[names], grad, rtol=1e-5, atol=1e-7, msg=lambda m, n=names: f"{n}: {m}"
        )
