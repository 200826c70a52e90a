"""Megatron-core's own classes on CPU/gloo through our runtime: TP, PP (1F1B), DDP + optimizer,
dist_checkpointing. Each test compares against a reference computed in the same processes."""

import pytest
import torch

from srpo_megatron.runtime.distributed import ParallelLayout, init_distributed
from srpo_megatron.runtime.launch import run_distributed
from srpo_megatron.runtime.smoke import build_tiny_gpt, random_batch, train_steps

VOCAB, SEQ, BATCH, LAYERS = 96, 16, 4, 4


def _parallel_state():
    from megatron.core import parallel_state

    return parallel_state


def build_gpt(pre_process=True, post_process=True):
    return build_tiny_gpt(VOCAB, SEQ, LAYERS, pre_process=pre_process, post_process=post_process)


def _batch(seed=0):
    return random_batch(BATCH, SEQ, VOCAB, seed=seed)


def _loss(model, seed=0):
    tokens, labels, position_ids = _batch(seed)
    per_token = model(tokens, position_ids, attention_mask=None, labels=labels)  # [B, S]
    return per_token.float().mean()


def _forward_backward_tp():
    """Loss and gradient norm at this world's TP size."""
    init_distributed(ParallelLayout(tp=torch.distributed.get_world_size()))
    model = build_gpt()
    loss = _loss(model)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return loss.item(), shapes, model.embedding.word_embeddings.weight.grad.norm().item()


def test_tp2_forward_backward_matches_tp1():
    ((loss_ref, shapes_ref, _),) = run_distributed(_forward_backward_tp, world_size=1, megatron=False)
    results = run_distributed(_forward_backward_tp, world_size=2, megatron=False)
    (loss0, shapes0, _), (loss1, _, _) = results
    assert loss0 == loss1  # every TP rank sees the same (vocab-parallel) loss
    assert loss0 == pytest.approx(loss_ref, abs=1e-5)
    # column-parallel QKV and vocab-parallel embedding are split in two
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert shapes0[qkv][0] * 2 == shapes_ref[qkv][0]
    emb = "embedding.word_embeddings.weight"
    assert shapes0[emb][0] * 2 == shapes_ref[emb][0]


def _pipeline_loss(num_microbatches=4):
    """Loss through Megatron's schedule at this world's PP size, on weights copied from PP=1."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    world = torch.distributed.get_world_size()
    # reference weights: the full model built at PP=1 (identical on every rank: same seed)
    init_distributed(ParallelLayout())
    full_state = build_gpt().state_dict()

    init_distributed(ParallelLayout(pp=world))
    ps = _parallel_state()
    model = build_gpt(pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    offset = ps.get_pipeline_model_parallel_rank() * (LAYERS // world)
    local_state = {}
    for key in model.state_dict():
        src = key
        if key.startswith("decoder.layers."):
            idx = int(key.split(".")[2])
            src = key.replace(f"decoder.layers.{idx}.", f"decoder.layers.{idx + offset}.", 1)
        local_state[key] = full_state[src]
    model.load_state_dict(local_state)

    def forward_step(data_iterator, model):
        tokens, labels, position_ids = next(data_iterator)
        output = model(tokens, position_ids, attention_mask=None, labels=labels)

        def loss_func(per_token):
            loss = per_token.float().mean()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    micro = [_batch(seed=i) for i in range(num_microbatches)]
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro),
        model=[model],
        num_microbatches=num_microbatches,
        seq_length=SEQ,
        micro_batch_size=BATCH,
        forward_only=False,
    )
    if not ps.is_pipeline_last_stage():
        return None
    return [d["loss"].item() for d in losses]


def test_pp2_one_f_one_b_matches_pp1():
    (ref,) = run_distributed(_pipeline_loss, world_size=1, megatron=False)
    stage0, stage1 = run_distributed(_pipeline_loss, world_size=2, megatron=False)
    assert stage0 is None and len(ref) == 4
    assert stage1 == pytest.approx(ref, abs=1e-5)


def test_ddp_optimizer_steps_lower_the_loss():
    losses0, losses1 = run_distributed(train_steps, world_size=2, layout=ParallelLayout(tp=2), args=(6,))
    assert losses0 == losses1
    assert losses0[-1] < losses0[0] - 0.1, losses0


def _save_and_load(ckpt_dir):
    from megatron.core import dist_checkpointing

    model = build_gpt()
    with torch.no_grad():  # make the weights differ from a fresh init
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in model.state_dict().items() if v is not None}
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)

    fresh = build_gpt()
    loaded = dist_checkpointing.load(fresh.sharded_state_dict(), ckpt_dir)
    fresh.load_state_dict(loaded, strict=False)
    after = fresh.state_dict()
    mismatched = [k for k, v in before.items() if not torch.equal(v, after[k])]
    return len(before), mismatched


def test_dist_checkpointing_round_trip_is_bitwise(tmp_path):
    (tmp_path / "ckpt").mkdir()
    results = run_distributed(
        _save_and_load, world_size=2, layout=ParallelLayout(tp=2), args=(str(tmp_path / "ckpt"),)
    )
    for num_tensors, mismatched in results:
        assert num_tensors > 10
        assert mismatched == []


def _fails_on_rank_one():
    if torch.distributed.get_rank() == 1:
        raise RuntimeError("boom on rank one")
    return 0


def test_child_traceback_reaches_the_parent():
    with pytest.raises(ChildProcessError, match="boom on rank one"):
        run_distributed(_fails_on_rank_one, world_size=2, megatron=False, timeout=60)


def _hangs():
    if torch.distributed.get_rank() == 0:
        import time

        time.sleep(120)


def test_hang_ends_in_timeout():
    with pytest.raises(TimeoutError):
        run_distributed(_hangs, world_size=2, megatron=False, timeout=5)
