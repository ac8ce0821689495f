"""Hugging Face `datasets` folders (save_to_disk) as data.source: reading, splits, ClassLabel names
and the one-line errors."""

from __future__ import annotations

import datasets
import pytest
from ray.data.expressions import col

from incr_ray.config import config_from_dict
from incr_ray.data import HOLDOUT, DataError, open_source, split_data
from incr_ray.data.hf_datasets import looks_like_hub_name, resolve_saved, saved_kind
from incr_ray.data.sources import read_split


def _cfg(data: dict, k: int = 2):
    return config_from_dict({"data": data, "method": {"k": k}, "student": {"batch_size": 1}})


def _texts(n: int, prefix: str, classes: list[str]) -> tuple[list[str], list[str]]:
    return [f"{prefix} {i} is {classes[i % len(classes)]}" for i in range(n)], [classes[i % len(classes)] for i in range(n)]


@pytest.fixture
def saved(tmp_path):
    """A ClassLabel DatasetDict (train/test), a string-label Dataset, both written by save_to_disk."""
    classes = ["neg", "pos", "meh"]  # id order on purpose not sorted
    features = datasets.Features({"sentence": datasets.Value("string"), "y": datasets.ClassLabel(names=classes)})

    def part(n, prefix):
        texts, names = _texts(n, prefix, classes)
        return datasets.Dataset.from_dict({"sentence": texts, "y": [classes.index(x) for x in names]}, features=features)

    dict_dir = tmp_path / "dict"
    datasets.DatasetDict({"train": part(60, "train"), "test": part(9, "test")}).save_to_disk(str(dict_dir), num_shards={"train": 3, "test": 1})
    texts, names = _texts(30, "row", ["good", "bad"])
    ds_dir = tmp_path / "single"
    datasets.Dataset.from_dict({"text": texts, "label": names}).save_to_disk(str(ds_dir))
    return {"dict": str(dict_dir), "dataset": str(ds_dir)}


def test_detection_and_hub_names(saved, tmp_path):
    assert saved_kind(saved["dict"]) == "dict" and saved_kind(saved["dataset"]) == "dataset"
    assert saved_kind(saved["dict"] + "/test") == "dataset"  # each split is a saved Dataset
    (tmp_path / "plain").mkdir()
    assert saved_kind(str(tmp_path / "plain")) is None and saved_kind(str(tmp_path / "nope")) is None
    assert resolve_saved(saved["dict"], "data.source", None, "data.split").class_names == {"y": ["neg", "pos", "meh"]}
    assert len(resolve_saved(saved["dict"], "data.source", None, "data.split").files) > 1  # sharded

    assert looks_like_hub_name("imdb") and looks_like_hub_name("stanfordnlp/sst2")
    for not_hub in ("missing.csv", "a/b/c", "s3://bucket/data", "/abs/path", "d.parquet"):
        assert not looks_like_hub_name(not_hub), not_hub


def test_datasetdict_classlabel_names_become_the_label_map_and_eval_split_the_holdout(ray_local, saved):
    data = {"source": saved["dict"], "text_column": "sentence", "label_column": "y"}
    raw = sorted(open_source(_cfg(data).data, seed=0)[0].take_all(), key=lambda r: r["text"])
    assert len(raw) == 60 and all(r["text"].startswith("train") for r in raw)  # unset split takes train
    assert all(r["text"].endswith(r["label"]) for r in raw)  # ints turned into their names

    split = split_data(_cfg({**data, "eval_split": "test"}))
    assert split.label_names == ["neg", "pos", "meh"]  # the ClassLabel order, not sorted
    assert split.holdout_size == 9 and sum(split.block_sizes) == 60
    held = split.dataset.filter(expr=col("block") == HOLDOUT).take_all()
    assert sorted(r["text"] for r in held) == sorted(f"test {i} is {['neg', 'pos', 'meh'][i % 3]}" for i in range(9))
    assert all(split.label_names[r["label"]] == r["text"].rsplit(" ", 1)[1] for r in split.dataset.take_all())

    test_only = split_data(_cfg({**data, "split": "test", "eval_fraction": 0.0}))
    assert sum(test_only.block_sizes) == 9 and test_only.holdout_size == 0


def test_saved_dataset_with_string_labels(ray_local, saved):
    split = split_data(_cfg({"source": saved["dataset"], "eval_fraction": 0.2}))
    assert split.label_names == ["bad", "good"]
    assert sum(split.block_sizes) + split.holdout_size == 30


@pytest.mark.parametrize(
    "data, message",
    [
        ({"split": "validation"},
         r"^data.split 'validation' is not a split of data.source '.*dict' \(splits: train, test\); set it to one of them$"),
        ({"eval_split": "dev"},
         r"^data.eval_split 'dev' is not a split of data.source '.*dict' \(splits: train, test\); set it to one"),
        ({"eval_split": "train"}, r"^data.eval_split 'train' is also the training split; hold out a different split$"),
        ({"source": "dataset", "split": "train"},
         r"^data.split is 'train' but data.source '.*single' is a saved Dataset with no splits; unset data.split$"),
        ({"source": "dataset", "eval_split": "test"},
         r"^data.eval_split is 'test' but data.source '.*single' is a saved Dataset with no splits; unset data.eval_split"),
        ({"source": "csv", "split": "train"},
         r"^data.split is 'train' but data.source '.*d.csv' is not a folder written by `datasets` save_to_disk; unset data.split$"),
        ({"source": "synthetic", "eval_split": "test"},
         r"^data.eval_split is 'test' but the built-in data.source 'synthetic' is not a folder written by"),
        ({"text_column": "text"},
         r"^data.source '.*dict' split 'train' has no column 'text' \(columns found: sentence, y\); set data.text_column"),
        ({"source": "dataset", "eval_path": "dict"},
         r"^data.eval_path '.*dict' is a saved DatasetDict \(splits: train, test\); point data.eval_path at one split's folder, such as '.*dict/train'$"),
    ],
)
def test_errors_are_one_line(ray_local, saved, tmp_path, data, message):
    (tmp_path / "d.csv").write_text("text,label\na,x\nb,y\n")
    paths = {**saved, "csv": str(tmp_path / "d.csv"), "synthetic": "synthetic"}
    data = {"source": "dict", "text_column": "sentence", "label_column": "y", **data}
    if data["source"] != "dict":
        data.pop("text_column"), data.pop("label_column")
    data = {key: paths.get(value, value) if key in ("source", "eval_path") else value for key, value in data.items()}
    with pytest.raises(DataError, match=message) as err:
        split_data(_cfg(data))
    assert "\n" not in str(err.value)


def test_no_train_split_is_named(tmp_path):
    part = datasets.Dataset.from_dict({"text": ["a", "b"], "label": ["x", "y"]})
    datasets.DatasetDict({"fit": part, "dev": part}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"^data.source '.*d' has no split 'train' \(splits: fit, dev\); set data.split to one of them$"):
        resolve_saved(str(tmp_path / "d"), "data.source", None, "data.split")


def test_unreachable_hub_name_is_one_line():
    # Offline (tests/conftest.py sets HF_HUB_OFFLINE): the hub is never reached.

    with pytest.raises(DataError, match=r"^data.source 'no-such-owner/no-such-set' is not a local path, and loading it "
                       r"from the Hugging Face hub failed \(.*\); point data.source at a file or folder") as err:
        read_split(_cfg({"source": "no-such-owner/no-such-set"}).data, None, "data.split")
    assert "\n" not in str(err.value)
