"""Synthetic event log and title catalogue with structure a sequence model can learn.

Why synthetic: tests and the demo need a daily raw partition on any machine, deterministic by seed.
The generator plants the patterns the foundation model is meant to find, so a model that learns
something beats popularity on it:

* taste clusters over genres (each profile mixes one or two clusters),
* series continuation and binges (a profile keeps playing the show it is in the middle of),
* device and time-of-day habits per profile,
* Zipf popularity, and new titles released every day (cold start),
* optional malformed rows (missing profile_id, unparseable ts, unknown action),
* optional per-canvas behaviour (``canvas_behaviour=true``; off by default, so the default output is
  byte-identical to earlier versions): kids profiles browse a kids canvas that shows kids-only
  titles (and only it does), search follows the genres of the profile's last title, home shows
  what is popular, the other rows the profile's taste. This is what a surface-conditioned model
  (``fm.model.ModelConfig.surfaces``) must pick up: the next title depends on the canvas.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from fm.schema import CANVASES, CATALOGUE_SCHEMA, DEVICES, LOCALES, RAW_EVENT_SCHEMA
from jobs.core.io import atomic_write_table, raw_partition
from jobs.core.settings import Paths, run_cli

GENRES = ("action", "adventure", "animation", "comedy", "crime", "documentary", "drama", "family",
          "fantasy", "horror", "mystery", "romance", "scifi", "thriller", "war", "western",
          "music", "sports")
GENRE_WORDS = {
    "action": "explosive chase mission fight", "adventure": "journey quest treasure island",
    "animation": "animated colourful cartoon talking", "comedy": "funny hilarious awkward friends",
    "crime": "detective heist gang police", "documentary": "true story real footage interviews",
    "drama": "family struggle emotional life", "family": "kids parents together holiday",
    "fantasy": "magic dragon kingdom spell", "horror": "haunted scream blood night",
    "mystery": "secret clue murder puzzle", "romance": "love wedding heart couple",
    "scifi": "space robot future alien", "thriller": "suspense danger conspiracy spy",
    "war": "soldier battle army front", "western": "cowboy desert sheriff frontier",
    "music": "band concert song singer", "sports": "team championship coach match",
}
N_CLUSTERS = 8
KIDS_GENRES = frozenset({"animation", "family"})
ADULT_GENRES = frozenset({"horror", "war", "thriller", "crime"})
BROWSE_CANVASES = ("home", "search", "more_like_this", "trending", "genre_row")


def kids_titles(genres: list[list[str]]) -> np.ndarray:
    """Kids-only titles: a kids genre and no adult one (from the catalogue, no random draw)."""
    return np.array([bool(KIDS_GENRES & set(g)) and not ADULT_GENRES & set(g) for g in genres], bool)


@dataclass(frozen=True)
class GenerateConfig:
    """Size and shape of the synthetic world. Defaults are the demo size (~5k profiles x 14 days)."""
    start: str = "2026-11-01"
    days: int = 14
    profiles: int = 5000
    titles: int = 2000
    new_titles_per_day: int = 15
    sessions_per_day: float = 1.2
    active_prob: float = 0.6
    malformed_per_day: int = 0
    seed: int = 7
    canvas_behaviour: bool = False      # plant per-canvas behaviour (module docstring)
    kids_profiles: float = 0.2          # with canvas_behaviour: share of profiles that are kids
    kids_session: float = 0.6           # ... and the share of a kids profile's sessions on the kids canvas


def _catalogue(cfg: GenerateConfig, rng: np.random.Generator) -> pa.Table:
    """All titles that will exist in the run; those released after day 0 appear on their release day."""
    start = dt.date.fromisoformat(cfg.start)
    n = cfg.titles + cfg.new_titles_per_day * cfg.days
    release = [start - dt.timedelta(days=int(rng.integers(30, 3000))) for _ in range(cfg.titles)]
    release += [start + dt.timedelta(days=d) for d in range(cfg.days) for _ in range(cfg.new_titles_per_day)]
    kinds = rng.choice(["movie", "show", "game", "live"], size=n, p=[0.55, 0.35, 0.05, 0.05])
    genres, names, synopses, runtimes = [], [], [], []
    for i in range(n):
        g = list(rng.choice(GENRES, size=int(rng.integers(1, 4)), replace=False))
        genres.append(g)
        words = " ".join(GENRE_WORDS[x] for x in g).split()
        names.append(f"The {rng.choice(words).title()} {rng.choice(words).title()} {i}")
        synopses.append(f"A {' and '.join(g)} {kinds[i]} about " + " ".join(rng.choice(words, size=8)) + ".")
        runtimes.append(None if rng.random() < 0.1 else int({"movie": 6000, "show": 2700, "game": 1800, "live": 7200}[kinds[i]] * rng.uniform(0.7, 1.3)))
    return pa.table({
        "title_id": [f"t{i:06d}" for i in range(n)], "name": names, "kind": kinds.tolist(),
        "genres": genres, "release_date": release, "synopsis": synopses, "runtime_s": runtimes,
    }, schema=CATALOGUE_SCHEMA)


class _World:
    """Profiles' latent habits plus per-cluster title preferences; advances one day at a time."""

    def __init__(self, cfg: GenerateConfig, cat: pa.Table, rng: np.random.Generator):
        self.cfg, self.rng = cfg, rng
        self.title_ids = np.array(cat["title_id"].to_pylist())
        self.release = np.array(cat["release_date"].to_pylist())
        self.kind = np.array(cat["kind"].to_pylist())
        self.runtime = np.array([r or 3600 for r in cat["runtime_s"].to_pylist()], dtype=float)
        g_index = {g: i for i, g in enumerate(GENRES)}
        self.title_genre = np.zeros((len(self.title_ids), len(GENRES)))
        for i, gs in enumerate(cat["genres"].to_pylist()):
            self.title_genre[i, [g_index[g] for g in gs]] = 1.0
        self.cluster_genre = rng.dirichlet(np.full(len(GENRES), 0.3), size=N_CLUSTERS)
        self.popularity = 1.0 / np.arange(1, len(self.title_ids) + 1) ** 0.9
        rng.shuffle(self.popularity)
        self.popularity[cfg.titles:] *= 8.0          # new releases get a launch boost
        n = cfg.profiles
        self.clusters = rng.integers(0, N_CLUSTERS, size=(n, 2))
        self.cluster_w = rng.uniform(0.6, 1.0, size=n)
        self.device_pref = rng.dirichlet(np.full(len(DEVICES), 0.4), size=n)
        self.hour_pref = rng.integers(0, 21, size=n)
        self.locale = rng.choice(LOCALES, size=n, p=np.r_[0.4, np.full(len(LOCALES) - 1, 0.6 / (len(LOCALES) - 1))])
        self.current_show = np.full(n, -1)
        self.cdfs: dict[tuple, np.ndarray] = {}      # the day's cumulative title distributions (draw)
        self.canvas_aware = cfg.canvas_behaviour
        if self.canvas_aware:                        # drawn after everything else: the default run is unchanged
            self.kids_title = kids_titles(cat["genres"].to_pylist())
            self.kids_profile = rng.random(n) < cfg.kids_profiles
            self.last_title = np.full(n, -1)
            self.dists: dict[str, np.ndarray] = {}

    def start_day(self, day: dt.date, cluster: np.ndarray) -> None:
        """Per-canvas title distributions of the day (canvas behaviour only): kids titles only on
        the kids canvas, home by popularity alone, the taste rows by cluster."""
        released = (self.release <= day).astype(float)
        adult = released * ~self.kids_title
        home = self.popularity * adult
        taste = cluster * ~self.kids_title
        taste = np.where(taste.sum(axis=1, keepdims=True) > 0, taste, home)   # a cluster of kids titles only
        kids = self.popularity * released * self.kids_title
        self.dists = {"kids": _normed(kids if kids.sum() > 0 else home), "home": _normed(home),
                      "taste": taste / taste.sum(axis=1, keepdims=True), "adult": adult}

    def draw(self, dist: np.ndarray, key: tuple | None = None) -> int:
        """``int(rng.choice(len(dist), p=dist))``: the same draw from the same random stream, bit for
        bit, with the cumulative distribution kept under ``key`` for the rest of the day. Why: numpy
        rebuilds it on every call, O(titles) per event, which at 20k titles was the generator's whole
        cost (a 1M-profile day took over 20 minutes)."""
        cdf = self.cdfs.get(key) if key is not None else None
        if cdf is None:
            cdf = dist.cumsum()
            cdf /= cdf[-1]
            if key is not None:
                self.cdfs[key] = cdf
        return int(cdf.searchsorted(self.rng.random(), side="right"))

    def cluster_dist(self, day: dt.date) -> np.ndarray:
        released = self.release <= day
        aff = (self.cluster_genre @ self.title_genre.T) ** 2 * self.popularity * released
        return aff / aff.sum(axis=1, keepdims=True)

    def profile_day(self, p: int, day: dt.date, dist: np.ndarray) -> list[tuple]:
        rng, rows = self.rng, []
        for _ in range(max(1, rng.poisson(self.cfg.sessions_per_day))):
            hour = int((self.hour_pref[p] + rng.normal(0, 2)) % 21)   # sessions end before midnight
            t = dt.datetime(day.year, day.month, day.day, hour, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=int(rng.integers(0, 3600)))
            device = DEVICES[self.draw(self.device_pref[p])]
            kids = self.canvas_aware and bool(self.kids_profile[p]) and rng.random() < self.cfg.kids_session
            for _ in range(int(rng.integers(1, 5))):
                if self.canvas_aware:
                    title, canvas = self._pick_on_canvas(p, kids)
                else:
                    (t, title), canvas = self._pick(p, dist, t), None
                rows += self._interaction(p, title, t, device, canvas)
                t = rows[-1][2] + dt.timedelta(seconds=int(rng.integers(20, 600)))
        return rows

    def _pick(self, p: int, dist: np.ndarray, t: dt.datetime) -> tuple[dt.datetime, int]:
        rng = self.rng
        if self.current_show[p] >= 0 and rng.random() < 0.5:       # binge / continue the series
            return t, int(self.current_show[p])
        c = self.clusters[p, 0] if rng.random() < self.cluster_w[p] else self.clusters[p, 1]
        title = self.draw(dist[c], ("cluster", int(c)))
        if self.kind[title] == "show":
            self.current_show[p] = title
        return t, title

    def _pick_on_canvas(self, p: int, kids: bool) -> tuple[int, str]:
        """(title, canvas) with canvas behaviour: the canvas first, then a title from its distribution."""
        rng, d = self.rng, self.dists
        if kids:
            title, canvas = self.draw(d["kids"], ("kids",)), "kids"
        elif self.current_show[p] >= 0 and rng.random() < 0.5:
            return int(self.current_show[p]), "continue_watching"
        else:
            canvas = BROWSE_CANVASES[int(rng.integers(len(BROWSE_CANVASES)))]
            title = self.draw(*self._canvas_dist(p, canvas))
        if self.kind[title] == "show" and canvas != "kids":
            self.current_show[p] = title
        self.last_title[p] = title
        return title, canvas

    def _canvas_dist(self, p: int, canvas: str) -> tuple[np.ndarray, tuple | None]:
        """(distribution, cache key) -- home: popular titles; search: titles sharing the genres of
        the profile's last title (its current intent); the other rows: the profile's taste cluster."""
        d = self.dists
        if canvas == "home":
            return d["home"], ("home",)
        if canvas == "search" and self.last_title[p] >= 0:
            overlap = self.title_genre @ self.title_genre[self.last_title[p]]
            w = overlap ** 2 * np.sqrt(self.popularity) * d["adult"]
            if w.sum() > 0:
                return w / w.sum(), None
        c = self.clusters[p, 0] if self.rng.random() < self.cluster_w[p] else self.clusters[p, 1]
        return d["taste"][c], ("taste", int(c))

    def _interaction(self, p: int, title: int, t: dt.datetime, device: str, canvas: str | None = None) -> list[tuple]:
        rng = self.rng
        if canvas is None:
            canvas = "continue_watching" if title == self.current_show[p] else CANVASES[int(rng.choice([0, 1, 3, 6, 7]))]
        row = int(rng.integers(0, 6) if canvas == "continue_watching" else rng.geometric(0.3))
        base = (self.locale[p], canvas, row, device)
        out = [(p, "impression", t, None, base)]
        if rng.random() < 0.15:
            return [(*o, title) for o in out]
        t = t + dt.timedelta(seconds=int(rng.integers(2, 30)))
        watched = float(self.runtime[title] * rng.beta(2, 1))
        if rng.random() < 0.3:                                      # a pause splits the watch
            first = watched * rng.uniform(0.2, 0.8)
            out += [(p, "play", t, first, base), (p, "pause", t + dt.timedelta(seconds=int(first)), None, base)]
            t = t + dt.timedelta(seconds=int(first) + int(rng.integers(30, 900)))
            watched -= first
        out.append((p, "play", t, watched, base))
        t = t + dt.timedelta(seconds=int(watched))
        if watched > 0.6 * self.runtime[title]:
            out.append((p, "complete", t, None, base))
        extra = rng.random()
        if extra < 0.1:
            out.append((p, "thumbs_up", t + dt.timedelta(seconds=5), None, base))
        elif extra < 0.13:
            out.append((p, "thumbs_down", t + dt.timedelta(seconds=5), None, base))
        elif extra < 0.2:
            out.append((p, "add_to_list", t + dt.timedelta(seconds=5), None, base))
        return [(*o, title) for o in out]


