"""Both encoders of the rotated domain (binary search on CUDA, compare passes on CPU) give the same codes."""

import pytest
import torch

from tqlab.quant.codebook import lloyd_max_codebook
from tqlab.quant.mse import count_below


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_search_and_compare_passes_count_the_same_boundaries_ties_included(bits):
    _, boundaries = lloyd_max_codebook(64, bits)
    boundaries = torch.tensor(boundaries, dtype=torch.float32)
    y = torch.cat([torch.randn(5000, generator=torch.Generator().manual_seed(bits)) / 8, boundaries])
    brute = torch.tensor([sum(float(b) < float(v) for b in boundaries) for v in y])  # ties: not below
    for search in (True, False):
        got = count_below(y, boundaries, search)
        assert got.dtype == torch.uint8 and torch.equal(got.long(), brute)
