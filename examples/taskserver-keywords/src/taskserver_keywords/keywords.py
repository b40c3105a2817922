"""The library: top TF-IDF keywords per text, of a list or of a file. Pure, no Prefect: it uses
taskserver's library (its input readers, its atomic writes), never its platform."""

from __future__ import annotations

import json

from sklearn.feature_extraction.text import TfidfVectorizer

from taskserver import storage
from taskserver.encoding import read_texts
from taskserver.errors import InvalidInputError


def top_keywords(texts: list[str], top: int = 5) -> list[list[str]]:
    """For each text, its ``top`` terms by TF-IDF weight over the batch (ties by term)."""
    blank = [index for index, text in enumerate(texts) if not text.strip()]
    if not texts or blank:
        where = f"texts[{blank[0]}]" if blank else "texts"
        raise InvalidInputError(where, "blank text: there is nothing to extract keywords from",
                                "send at least one word per text")
    vectorizer = TfidfVectorizer(stop_words="english")
    try:
        weights = vectorizer.fit_transform(texts)
    except ValueError as exc:  # only stop words
        raise InvalidInputError("texts", f"no terms left after removing stop words ({exc})") from None
    terms = vectorizer.get_feature_names_out()
    keywords = []
    for row in range(weights.shape[0]):
        entries = weights.getrow(row)
        ranked = sorted(zip(entries.data, entries.indices), key=lambda pair: (-pair[0], terms[pair[1]]))
        keywords.append([str(terms[index]) for _, index in ranked[:top]])
    return keywords


def keywords_of_file(input_path: str, output: str, top: int = 5) -> int:
    """The keywords of every text in ``input_path`` (.jsonl with ``text`` and optional ``id``,
    .csv, or .txt with a text per line), written to ``output`` as JSON lines ``{"id",
    "keywords"}`` in input order. The file appears only once complete. Returns the line count."""
    ids, texts = read_texts(input_path)
    if not texts:
        raise InvalidInputError(input_path, "the file holds no texts", "put a text per line (.txt) or record")
    for item, text in zip(ids, texts):
        if not isinstance(text, str) or not text.strip():
            raise InvalidInputError(f"{input_path} record {item!r}", "missing or blank text",
                                    "give every record at least one word")
    keywords = top_keywords(texts, top)
    with storage.open_output(output, "w") as handle:
        for item, words in zip(ids, keywords):
            handle.write(json.dumps({"id": item, "keywords": words}) + "\n")
    return len(keywords)
