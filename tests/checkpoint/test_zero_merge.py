"""ZeRO partitions -> named tensors (megams.checkpoint.zero), against partitions cut the way DeepSpeed cuts them."""
import math

import pytest
import torch

from megams.checkpoint.zero import merge_zero12, merge_zero3

SHAPES = [{"a": (5, 3), "b": (7,)}, {"c": (2, 2), "d": (3, 1)}]


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(*s, generator=g) for group in SHAPES for n, s in group.items()}


@pytest.mark.parametrize("dp", [1, 2, 3])
def test_zero12_partitions_merge_back(dp):
    t = _tensors()
    parts = [[] for _ in range(dp)]
    for group in SHAPES:
        flat = torch.cat([t[n].reshape(-1) for n in group])
        total = 2 * dp * math.ceil(flat.numel() / (2 * dp))  # DeepSpeed aligns each group to 2 x dp
        flat = torch.cat([flat, flat.new_zeros(total - flat.numel())])
        for r, chunk in enumerate(flat.chunk(dp)):
            parts[r].append(chunk)
    merged = merge_zero12(SHAPES, parts)
    assert list(merged) == list(t)
    for n in t:
        assert torch.equal(merged[n], t[n])


@pytest.mark.parametrize("dp", [1, 2, 3])
def test_zero3_partitions_merge_back(dp):
    t = _tensors()
    parts = [[] for _ in range(dp)]
    for group in SHAPES:
        per_rank = [[] for _ in range(dp)]
        for n in group:
            flat = t[n].reshape(-1)
            size = math.ceil(flat.numel() / dp)
            flat = torch.cat([flat, flat.new_zeros(size * dp - flat.numel())])
            for r in range(dp):
                per_rank[r].append(flat[r * size:(r + 1) * size])
        for r in range(dp):
            parts[r].append(torch.cat(per_rank[r]))
    merged = merge_zero3(SHAPES, parts)
    for n in t:
        assert torch.equal(merged[n], t[n])


def test_partitions_of_the_wrong_size_are_refused():
    t = _tensors()
    flat = torch.cat([t[n].reshape(-1) for n in SHAPES[0]])
    with pytest.raises(ValueError, match="hold 10 elements, fewer than its parameters need"):
        merge_zero12(SHAPES[:1], [[flat[:10]]], where="x")
    with pytest.raises(ValueError, match="ZeRO-3 partitions hold 44 elements per rank, its parameters 22"):
        merge_zero3(SHAPES[:1], [[torch.cat([flat, flat])]], where="x")
