import random

import pytest

from tqlab.capture.run import capture_spec, run_capture

MODEL = {"name_or_path": "smollm2-135m", "dtype": "float32", "weight_load": "none"}
DATA = {
    "source": "wiki",
    "path": None,
    "seq_len": 64,
    "sequences": {"train": 2, "validation": 1, "test": 2},
    "split_fractions": [0.7, 0.15, 0.15],
    "seed": 0,
}
WORDS = "the a fox dog cat bird jumps runs flies over under past lazy quick brown small and then".split()


@pytest.fixture
def small_spec_parts():
    """(model, data) sections of a small capture of the real default model."""
    return dict(MODEL), dict(DATA)


@pytest.fixture(scope="session")
def small_spec():
    return capture_spec(MODEL, DATA, store_dtype="float32", shard_size=1)


@pytest.fixture(scope="session")
def small_capture(tmp_path_factory, smollm2, small_spec):
    return run_capture(small_spec, tmp_path_factory.mktemp("captures"), progress=False)


@pytest.fixture(scope="session")
def word_tokenizer():
    """Factory: a whitespace word-level tokenizer over WORDS; with bos=True it starts every text with <s>, as
    Gemma's and Llama-2's tokenizers do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    def make(bos: bool = False):
        vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        if bos:
            tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
        )

    return make


@pytest.fixture
def tiny_model(tmp_path, word_tokenizer):
    """Factory: a local model folder holding a tiny random Granite (its config sets the softmax scale,
    attention_multiplier) and the word tokenizer; returns the folder."""
    import torch
    from transformers import GraniteConfig, GraniteForCausalLM

    def make(name: str = "tiny-lm", bos: bool = False, **config):
        folder = tmp_path / "models" / name
        config = GraniteConfig(
            **{
                "vocab_size": len(WORDS) + 3,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "attention_multiplier": 0.25,
                "tie_word_embeddings": True,
                "bos_token_id": 1,
                "eos_token_id": 2,
                **config,
            }
        )
        torch.manual_seed(0)
        GraniteForCausalLM(config).save_pretrained(folder)
        word_tokenizer(bos).save_pretrained(folder)
        return folder

    return make


@pytest.fixture
def corpus(tmp_path):
    """A text file of 8 documents of 60 words each (documents separated by blank lines)."""
    rng = random.Random(0)
    path = tmp_path / "texts" / "corpus.txt"
    path.parent.mkdir()
    path.write_text("\n\n".join(" ".join(rng.choices(WORDS, k=60)) for _ in range(8)))
    return path


@pytest.fixture
def tiny_spec():
    """Factory: the spec of a small float32 capture of a local model folder on a text file, one sequence
    per shard (train 2, validation 1, test 1)."""

    def make(model_dir, text_file, seq_len: int = 16):
        model = {"name_or_path": str(model_dir), "dtype": "float32", "weight_load": "none"}
        data = {
            "source": "text_file",
            "path": str(text_file),
            "seq_len": seq_len,
            "sequences": {"train": 2, "validation": 1, "test": 1},
            "split_fractions": [0.5, 0.25, 0.25],
            "seed": 0,
        }
        return capture_spec(model, data, store_dtype="float32", shard_size=1)

    return make
