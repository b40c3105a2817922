"""The library: top TF-IDF keywords per text. Pure, no Prefect."""

from __future__ import annotations

from sklearn.feature_extraction.text import TfidfVectorizer

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