def _normed(w: np.ndarray) -> np.ndarray:
    return w / w.sum()


def _day_table(world: _World, day: dt.date, cfg: GenerateConfig, rng: np.random.Generator) -> pa.Table:
    dist = world.cluster_dist(day)
    world.cdfs.clear()                            # the day's distributions are new
    if world.canvas_aware:
        world.start_day(day, dist)
    active = np.flatnonzero(rng.random(cfg.profiles) < cfg.active_prob)
    cols: dict[str, list] = {f.name: [] for f in RAW_EVENT_SCHEMA}
    day_end = dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc) + dt.timedelta(days=1)
    for p in active:
        for pid, action, t, dur, (locale, canvas, row, device), title in world.profile_day(int(p), day, dist):
            if t >= day_end:                      # the session ran past midnight: it belongs to tomorrow
                continue
            cols["profile_id"].append(pid + 1)
            cols["ts"].append(t.strftime("%Y-%m-%dT%H:%M:%SZ"))
            cols["title_id"].append(str(world.title_ids[title]))
            cols["action"].append(action)
            cols["duration_s"].append(None if dur is None else round(dur, 1))
            cols["device"].append(device)
            cols["canvas"].append(canvas)
            cols["row_position"].append(row)
            cols["locale"].append(locale)
    n = len(cols["profile_id"])
    cols["event_id"] = [f"{day:%Y%m%d}-{i:08d}" for i in range(n)]
    cols["seq"] = list(range(n))                  # arrival order: the log's row order
    _inject_malformed(cols, cfg.malformed_per_day, rng)
    return pa.table(cols, schema=RAW_EVENT_SCHEMA)


