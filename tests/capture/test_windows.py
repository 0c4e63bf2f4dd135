"""Windows are drawn across documents (at most data.windows_per_document each) and the manifest says which."""

import pytest
from safetensors import safe_open

from tqlab.capture import run as capture_run
from tqlab.capture.run import capture_spec, run_capture
from tqlab.capture.store import CaptureError, CaptureStore
from tqlab.capture.text import Document, split_documents, token_windows, wiki_documents


def tokens(tokenizer, doc: Document) -> list[int]:
    return tokenizer(doc.text, add_special_tokens=False)["input_ids"]


def test_each_sequence_is_the_first_tokens_of_its_own_recorded_document(small_capture, smollm2):
    store = CaptureStore(small_capture)
    spec = store.manifest["spec"]["data"]
    assert spec["windows_per_document"] == 1
    docs = split_documents(wiki_documents(), tuple(spec["split_fractions"]), spec["seed"])
    for split, info in store.manifest["splits"].items():
        stored = []
        for shard in info["shards"]:
            with safe_open(str(small_capture / split / shard["file"]), framework="pt") as f:
                stored += f.get_tensor("input_ids").tolist()
        assert len(info["windows"]) == len(stored) == store.num_sequences(split)
        assert len({w["document"] for w in info["windows"]}) == len(stored)  # one window per document
        for i, (w, ids) in enumerate(zip(info["windows"], stored, strict=True)):
            doc = docs[split][w["document"]]
            assert w["title"] == doc.title == info["documents"][w["document"]] == store.document_of(split, i)
            assert w["window"] == 0 and ids == tokens(smollm2.tokenizer, doc)[: spec["seq_len"]]


def test_at_most_k_windows_per_document_short_documents_give_none(smollm2):
    tok, seq_len = smollm2.tokenizer, 32
    docs = [Document("stub", "A stub."), *wiki_documents()[:3]]
    assert len(tokens(tok, docs[0])) < seq_len and all(len(tokens(tok, d)) >= 3 * seq_len for d in docs[1:])
    windows = token_windows(tok, docs, seq_len, n=5, per_document=2)
    assert [(w.document, w.window) for w in windows] == [(1, 0), (1, 1), (2, 0), (2, 1), (3, 0)]
    for w in windows:
        assert w.title == docs[w.document].title
        assert w.ids == tokens(tok, docs[w.document])[w.window * seq_len : (w.window + 1) * seq_len]
    # WikiText-2 (one document per split): no cap, consecutive windows of the one document
    consecutive = token_windows(tok, docs[1:2], seq_len, n=3, per_document=None)
    assert [(w.document, w.window) for w in consecutive] == [(0, 0), (0, 1), (0, 2)]


def test_windows_per_document_is_part_of_the_capture_spec(small_spec_parts):
    model, data = small_spec_parts
    assert capture_spec(model, data)["data"]["windows_per_document"] == 1
    assert capture_spec(model, {**data, "windows_per_document": 2}) != capture_spec(model, data)
    wikitext2 = {**data, "source": "wikitext2", "split_fractions": None, "windows_per_document": 2}
    assert capture_spec(model, wikitext2)["data"]["windows_per_document"] is None  # does not apply there
    with pytest.raises(ValueError, match="data.windows_per_document=0 must be a positive integer"):
        capture_spec(model, {**data, "windows_per_document": 0})


def test_too_few_documents_name_the_key_and_the_fix_before_any_forward(
    tmp_path, monkeypatch, smollm2, small_spec_parts
):
    model, data = small_spec_parts
    monkeypatch.setattr(capture_run, "load_model", lambda **_: smollm2)
    monkeypatch.setattr(capture_run, "_forward", lambda *_: pytest.fail("no forward for an impossible split"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Document {i}. " + "A fox jumps over a dog. " * 30 for i in range(10)))
    spec = capture_spec(model, {**data, "source": "text_file", "path": str(corpus)})  # test: 1 doc, 2 wanted
    with pytest.raises(
        CaptureError,
        match=r"data\.sequences\.test=2, but the 1 documents of split 'test' give only 1 windows of "
        r"data\.seq_len=64 tokens with data\.windows_per_document=1 .*raise data\.windows_per_document.*"
        r"shorten data\.seq_len or lower data\.sequences\.test to at most 1",
    ):
        run_capture(spec, tmp_path / "captures", progress=False)


def test_windows_start_the_way_the_tokenizer_starts_a_text(word_tokenizer, small_capture):
    docs = [Document("one", " ".join(["the quick brown fox"] * 10)), Document("two", "a lazy dog " * 10)]
    plain, with_bos = word_tokenizer(bos=False), word_tokenizer(bos=True)
    assert with_bos("fox")["input_ids"] == [with_bos.bos_token_id, *plain("fox")["input_ids"]]
    windows = token_windows(with_bos, docs, seq_len=8, n=3, per_document=2)
    assert [(w.document, w.window) for w in windows] == [(0, 0), (0, 1), (1, 0)]
    for w in windows:
        text = tokens(with_bos, docs[w.document])
        assert w.ids == [with_bos.bos_token_id] + text[w.window * 7 : (w.window + 1) * 7]
    for w in token_windows(plain, docs, seq_len=8, n=3, per_document=2):
        assert w.ids == tokens(plain, docs[w.document])[w.window * 8 : (w.window + 1) * 8]
    # SmolLM2's tokenizer adds no BOS (tokenizer("x") is one token), so its windows are text only
    assert CaptureStore(small_capture).manifest["starts_with_bos"] is False


def test_a_capture_with_a_bos_tokenizer_records_and_stores_bos_first(tmp_path, tiny_model, corpus, tiny_spec):
    store = CaptureStore(run_capture(tiny_spec(tiny_model(bos=True), corpus), tmp_path, progress=False))
    assert store.manifest["starts_with_bos"] is True
    with safe_open(str(store.path / "test" / "shard_00000.safetensors"), framework="pt") as f:
        ids = f.get_tensor("input_ids")
    assert ids.shape == (1, 16) and ids[0, 0] == 1 and (ids[0, 1:] != 1).all()
