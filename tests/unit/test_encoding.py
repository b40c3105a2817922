"""Spec of taskserver.encoding: deterministic float32 embeddings, the content cache, files, bad input."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "true")

import numpy as np
import pytest

from taskserver import encoding
from taskserver.encoding import EmbeddingCache, Embeddings, encode_texts
from taskserver.errors import EncodingInputError, InvalidInputError

TEXTS = [
    "The cat sat on the mat.",
    "Stock markets fell sharply after the announcement.",
    "A recipe for sourdough bread needs flour, water and salt.",
    "The goalkeeper saved a penalty in the final minute.",
]

pytestmark = pytest.mark.torch_threads(1)




class CountingModel:
    """Counts texts passed to the pooling view's ``encode`` (the one place the model runs)."""

    def __init__(self, monkeypatch):
        self.texts = 0
        view = encoding._pooling_view(encoding.get_encoder())
        original = view.encode

        def counted(inputs, *args, **kwargs):
            self.texts += len(inputs)
            return original(inputs, *args, **kwargs)

        monkeypatch.setattr(view, "encode", counted)


def test_vectors_are_float32_384_dims_in_input_order_with_ids():
    result = encode_texts(TEXTS, ids=["a", "b", "c", "d"])
    assert result.vectors.shape == (4, 384)
    assert result.vectors.dtype == np.float32
    assert result.ids == ["a", "b", "c", "d"]
    alone = encode_texts([TEXTS[2]])
    np.testing.assert_allclose(result.vectors[2], alone.vectors[0], atol=1e-5)


def test_default_ids_are_positions():
    assert encode_texts(TEXTS[:2]).ids == ["0", "1"]


def test_same_input_gives_bit_identical_vectors():
    first = encode_texts(TEXTS, batch_size=2)
    second = encode_texts(TEXTS, batch_size=2)
    assert np.array_equal(first.vectors, second.vectors)


def test_matches_bare_sentence_transformers():
    model = encoding.get_encoder()
    bare = model.encode(TEXTS, batch_size=64, convert_to_numpy=True)
    assert np.array_equal(encode_texts(TEXTS).vectors, bare)


def test_normalize_gives_unit_vectors_and_off_keeps_raw_lengths():
    unit = encode_texts(TEXTS, normalize=True).vectors
    raw = encode_texts(TEXTS, normalize=False).vectors
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    norms = np.linalg.norm(raw, axis=1)
    assert np.all(np.abs(norms - 1.0) > 0.1), "the model's own Normalize layer must be bypassed"
    np.testing.assert_allclose(raw / norms[:, None], unit, atol=1e-5)


def test_encoder_is_loaded_once_per_process():
    assert encoding.get_encoder() is encoding.get_encoder()


def test_cache_hit_skips_the_model(data_dir, monkeypatch):
    cache = EmbeddingCache()
    assert cache.path == data_dir / "cache" / "embeddings.sqlite"
    counter = CountingModel(monkeypatch)
    first = encode_texts(TEXTS, cache=cache)
    assert counter.texts == 4 and first.encoded == 4 and first.cache_hits == 0
    second = encode_texts(TEXTS, cache=cache)
    assert counter.texts == 4, "a warm cache must not run the model"
    assert second.cache_hits == 4 and second.encoded == 0
    assert np.array_equal(first.vectors, second.vectors)
    # A new cache object on the same file (another process) sees the same entries.
    third = encode_texts(TEXTS[:2] + ["Something never seen before."], cache=EmbeddingCache(cache.path))
    assert (third.cache_hits, third.encoded, counter.texts) == (2, 1, 5)


def test_cache_keys_separate_normalised_and_raw_vectors(tmp_path):
    cache = EmbeddingCache(tmp_path / "c.sqlite")
    unit = encode_texts(TEXTS[:2], normalize=True, cache=cache)
    raw = encode_texts(TEXTS[:2], normalize=False, cache=cache)
    assert raw.cache_hits == 0
    assert not np.allclose(unit.vectors, raw.vectors)


def test_duplicate_texts_run_through_the_model_once(tmp_path, monkeypatch):
    counter = CountingModel(monkeypatch)
    result = encode_texts([TEXTS[0], TEXTS[1], TEXTS[0]], cache=EmbeddingCache(tmp_path / "c.sqlite"))
    assert counter.texts == 2
    assert np.array_equal(result.vectors[0], result.vectors[2])


def test_very_long_text_is_clipped_to_the_same_embedding(monkeypatch):
    sentence = "The quick brown fox jumps over the lazy dog near the river bank. "
    huge = (sentence * 16_000)[:1_000_000]
    seen: list[int] = []
    view = encoding._pooling_view(encoding.get_encoder())
    original = view.encode
    monkeypatch.setattr(view, "encode", lambda inputs, *a, **kw: seen.extend(map(len, inputs)) or original(inputs, *a, **kw))
    clipped = encode_texts([huge]).vectors
    assert max(seen) < 20_000, "the model must not receive the whole megabyte"
    bare = encoding.get_encoder().encode([huge[:6000]], convert_to_numpy=True)
    assert np.array_equal(clipped, bare)


