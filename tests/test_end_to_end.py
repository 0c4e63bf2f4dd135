"""eval.py task=perplexity|niah|generate on the real SmolLM2 with short settings: rows per schema, honest bytes,
and the uncompressed reference equal to the model's own forward pass."""

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from tqlab import tasks
from tqlab.results import read_results

ROOT = Path(__file__).parents[1]
SHORT = [
    "logger=none", "progress=false", "kv=full_kv", "rotation=fast_hadamard", "bits=4",
    "perplexity.context=32", "perplexity.stride=16", "perplexity.max_windows=2",
    "niah.contexts=[96]", "niah.depths=[0.5]", "generate.prompts=1", "generate.prompt_len=16",
    "generate.max_new_tokens=4",
]  # fmt: skip


def run(tmp_path, *overrides, captures=None):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        c = compose(config_name="eval", overrides=[*SHORT, *overrides])
    c.results_root, c.output_dir = str(tmp_path / "runs"), str(tmp_path / "out")
    c.store.root = str(captures or tmp_path / "captures")
    return read_results(tasks.evaluate(c).folder)


@pytest.fixture(scope="module")
def small_captures(tmp_path_factory):
    """One folder of captures shared by the calibrated codecs' runs (made by the first of them)."""
    return tmp_path_factory.mktemp("captures")


def test_perplexity_rows_bytes_and_the_reference_forward_pass(tmp_path, smollm2):
    summary, rows = run(tmp_path, "task=perplexity")
    assert len(rows) == 2 and {r["task"] for r in rows} == {"perplexity"}
    assert len({r["document"] for r in rows}) == 2  # one window per document (data.windows_per_document)
    assert rows[0]["window"] == 0 and rows[0]["tokens"] == 31  # a document's first window scores all but one
    per_token = 30 * 3 * 2 * (64 * 4 // 8 + 2)  # layers × KV heads × (K, V) × (4-bit payload + fp16 norm)
    assert rows[0]["cache_bytes_per_token"] == per_token
    assert rows[0]["reference_bytes_per_token"] == 30 * 3 * 2 * 64 * 4  # float32 keys and values
    overall = summary["overall"]
    assert overall["perplexity"] == pytest.approx(math.exp(overall["nll"]))
    assert overall["nll_increase"] == pytest.approx(
        overall["nll"] - overall["nll_reference"]
    )  # all per token
    assert 0 < overall["final_hidden_cosine"] <= 1 and overall["next_token_kl"] > 0
    assert len(summary["per_layer_hidden"]["hidden_cosine"]) == 31  # embeddings + 30 layers
    # the reference NLL is the model's own: recompute the first window with a plain forward pass
    from tqlab.capture.run import capture_spec, split_texts
    from tqlab.config import data_section, model_section

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        c = compose(config_name="eval", overrides=SHORT)
    doc = split_texts(capture_spec(model_section(c), data_section(c)))["test"][0]
    ids = torch.tensor(smollm2.tokenizer(doc.text, add_special_tokens=False)["input_ids"][:32])
    with torch.no_grad():
        logp = smollm2.model(ids[None]).logits[0].double().log_softmax(-1)
    want = -sum(float(logp[t, ids[t + 1]]) for t in range(31)) / 31
    row = next(r for r in rows if r["document"] == doc.title)
    assert row["window"] == 0 and row["nll_reference"] == pytest.approx(want, abs=1e-4)


def test_needle_and_generation_rows(tmp_path, smollm2):
    summary, rows = run(tmp_path, "task=niah")
    assert len(rows) == 1 and rows[0]["context"] == 96 and rows[0]["depth"] == 0.5
    assert rows[0]["found"] in (0, 1) and rows[0]["found_reference"] in (0, 1)
    assert rows[0]["cache_bytes_per_token"] == 30 * 3 * 2 * (64 * 4 // 8 + 2)  # every token coded at 4 bits
    assert rows[0]["reference_bytes_per_token"] == 30 * 3 * 2 * 64 * 4
    summary, rows = run(tmp_path, "task=generate", "logger=csv")
    assert len(rows) == 1 and 0 <= rows[0]["divergence"] <= 4
    assert rows[0]["agreement"] == rows[0]["divergence"] / 4
    assert json.loads(json.dumps(summary))["overall"].keys() == {"divergence", "agreement"}
    assert summary["overall"]["agreement"] == rows[0]["agreement"]
    (logged,) = (tmp_path / "out").rglob("metrics.csv")  # the CSV logger holds the run's overall metrics
    header, values = logged.read_text().splitlines()[:2]
    assert float(values.split(",")[header.split(",").index("agreement")]) == rows[0]["agreement"]


def test_sinks_and_the_recent_window_are_kept_exact_and_counted(tmp_path, smollm2):
    summary, rows = run(tmp_path, "task=perplexity", "cache.sink_tokens=4", "cache.recent_window=8")
    assert rows[0]["sink_tokens"] == 4 and rows[0]["recent_window"] == 8
    exact, coded = 4 + 8, 32 - 4 - 8  # of a 32-token window
    per_vector = {"exact": 64 * 4, "coded": 64 * 4 // 8 + 2}  # float32 | 4-bit payload + fp16 norm
    per_window = 30 * 3 * 2 * (exact * per_vector["exact"] + coded * per_vector["coded"])
    assert rows[0]["cache_bytes_per_token"] == per_window / 32


@pytest.mark.parametrize(
    "overrides,key_bytes,value_bytes",
    [  # per (layer, KV head) and token: what each side stores
        (
            ["k_codec=int8_block", "k_bits=8", "bits=3"],
            64 + 2 * 2,
            64 * 3 // 8 + 2,
        ),  # q8_0: int8 + fp16 per 32
        (["codec=protected_channels", "rotation=identity", "bits=2", "kv=value_only"], 64 * 4, 16 + 6 + 14),
        (["codec=relevance_gated", "bits=2", "kv=key_only"], None, 64 * 4),  # gated: between its tiers
    ],
)
def test_the_seeds_options_run_end_to_end_with_honest_bytes(
    tmp_path, smollm2, small_captures, overrides, key_bytes, value_bytes
):
    """Asymmetric lanes, protected values and gated keys through the model (the last two calibrated on a small
    capture made on the fly)."""
    capture = ["data.seq_len=32", "data.sequences={train:2,validation:1,test:2}"]
    summary, rows = run(tmp_path, "task=perplexity", *capture, *overrides, captures=small_captures)
    per_token = rows[0]["cache_bytes_per_token"] / (30 * 3)  # over layers × KV heads
    if (
        key_bytes is None
    ):  # keys: each a 2-bit (18 B) or 4-bit (34 B) code with its flag bit; 32 = 4 whole groups
        assert 18 + 1 / 8 < per_token - value_bytes < 34 + 1 / 8
    else:
        assert per_token == pytest.approx(key_bytes + value_bytes, abs=1e-9)
    assert 0 < summary["overall"]["final_hidden_cosine"] <= 1
