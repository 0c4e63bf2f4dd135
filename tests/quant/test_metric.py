"""Keys coded in the query metric: the maps are exact inverses, scores match decoded keys, and the expected
logit error falls where queries ignore the directions in which keys are large."""

import pytest
import torch

from tqlab.quant import QueryWeighted, TurboQuantMSE, query_metric_maps


def _anisotropic(n, scales, seed):
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(
        torch.randn(len(scales), len(scales), generator=torch.Generator().manual_seed(99))
    )
    return (torch.randn(n, len(scales), generator=g) * torch.tensor(scales)) @ basis.T


def test_the_key_map_is_inverted_by_the_transposed_query_map_and_scores_match_decoded_keys():
    queries = _anisotropic(500, torch.linspace(0.1, 3, 32).tolist(), 0)
    key_map, query_map = query_metric_maps(queries)
    torch.testing.assert_close(key_map @ query_map.T, torch.eye(32), atol=1e-5, rtol=0)
    codec = QueryWeighted(TurboQuantMSE(32, 3, "fast_hadamard", seed=1), key_map, query_map)
    keys = torch.randn(40, 32)
    code = codec.quantize(keys)
    q = torch.randn(5, 32, dtype=torch.float64)
    torch.testing.assert_close(
        codec.score(q, code).double(), q @ codec.dequantize(code).double().T, atol=1e-4, rtol=1e-5
    )


def test_coding_in_the_query_metric_lowers_the_expected_logit_error():
    # queries read mostly the first half of the directions, keys are large in the second half
    d = 32
    q_scales = [3.0] * (d // 2) + [0.1] * (d // 2)
    k_scales = [0.3] * (d // 2) + [3.0] * (d // 2)
    train_q, test_q = _anisotropic(4000, q_scales, 1), _anisotropic(2000, q_scales, 2)
    keys = _anisotropic(2000, k_scales, 3)
    plain = TurboQuantMSE(d, 3, "fast_hadamard", seed=0)
    weighted = QueryWeighted(TurboQuantMSE(d, 3, "fast_hadamard", seed=0), *query_metric_maps(train_q, 0.0))
    exact = test_q @ keys.T
    errors = {
        name: ((codec.score(test_q, codec.quantize(keys)) - exact) ** 2).mean()
        for name, codec in (("plain", plain), ("weighted", weighted))
    }
    # both errors ≈ D(b) × the coded energy: ‖k‖²·tr(Σq)/d plain, kᵀΣq k weighted (the same basis here)
    sq, sk = torch.tensor(q_scales) ** 2, torch.tensor(k_scales) ** 2
    theory = float(sq.sum() * sk.sum() / d / (sq * sk).sum())  # ≈ 45
    assert float(errors["plain"] / errors["weighted"]) == pytest.approx(theory, rel=0.2)
