"""Verify mode: does the engine hold what the trainer sent?

A checksum per tensor is ``(sum in float64, sha256 of the raw bytes)``: the hash catches any bit
flip, the sum tells a reader *how far* off a mismatch is (a transposed or wrongly split tensor keeps
its sum; a scaled or stale one does not). On the trainer side ``record_checksums`` wraps the
exported stream (one pass, nothing kept but the checksums); on the engine side the HF engine gives
``named_weights()`` (``rollout.verify_sync``, HF engine only: SGLang shows a truncated view of a
weight at most; the tests read the stand-in server's checksums instead). Verifying costs a hash
over every byte, on every sync.
"""

import hashlib
from collections.abc import Iterable, Iterator, Mapping

import torch

Checksum = tuple[float, str]


def tensor_checksum(tensor: torch.Tensor) -> Checksum:
    t = tensor.detach().contiguous().cpu()
    digest = hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    return float(t.double().sum()), digest


def weight_checksums(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, Checksum]:
    return {name: tensor_checksum(t) for name, t in named_tensors}


def record_checksums(
    named_tensors: Iterable[tuple[str, torch.Tensor]], into: dict[str, Checksum]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass the stream through unchanged, filling ``into`` with each tensor's checksum."""
    for name, tensor in named_tensors:
        into[name] = tensor_checksum(tensor)
        yield name, tensor


def compare_checksums(expected: Mapping[str, Checksum], actual: Mapping[str, Checksum]) -> list[str]:
    """Human-readable problems, empty when the engine matches. ``actual`` may hold more names than
    ``expected`` (e.g. a partial sync); names the trainer sent but the engine lacks are reported."""
    problems = []
    for name, (sum_expected, hash_expected) in expected.items():
        if name not in actual:
            problems.append(f"{name}: missing on the engine")
            continue
        sum_actual, hash_actual = actual[name]
        if hash_actual != hash_expected:
            problems.append(f"{name}: bytes differ (sum trainer {sum_expected:.6g}, engine {sum_actual:.6g})")
    return problems
