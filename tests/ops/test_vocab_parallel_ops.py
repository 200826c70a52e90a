"""Vocab-parallel token statistics against an unsharded float64 full-vocabulary reference.

Every case runs both entry points (from logits, and fused from hidden states + weight shard) with a
loss that weights every output by random coefficients and a token mask, so the gradients of logp,
entropy, top-k logp and gathered logp are checked together. The vocabulary is padded the Megatron
way (to a multiple of 128 * tp) with large random padding logits, so a padding leak shows. World
size 1 runs in process (group None) and on gloo; 2 and 4 on gloo, all cases in one spawn per size.
Tolerances (fp32 vs the fp64 reference): values 1e-5 absolute; gradients 1e-5 relative in norm.
"""

import math
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from srpo_megatron.ops import (
    vocab_parallel_token_stats,
    vocab_parallel_token_stats_from_logits,
)
from srpo_megatron.runtime.launch import run_distributed

HIDDEN = 16
PAD_MULTIPLE = 128  # Megatron's make-vocab-size-divisible-by


@dataclass(frozen=True)
class Case:
    name: str
    true_vocab: int
    num_tokens: int
    chunk_size: int
    targets: bool = True
    topk: int = 0
    num_gather: int = 0
    entropy: bool = False
    seed: int = 0

    def padded_vocab(self, tp: int) -> int:
        multiple = PAD_MULTIPLE * tp
        return math.ceil(self.true_vocab / multiple) * multiple


CASES = [
    Case("all_outputs", true_vocab=1000, num_tokens=37, chunk_size=8, topk=20, num_gather=5, entropy=True),
    # At tp=4: shards of 128, the second holds 72 real ids, the last two only padding; k > shard size.
    Case("empty_shards", true_vocab=200, num_tokens=13, chunk_size=5, topk=150, num_gather=3, entropy=True),
    Case("logp_only", true_vocab=1000, num_tokens=6, chunk_size=16, seed=2),
    Case("entropy_only", true_vocab=300, num_tokens=9, chunk_size=4, targets=False, entropy=True, seed=3),
    Case("topk_only", true_vocab=300, num_tokens=9, chunk_size=2, targets=False, topk=7, seed=4),
    Case("gather_only", true_vocab=300, num_tokens=9, chunk_size=9, targets=False, num_gather=4, seed=5),
]
OUTPUTS = ("logp", "entropy", "topk_logp", "gathered_logp")


def make_inputs(case: Case, tp: int) -> dict[str, torch.Tensor]:
    """The full (unsharded) problem, identical on every rank."""
    g = torch.Generator().manual_seed(case.seed)
    num_tokens, padded = case.num_tokens, case.padded_vocab(tp)
    logits = 3 * torch.randn(num_tokens, padded, generator=g)
    logits[:, case.true_vocab :] += 20.0  # padding would dominate every statistic if it leaked
    weight = torch.randn(padded, HIDDEN, generator=g) / HIDDEN**0.25
    weight[case.true_vocab :] *= 10.0
    mask = (torch.rand(num_tokens, generator=g) > 0.3).double()
    mask[0] = 0.0
    return dict(
        logits=logits,
        hidden=torch.randn(num_tokens, HIDDEN, generator=g),
        weight=weight,
        targets=torch.randint(0, case.true_vocab, (num_tokens,), generator=g),
        gather_ids=torch.randint(0, case.true_vocab, (num_tokens, case.num_gather), generator=g),
        mask=mask,
        coef_logp=torch.randn(num_tokens, generator=g).double(),
        coef_entropy=torch.randn(num_tokens, generator=g).double(),
        coef_topk=torch.randn(num_tokens, case.topk, generator=g).double(),
        coef_gathered=torch.randn(num_tokens, case.num_gather, generator=g).double(),
    )


def weighted_loss(outputs: dict, inputs: dict) -> torch.Tensor:
    """sum_t mask_t (c1 logp + c2 H + c3 . topk_logp + c4 . gathered_logp): every output gets a gradient."""
    total = 0.0
    mask = inputs["mask"]
    for name, coef in (("logp", "coef_logp"), ("entropy", "coef_entropy")):
        if outputs[name] is not None:
            total = total + (mask * inputs[coef] * outputs[name].double()).sum()
    for name, coef in (("topk_logp", "coef_topk"), ("gathered_logp", "coef_gathered")):
        if outputs[name] is not None:
            total = total + (mask[:, None] * inputs[coef] * outputs[name].double()).sum()
    return total


