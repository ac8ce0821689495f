"""Shared fixtures: a local Ray on 127.0.0.1 and tiny random-weight models built from a config."""

from __future__ import annotations

import os

# Keep every Ray process of the suite on loopback: with this variable Ray binds 127.0.0.1 instead
# of the machine's interface address. Set before ray is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import pytest

RAY_FIXTURES = {"ray_local", "ray_with_faults"}


def pytest_collection_modifyitems(items):
    """Tests that start Ray are marked ``ray``: ``make test-fast`` leaves them out."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


@pytest.fixture
def ray_local():
    """A local Ray on 127.0.0.1, shared by the tests that follow (starting Ray costs seconds).

    Function-scoped so that a test which needs its own cluster (multi-node) can shut this one
    down; the next test that asks for it starts a new one.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray


@pytest.fixture
def ray_with_faults(tmp_path_factory, monkeypatch):
    """Start a local Ray whose workers see the given test-only faults (``incr_ray.faults``):
    ``ray_with_faults(teacher_exit_at_batch=3)``. Ray is shut down afterwards, so the next test
    gets one without faults."""
    import json

    import ray

    from incr_ray import faults

    def start(**chosen):
        value = json.dumps({"once_dir": str(tmp_path_factory.mktemp("faults")), **chosen})
        monkeypatch.setenv(faults.ENV, value)
        if ray.is_initialized():
            ray.shutdown()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": faults.runtime_env_vars()})

    yield start
    ray.shutdown()


def build_tiny_model(path, family: str = "bert", num_labels: int = 3, labels=None, head: bool = True):
    """Save a tiny random-weight sequence classifier with the bundled MiniLM tokenizer."""
    from transformers import AutoTokenizer, AutoModelForSequenceClassification

    from incr_ray.modeling import minilm_dir

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    labels = labels or [f"c{i}" for i in range(num_labels)]
    if family == "bert":
        from transformers import BertConfig

        cfg = BertConfig(
            vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=128,
        )
    elif family == "llama":
        from transformers import LlamaConfig

        cfg = LlamaConfig(
            vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
        )
    else:
        raise ValueError(family)
    cfg.num_labels = len(labels)
    cfg.id2label = dict(enumerate(labels))
    cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    import torch

    torch.manual_seed(0)
    if head:
        model = AutoModelForSequenceClassification.from_config(cfg)
    else:  # a base model, as pretrained checkpoints ship: the classifier is created at load
        from transformers import AutoModel

        model = AutoModel.from_config(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_bert"), "bert")


@pytest.fixture(scope="session")
def tiny_bert_base(tmp_path_factory):
    """A tiny BERT without a classification head (like MiniLM): every run initialises a new one."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_bert_base"), "bert", head=False)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny Llama-style decoder classifier (3 labels) whose config has no pad token."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def _empty_mlflow_store(tmp_path_factory):
    """A new MLflow SQLite store, made once: creating its tables takes seconds."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_db(tmp_path, _empty_mlflow_store):
    """A real, empty MLflow SQLite store of this test's own: ``<tmp_path>/mlflow.db`` (a copy of the session's)."""
    import shutil

    dest = tmp_path / "mlflow.db"
    shutil.copyfile(_empty_mlflow_store, dest)
    return dest