def test_clip_keeps_short_texts_and_grows_for_sparse_long_ones():
    tokenizer = encoding.get_encoder().tokenizer
    assert encoding.clip_text("short text", tokenizer, 256) == "short text"
    spaced = "word" + " " * 50_000 + " ".join(["token"] * 400)
    clipped = encoding.clip_text(spaced, tokenizer, 256)
    assert len(tokenizer(clipped, add_special_tokens=False)["input_ids"]) >= 256


@pytest.mark.parametrize(
    ("texts", "named", "reason"),
    [
        ([], "texts", "no texts"),
        (["fine", ""], "texts[1] (id '1')", "empty text"),
        (["fine", "   "], "texts[1] (id '1')", "only whitespace"),
        (["fine", 42], "texts[1] (id '1')", "not a string (got int)"),
        ([None, "fine"], "texts[0] (id '0')", "missing text"),
    ],
)
def test_bad_input_error_names_the_item_and_reason(texts, named, reason):
    with pytest.raises(EncodingInputError) as caught:
        encode_texts(texts)
    assert named in str(caught.value)
    assert reason in str(caught.value)


def test_every_bad_text_is_named_with_its_id():
    with pytest.raises(EncodingInputError) as caught:
        encode_texts(["ok", "", 7, "ok too"], ids=["p", "q", "r", "s"])
    message = str(caught.value)
    assert "2 of 4 texts" in message
    assert "texts[1] (id 'q'): empty text" in message
    assert "texts[2] (id 'r'): not a string" in message


def test_ids_must_match_texts_and_be_unique():
    with pytest.raises(EncodingInputError, match="ids: 1 ids for 2 texts"):
        encode_texts(["a", "b"], ids=["x"])
    with pytest.raises(EncodingInputError, match=r"ids\[1\]: duplicate id 'x'"):
        encode_texts(["a", "b"], ids=["x", "x"])


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_save_and_load_round_trip(data_dir, suffix):
    original = encode_texts(TEXTS, ids=["a", "b", "c", "d"], normalize=False)
    location = encoding.save_embeddings(original, f"out/emb{suffix}")
    assert location == str(data_dir / "out" / f"emb{suffix}")
    assert not [name for name in os.listdir(data_dir / "out") if name.endswith(".tmp")]
    loaded = encoding.load_embeddings(f"out/emb{suffix}")
    assert loaded.ids == original.ids
    assert loaded.vectors.dtype == np.float32
    assert np.array_equal(loaded.vectors, original.vectors)
    assert loaded.model == original.model and loaded.model.startswith("all-MiniLM-L6-v2:")
    assert loaded.normalized is False


def test_load_rejects_a_file_that_is_not_embeddings(tmp_path):
    bogus = tmp_path / "bogus.npz"
    bogus.write_bytes(b"not a zip file")
    with pytest.raises(EncodingInputError, match="bogus.npz: not an embeddings file"):
        encoding.load_embeddings(str(bogus))
    with pytest.raises(InvalidInputError, match="missing.npz: file not found"):
        encoding.load_embeddings(str(tmp_path / "missing.npz"))


def test_read_texts_from_jsonl_csv_and_txt(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"id": "x", "text": "one"}\n\n{"text": "two"}\n{"id": "z"}\n')
    (tmp_path / "in.csv").write_text('id,text\na,"first, with comma"\n,second\n')
    (tmp_path / "in.txt").write_text("line one\n\nline two\n")
    assert encoding.read_texts(str(tmp_path / "in.jsonl")) == (["x", "1", "z"], ["one", "two", None])
    assert encoding.read_texts(str(tmp_path / "in.csv")) == (["a", "1"], ["first, with comma", "second"])
    assert encoding.read_texts(str(tmp_path / "in.txt")) == (["0", "1"], ["line one", "line two"])


def test_read_texts_names_the_file_and_line_on_bad_content(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(EncodingInputError, match=r"bad.jsonl line 2: not valid JSON"):
        encoding.read_texts(str(tmp_path / "bad.jsonl"))
    (tmp_path / "nocol.csv").write_text("body\nhello\n")
    with pytest.raises(EncodingInputError, match=r"nocol.csv: no 'text' column"):
        encoding.read_texts(str(tmp_path / "nocol.csv"))
    (tmp_path / "doc.pdf").write_bytes(b"%PDF-1.4")
    with pytest.raises(EncodingInputError, match=r"doc.pdf: unsupported file type '.pdf'"):
        encoding.read_texts(str(tmp_path / "doc.pdf"))


def test_embeddings_reject_mismatched_ids():
    with pytest.raises(EncodingInputError, match="ids: 1 ids for 2 vectors"):
        Embeddings(["a"], np.zeros((2, 3), dtype=np.float32))


def test_cache_takes_concurrent_writers_without_losing_rows(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "shared.sqlite"

    def write(worker: int) -> None:
        cache = EmbeddingCache(path)  # each worker opens the file on its own, like separate processes
        for batch in range(5):
            rows = {f"w{worker}-{batch}-{row}": np.full(384, worker, dtype=np.float32) for row in range(40)}
            cache.put_many(rows)
            rows[f"w{(worker + 1) % 4}-0-0"] = np.zeros(384, dtype=np.float32)  # overlapping keys are ignored
            cache.put_many(rows)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, range(4)))
    cache = EmbeddingCache(path)
    assert len(cache) == 4 * 5 * 40
    found = cache.get_many([f"w2-4-{row}" for row in range(40)])
    assert len(found) == 40 and all(np.all(vector == 2) for vector in found.values())