def run_case(case: Case, group: dist.ProcessGroup | None, rank: int, tp: int) -> dict:
    """This rank's outputs and gradients, for both entry points."""
    inputs = make_inputs(case, tp)
    shard = case.padded_vocab(tp) // tp
    cols = slice(rank * shard, (rank + 1) * shard)
    options = dict(
        vocab_start=rank * shard,
        true_vocab_size=case.true_vocab,
        targets=inputs["targets"] if case.targets else None,
        topk=case.topk,
        gather_ids=inputs["gather_ids"] if case.num_gather else None,
        want_entropy=case.entropy,
        group=group,
        chunk_size=case.chunk_size,
    )
    results = {}

    logits = inputs["logits"][:, cols].clone().requires_grad_()
    stats = vocab_parallel_token_stats_from_logits(logits, **options)
    weighted_loss(stats._asdict(), inputs).backward()
    results["logits"] = dict(stats=_detached(stats), grads={"logits": logits.grad})

    hidden = inputs["hidden"].clone().requires_grad_()
    weight = inputs["weight"][cols].clone().requires_grad_()
    stats = vocab_parallel_token_stats(hidden, weight, **options)
    weighted_loss(stats._asdict(), inputs).backward()
    results["fused"] = dict(stats=_detached(stats), grads={"hidden": hidden.grad, "weight": weight.grad})
    return results


def _detached(stats) -> dict:
    return {k: v.detach() if v is not None else None for k, v in stats._asdict().items()}


def reference(case: Case, tp: int, variant: str) -> dict:
    """Full-vocabulary float64 outputs and gradients; padding gets zero gradient."""
    inputs = make_inputs(case, tp)
    vocab = case.true_vocab
    logits = inputs["logits"].double().requires_grad_()
    hidden = inputs["hidden"].double().requires_grad_()
    weight = inputs["weight"].double().requires_grad_()
    z = logits[:, :vocab] if variant == "logits" else hidden @ weight[:vocab].T  # [T, V]
    logp_all = z.log_softmax(dim=-1)  # [T, V]
    topk_logp, topk_ids = logp_all.topk(case.topk, dim=-1)
    outputs = dict(
        logp=logp_all.gather(1, inputs["targets"][:, None])[:, 0] if case.targets else None,
        entropy=-(logp_all.exp() * logp_all).sum(-1) if case.entropy else None,
        topk_ids=topk_ids if case.topk else None,
        topk_logp=topk_logp if case.topk else None,
        gathered_logp=logp_all.gather(1, inputs["gather_ids"]) if case.num_gather else None,
    )
    weighted_loss(outputs, inputs).backward()
    grads = {"logits": logits.grad} if variant == "logits" else {"hidden": hidden.grad, "weight": weight.grad}
    stats = {k: v.detach() if v is not None else None for k, v in outputs.items()}
    return dict(stats=stats, grads=grads, mask=inputs["mask"])


def check_against_reference(case: Case, tp: int, per_rank: list[dict]) -> None:
    for variant in ("logits", "fused"):
        ref = reference(case, tp, variant)
        for rank, result in enumerate(per_rank):
            stats = result[variant]["stats"]
            where = f"{case.name}/{variant}/rank {rank}"
            assert (stats["topk_ids"] is None) == (ref["stats"]["topk_ids"] is None), where
            if stats["topk_ids"] is not None:
                assert torch.equal(stats["topk_ids"], ref["stats"]["topk_ids"]), where
            for name in OUTPUTS:
                actual, expected = stats[name], ref["stats"][name]
                assert (actual is None) == (expected is None), f"{where}: {name}"
                if actual is not None:
                    assert actual.dtype == torch.float32
                    err = (actual.double() - expected).abs().max().item()
                    assert err <= 1e-5, f"{where}: {name} off by {err:.2e}"
        # Shard gradients along the vocabulary (logits columns, weight rows) back to the full one.
        if variant == "logits":
            full = {"logits": torch.cat([r["logits"]["grads"]["logits"] for r in per_rank], dim=1)}
        else:
            full = {"weight": torch.cat([r["fused"]["grads"]["weight"] for r in per_rank], dim=0)}
            for rank, result in enumerate(per_rank):  # the hidden gradient is all-reduced
                hidden_grad = result["fused"]["grads"]["hidden"]
                assert_grad_close(
                    hidden_grad, ref["grads"]["hidden"], f"{case.name}: grad hidden, rank {rank}"
                )
        for name, actual in full.items():
            assert_grad_close(actual, ref["grads"][name], f"{case.name}/{variant}: grad {name}")
            padding = actual[:, case.true_vocab :] if name == "logits" else actual[case.true_vocab :]
            assert not padding.any(), f"{case.name}: padding got a gradient"
        if variant == "logits":  # masked tokens get exactly zero gradient
            assert not full["logits"][ref["mask"] == 0].any()


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, where: str) -> None:
    assert actual.shape == expected.shape, where
    rel = (actual.double() - expected).norm() / expected.norm()
    assert rel <= 1e-5, f"{where}: relative error {rel:.2e}"


def run_all_cases() -> list[dict]:
    """Entry point of each spawned rank: every case on the world group."""
    group, rank, tp = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    return [run_case(case, group, rank, tp) for case in CASES]


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda tp: f"tp{tp}")
def gloo_results(request):
    tp = request.param
    per_rank = run_distributed(run_all_cases, world_size=tp, megatron=False, timeout=240)
    return tp, per_rank


