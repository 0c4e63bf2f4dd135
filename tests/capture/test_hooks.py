"""The recorder on architectures the offline models do not cover: sliding-window layers (a tiny random Qwen2),
and the metrics' window mask checked against the model's own attention."""

import torch

from tqlab.capture.hooks import AttentionRecorder
from tqlab.metrics.attention import causal_mask


def test_sliding_window_layers_record_their_window_and_recompute_with_it():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,  # layer 0 full attention, layer 1 sliding
        layer_types=["full_attention", "sliding_attention"],
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    ids = torch.randint(0, 100, (1, 24))
    with torch.no_grad(), AttentionRecorder(model, record_output=True) as rec:
        model(ids, use_cache=False)
    assert rec.layers[0].sliding_window is None and rec.layers[1].sliding_window == 8
    for layer, window in ((0, None), (1, 8)):
        r = rec.layers[layer]
        q, k, v = (
            r.query[0].double(),
            r.key[0].double().repeat_interleave(2, 0),
            r.value[0].double().repeat_interleave(2, 0),
        )
        visible = causal_mask(
            24, 24, window=window or 0
        )  # the mask the metrics use, checked against the model
        scores = (q @ k.transpose(-1, -2) * r.scaling).masked_fill(~visible, float("-inf"))
        torch.testing.assert_close(
            scores.softmax(-1) @ v, r.output[0].transpose(0, 1).double(), atol=1e-5, rtol=1e-4
        )


def test_layers_that_never_call_attention_are_not_recorded():
    # a hybrid model's linear-attention layers do not go through the attention interface: stand one in
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2
    )
    model = LlamaForCausalLM(config).eval()
    model.model.layers[1].self_attn.forward = lambda hidden_states, *a, **k: (
        torch.zeros_like(hidden_states),
        None,
    )
    with torch.no_grad(), AttentionRecorder(model) as rec:
        model(torch.randint(0, 50, (1, 6)), use_cache=False)
    assert sorted(rec.layers) == [0, 2]
