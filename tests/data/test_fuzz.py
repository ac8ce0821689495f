"""Fuzz-style loader test: random bytes and random rows give a clean DataError or a clean split."""

from __future__ import annotations

import random

import pytest

from incr_ray.config import config_from_dict
from incr_ray.data import DataError, split_data

ALPHABET = "abc ,\"'\n\t;é\x00\\xyz012"


def _random_csv(rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:  # raw random bytes
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
    if kind == 1:  # a header, then rows of random characters
        rows = ["".join(rng.choice(ALPHABET) for _ in range(rng.randrange(0, 20))) for _ in range(rng.randrange(0, 60))]
        return ("text,label\n" + "\n".join(rows)).encode("utf-8", "replace")
    # well-formed rows with random text, labels (sometimes missing) and sometimes bad bytes
    lines = ["text,label"]
    for _ in range(rng.randrange(0, 120)):
        text = "".join(rng.choice("abcdefgh ") for _ in range(rng.randrange(0, 12)))
        label = rng.choice(["x", "y", "z", "", "1"])
        lines.append(f'"{text}",{label}')
    data = "\n".join(lines).encode()
    if kind == 3:
        data = data.replace(b"a", b"\xff", 3)
    return data


@pytest.mark.parametrize("seed", range(16))
def test_random_inputs_fail_cleanly_or_split(ray_local, tmp_path, seed):
    rng = random.Random(seed)
    path = tmp_path / "fuzz.csv"
    path.write_bytes(_random_csv(rng))
    cfg = config_from_dict({
        "data": {"source": str(path), "eval_fraction": 0.0},
        "method": {"k": 2},
        "student": {"batch_size": 1},
    })
    try:
        split = split_data(cfg)
    except DataError as err:
        msg = str(err)
        assert msg and "\n" not in msg and "Traceback" not in msg
        return
    assert sum(split.block_sizes) + split.holdout_size > 0
    assert len(split.label_names) >= 2
