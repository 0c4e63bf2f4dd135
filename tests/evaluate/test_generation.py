"""Generation agreement and the needle prompt, on a tiny model, checked against brute force."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tqlab.evaluate.generation import compare_generation
from tqlab.evaluate.needle import NEEDLE, QUESTION, needle_prompt
from tqlab.kv import KVQuantSpec


def test_divergence_is_the_first_differing_token_of_two_greedy_continuations():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    model = LlamaForCausalLM(
        config
    ).eval()  # eos 2: token 0 is an ordinary token, as "!" is in Qwen2's vocabulary
    prompt = torch.tensor([5, 17, 0, 33, 0, 41, 8, 9, 60, 12])
    spec = KVQuantSpec.create("turboquant_mse", 1, "random_haar", compress=("key", "value"), head_dim=16)
    got = compare_generation(model, prompt, spec, {"protocol": "all_quantized"}, max_new_tokens=12)
    ids = prompt[None]
    with torch.no_grad():  # brute force: the whole sequence forward at every step, no cache, no generate
        for _ in range(12):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert got["reference"] == ids[0, 10:].tolist()
    a, b = got["reference"], got["compressed"]
    first = next((i for i in range(12) if a[i] != b[i]), 12)  # brute force
    assert got["divergence"] == first and got["agreement"] == first / 12


class WordTokenizer:
    """Whitespace words as tokens: enough to check where the needle lands."""

    def __init__(self):
        self.vocab = {}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]}


def test_the_needle_sits_at_its_depth_and_the_prompt_has_the_context_length():
    tok = WordTokenizer()
    haystack = [1000 + i for i in range(200)]
    needle = tok(" " + NEEDLE.format(value="7421") + " ")["input_ids"]
    question = tok(QUESTION)["input_ids"]
    for depth in (0.0, 0.5, 1.0):
        ids = needle_prompt(tok, haystack, 60, depth, "7421").tolist()
        assert len(ids) == 60 and ids[-len(question) :] == question
        at = next(i for i in range(len(ids)) if ids[i : i + len(needle)] == needle)
        room = 60 - len(needle) - len(question)
        assert at == round(depth * room)


def test_a_haystack_that_starts_with_bos_keeps_it_first_at_every_depth():
    tok = WordTokenizer()
    tok.bos_token_id = 999
    haystack = [999] + [1000 + i for i in range(200)]
    needle = tok(" " + NEEDLE.format(value="7421") + " ")["input_ids"]
    room = 60 - len(needle) - len(tok(QUESTION)["input_ids"])
    for depth in (0.0, 0.5, 1.0):
        ids = needle_prompt(tok, haystack, 60, depth, "7421").tolist()
        at = next(i for i in range(len(ids)) if ids[i : i + len(needle)] == needle)
        assert ids[0] == 999 and ids.count(999) == 1 and len(ids) == 60
        assert at == 1 + round(depth * (room - 1))