@pytest.mark.parametrize("case_index", range(len(CASES)), ids=[c.name for c in CASES])
def test_gloo_matches_full_vocab_reference(gloo_results, case_index):
    tp, per_rank = gloo_results
    check_against_reference(CASES[case_index], tp, [results[case_index] for results in per_rank])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_no_group_matches_full_vocab_reference(case):
    check_against_reference(case, 1, [run_case(case, None, 0, 1)])


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_analytic_backward_passes_gradcheck(fused):
    g = torch.Generator().manual_seed(7)
    num_tokens, vocab, padded = 7, 40, 48
    hidden = torch.randn(num_tokens, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(padded, 6, generator=g, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(num_tokens, padded, generator=g, dtype=torch.float64, requires_grad=True)
    options = dict(
        vocab_start=0,
        true_vocab_size=vocab,
        targets=torch.randint(0, vocab, (num_tokens,), generator=g),
        topk=5,
        gather_ids=torch.randint(0, vocab, (num_tokens, 3), generator=g),
        want_entropy=True,
        chunk_size=3,
    )

    def outputs(*tensors):
        if fused:
            stats = vocab_parallel_token_stats(*tensors, **options)
        else:
            stats = vocab_parallel_token_stats_from_logits(*tensors, **options)
        return stats.logp, stats.entropy, stats.topk_logp, stats.gathered_logp

    assert torch.autograd.gradcheck(outputs, (hidden, weight) if fused else (logits,))


def test_teacher_at_student_ids_and_no_grad():
    """The SDPO flow: the student's top-k ids gathered by a teacher under no_grad."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(10, HIDDEN, generator=g)
    weight = torch.randn(256, HIDDEN, generator=g)
    common = dict(vocab_start=0, true_vocab_size=250, chunk_size=4)
    student = vocab_parallel_token_stats(hidden, weight.requires_grad_(), topk=12, **common)
    with torch.no_grad():
        teacher = vocab_parallel_token_stats(
            hidden, weight, gather_ids=student.topk_ids, want_entropy=True, **common
        )
    assert teacher.gathered_logp.grad_fn is None and teacher.logp is None and teacher.topk_ids is None
    torch.testing.assert_close(teacher.gathered_logp, student.topk_logp.detach(), rtol=0, atol=1e-6)
    assert (teacher.entropy > 0).all() and student.topk_logp.grad_fn is not None


def test_bf16_fused_path_keeps_fp32_statistics():
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(9, HIDDEN, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(128, HIDDEN, generator=g).bfloat16().requires_grad_()
    targets = torch.randint(0, 100, (9,), generator=g)
    stats = vocab_parallel_token_stats(
        hidden, weight, vocab_start=0, true_vocab_size=100, targets=targets, want_entropy=True, chunk_size=4
    )
    assert stats.logp.dtype == torch.float32 and stats.entropy.dtype == torch.float32
    (stats.logp.sum() + stats.entropy.sum()).backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    assert not weight.grad[100:].any()
    # The logits are rounded to bf16 (as by Megatron's output layer), the statistics are not.
    ref_logp = (hidden @ weight[:100].T).float().log_softmax(-1).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(stats.logp, ref_logp, rtol=0, atol=1e-5)


class _LargestAllocation(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_fused_path_never_materialises_all_logits():
    """Forward + backward allocate at most chunk x V/tp (or the weight gradient), never T x V/tp."""
    num_tokens, vocab, chunk, hidden_size = 64, 512, 8, 4
    hidden = torch.randn(num_tokens, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    with _LargestAllocation() as tracker:
        stats = vocab_parallel_token_stats(
            hidden,
            weight,
            vocab_start=0,
            true_vocab_size=vocab,
            targets=torch.randint(0, vocab, (num_tokens,)),
            topk=4,
            want_entropy=True,
            chunk_size=chunk,
        )
        (stats.logp.sum() + stats.topk_logp.sum() + stats.entropy.sum()).backward()
    assert tracker.largest == chunk * vocab  # the largest: one chunk's logits; T * V would be 8x that


def test_invalid_arguments_raise():
    logits = torch.randn(4, 128)
    common = dict(vocab_start=0, true_vocab_size=100)
    with pytest.raises(ValueError, match="token ids"):
        vocab_parallel_token_stats_from_logits(logits, targets=torch.tensor([0, 1, 2, 100]), **common)
    with pytest.raises(ValueError, match="token ids"):
        vocab_parallel_token_stats_from_logits(logits, gather_ids=torch.full((4, 2), -1), **common)
    with pytest.raises(ValueError, match="topk"):
        vocab_parallel_token_stats_from_logits(logits, topk=101, **common)
    with pytest.raises(ValueError, match="chunk_size"):
        vocab_parallel_token_stats_from_logits(logits, chunk_size=0, **common)
    with pytest.raises(ValueError, match="weight"):
        vocab_parallel_token_stats(torch.randn(4, 8), torch.randn(128, 7), **common)
