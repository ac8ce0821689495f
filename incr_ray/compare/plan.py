"""What a comparison runs: its variants (the config itself, ``--against`` baselines, ``--grid``
values) × its seeds, each trial a normal run folder under ``<storage.path>/<run.name>/``.

Everything here is checked before Ray starts: an unknown ``--against`` name, a malformed or
unknown ``--grid``/``--set`` key, fewer than two seeds — each a one-line :class:`ConfigError`. A
grid *value* the config refuses (``method.threshold=1.5``) fails only its own variant, which the
report then lists with its error while the others run.

Pairing: a trial's seed is ``run.seed``, which draws the holdout (a pure per-row hash, independent
of ``method.k``) and the blocks, so every variant with the same seed is scored on the same holdout
rows; ``full`` (``method.k=1``) keeps it too.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from ..config import Config, ConfigError, apply_overrides, config_from_dict

# The baselines `--against` names, as overrides of the user's config.
AGAINST: dict[str, tuple[str, ...]] = {
    # One fine-tune on every training row: k=1 deals them all to generation 0 (one-hot CE), with the
    # same holdout.
    "full": ("method.k=1",),
    # The same blocks in order, each generation from the last, one-hot targets: p = 1 makes every
    # target the label's one-hot row, so this is what the soft targets add.
    "sequential": ("method.threshold=1.0",),
}
CONFIG_VARIANT = "config"
FOLDER_FILES = ("compare.json", "compare.md", "compare.png")


@dataclass(frozen=True)
class Variant:
    """One arm of the comparison: ``overrides`` on top of the user's config; ``error`` when the
    config refuses them (the variant is reported, not run)."""

    name: str
    overrides: tuple[str, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class Trial:
    variant: str
    seed: int
    name: str  # its run folder's name, inside the comparison's folder
    config: Config | None = field(default=None, compare=False)
    error: str | None = None


@dataclass
class ComparePlan:
    folder: str  # <storage.path>/<run.name>: compare.{json,md,png} and one run folder per trial
    base: Config
    variants: list[Variant]
    seeds: list[int]
    trials: list[Trial]


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``KEY=V1,V2`` → ``(KEY, [V1, V2])``; the key is checked against the config's schema."""
    out = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,..., e.g. --grid student.learning_rate=1e-4,3e-4")
        apply_overrides({}, [f"{key}=0"])  # an unknown key or a section: its one-line error
        vals = [v.strip() for v in values.split(",")]
        if any(v == "" for v in vals):
            raise ConfigError(f"--grid {item!r}: an empty value; separate values with single commas")
        out.append((key, vals))
    return out


def parse_against(text: str | None) -> list[str]:
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in AGAINST]
    if unknown:
        raise ConfigError(f"--against {unknown[0]!r} is not a baseline; choose from {', '.join(AGAINST)} "
                          "(comma-separated), or use --grid KEY=V1,V2 for a setting")
    return list(dict.fromkeys(names))


def trial_name(variant: str, seed: int) -> str:
    """A plain folder name: the variant with anything but ``[A-Za-z0-9._=-]`` made ``_`` (and a short
    hash when that changed it, or it is long), then ``-s<seed>``."""
    slug = re.sub(r"[^A-Za-z0-9._=-]", "_", variant)
    if slug != variant or len(slug) > 60:
        slug = slug[:48] + "-" + hashlib.sha1(variant.encode()).hexdigest()[:8]
    return f"{slug}-s{seed}"


def _variant_configs(raw: dict[str, Any], sets: list[str], variants: list[Variant]) -> list[Variant]:
    """Each variant validated; a grid value that resolves to the config itself is dropped (it is the
    config's own run), as is a repeat."""
    seen: dict[str, str] = {}
    out = []
    for v in variants:
        try:
            cfg = config_from_dict(raw, [*sets, *v.overrides])
        except ConfigError as err:
            out.append(Variant(v.name, v.overrides, str(err)))
            continue
        key = repr(sorted(cfg.to_dict().items()))
        if key in seen:
            continue
        seen[key] = v.name
        out.append(v)
    return out


def plan_compare(raw: dict[str, Any], sets: list[str], seeds: int, against: str | None,
                 grid: list[str], trial_sets: list[str] = ()) -> ComparePlan:
    """The comparison of the config ``raw`` (a YAML mapping) with ``--set`` ``sets``: its variants and
    the ``seeds`` seeds ``run.seed, run.seed+1, …``, one trial each; ``trial_sets`` go on every
    trial's config last (where its run folder lands, its tracking)."""
    if seeds < 2:
        raise ConfigError(f"--seeds {seeds}: a paired interval needs at least 2 seeds; use --seeds 3 or more "
                          "(5 resolves differences about half as wide as 3 do)")
    base = config_from_dict(raw, sets)
    variants = [Variant(CONFIG_VARIANT)]
    variants += [Variant(name, AGAINST[name]) for name in parse_against(against)]
    for key, values in parse_grid(grid):
        variants += [Variant(f"{key}={v}", (f"{key}={v}",)) for v in values]
    variants = _variant_configs(raw, sets, variants)
    folder = base.run_dir
    first = base.run.seed
    seed_list = list(range(first, first + seeds))
    trials = []
    for v in variants:
        for s in seed_list:
            name = trial_name(v.name, s)
            if v.error:
                trials.append(Trial(v.name, s, name, error=v.error))
                continue
            extra = [f"run.seed={s}", f"run.name={name}", f"storage.path={folder}", *trial_sets]
            trials.append(Trial(v.name, s, name, config_from_dict(raw, [*sets, *v.overrides, *extra])))
    return ComparePlan(folder, base, variants, seed_list, trials)


def runs_at_once(cfg: Config, cluster: dict[str, float]) -> int:
    """How many of ``cfg``'s runs the cluster holds at once (``cluster``: Ray's total resources):
    a run alternates between scoring (``teacher.pool_size`` actors) and training
    (``cluster.workers`` workers), so it needs the larger of the two at a time. ``cfg`` has its
    ``auto`` settings resolved."""
    workers, pool = cfg.cluster.workers, cfg.teacher.pool_size
    cpu = max(workers * float(cfg.cluster.cpus_per_worker), pool * float(cfg.teacher.cpus_per_actor))
    fits = [int(cluster.get("CPU", 0.0) // cpu)] if cpu > 0 else []
    if cfg.cluster.use_gpu is True:
        gpu = max(float(workers), pool * cfg.teacher.gpus_per_actor)
        if gpu > 0:
            fits.append(int(cluster.get("GPU", 0.0) // gpu))
    return max(1, min(fits) if fits else 1)