def _inject_malformed(cols: dict[str, list], k: int, rng: np.random.Generator) -> None:
    """Corrupt k rows in place, cycling through the kinds of damage real client logs carry."""
    n = len(cols["event_id"])
    for j, i in enumerate(rng.choice(n, size=min(k, n), replace=False)):
        kind = j % 3
        if kind == 0:
            cols["profile_id"][i] = None
        elif kind == 1:
            cols["ts"][i] = "yesterday-ish"
        else:
            cols["action"][i] = "teleport"


def run(cfg: GenerateConfig, paths: Paths) -> dict:
    """Write the catalogue and one raw partition per day; idempotent for a given seed."""
    rng = np.random.default_rng(cfg.seed)
    cat = _catalogue(cfg, rng)
    atomic_write_table(cat, paths.catalogue)
    world = _World(cfg, cat, rng)
    start = dt.date.fromisoformat(cfg.start)
    counts = {}
    for d in tqdm(range(cfg.days), desc="generate days", unit="day"):
        day = start + dt.timedelta(days=d)
        table = _day_table(world, day, cfg, rng)
        atomic_write_table(table, raw_partition(paths, day) / "part-0.parquet")
        counts[day.isoformat()] = table.num_rows
    return {"titles": cat.num_rows, "events": sum(counts.values()), "days": counts}


def main(argv: list[str] | None = None) -> dict:
    return run_cli(GenerateConfig, run, __doc__, argv, lambda out: {k: v for k, v in out.items() if k != "days"})
