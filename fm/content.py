"""Content (semantic) title vectors from catalogue text: TF-IDF over name, kind, genres and
synopsis, reduced by truncated SVD, L2-normalised.

Why this encoder: it works offline on any machine, is fitted once per catalogue version, and can
embed a title that did not exist when it was fitted (cold start) with the same fitted vocabulary.
The fitted state is plain arrays (vocabulary, IDF weights, SVD components) saved as safetensors +
JSON, so loading it never unpickles anything.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from safetensors.numpy import load_file, save_file
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer


def title_text(cat: pa.Table) -> list[str]:
    """One document per title; genres repeated so they weigh more than free text."""
    rows = cat.select(["name", "kind", "genres", "synopsis"]).to_pylist()
    return [" ".join([r["name"] or "", r["kind"] or "", " ".join((r["genres"] or []) * 3), r["synopsis"] or ""])
            for r in rows]


@dataclass
class ContentEncoder:
    vocabulary: dict[str, int]
    idf: np.ndarray               # (V_text,)
    components: np.ndarray        # (dim, V_text)

    @property
    def dim(self) -> int:
        return self.components.shape[0]

    @classmethod
    def fit(cls, texts: list[str], dim: int = 64, seed: int = 0) -> "ContentEncoder":
        tfidf = TfidfVectorizer(min_df=1, max_features=20000, sublinear_tf=True, dtype=np.float32)
        x = tfidf.fit_transform(texts)
        k = max(1, min(dim, x.shape[1] - 1, x.shape[0] - 1))
        svd = TruncatedSVD(n_components=k, random_state=seed).fit(x)
        comps = np.zeros((dim, x.shape[1]), np.float32)
        comps[:k] = svd.components_
        return cls({t: int(i) for t, i in tfidf.vocabulary_.items()}, tfidf.idf_.astype(np.float32), comps)

    def transform(self, texts: list[str]) -> np.ndarray:
        """(n, dim) float32, unit length (zero rows stay zero: no known words)."""
        tfidf = TfidfVectorizer(vocabulary=self.vocabulary, sublinear_tf=True, dtype=np.float32)
        tfidf.idf_ = self.idf
        v = np.asarray(tfidf.transform(texts) @ self.components.T, dtype=np.float32)
        norm = np.linalg.norm(v, axis=1, keepdims=True)
        return np.divide(v, norm, out=np.zeros_like(v), where=norm > 0)

    def save(self, directory: Path) -> None:
        save_file({"idf": self.idf, "components": self.components}, str(directory / "content_encoder.safetensors"))
        (directory / "content_vocab.json").write_text(json.dumps(self.vocabulary))

    @classmethod
    def load(cls, directory: Path) -> "ContentEncoder":
        arrays = load_file(str(directory / "content_encoder.safetensors"))
        vocab = json.loads((directory / "content_vocab.json").read_text())
        return cls(vocab, arrays["idf"], arrays["components"])


def content_matrix(encoder: ContentEncoder, title_ids_by_idx: list[str | None], cat: pa.Table) -> np.ndarray:
    """Content vectors indexed by vocabulary id; rows without catalogue text (PAD, OOV) stay zero."""
    ids = cat["title_id"].to_pylist()
    texts = dict(zip(ids, title_text(cat)))
    out = np.zeros((len(title_ids_by_idx), encoder.dim), np.float32)
    known = [(i, texts[t]) for i, t in enumerate(title_ids_by_idx) if t is not None and t in texts]
    if known:
        out[[i for i, _ in known]] = encoder.transform([x for _, x in known])
    return out
