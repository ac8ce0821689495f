"""``incr-ray push``: what would be uploaded (huggingface_hub.HfApi replaced by a recorder), and the
one-line errors of bad usage (exit 2) and of a Hub that cannot be reached (exit 1)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import ModelCard

from incr_ray import cli
from incr_ray.run.push import _network_or_hub_failure, repo_id_problem


class RecordingHfApi:
    """Stands in for the network side of huggingface_hub.HfApi: records each call, and what the
    uploaded folder held at the moment of the upload."""

    calls: list[tuple[str, dict]] = []

    def __init__(self, token=None, **kwargs):
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        card = (folder / "README.md").read_text() if (folder / "README.md").exists() else None
        self.calls.append(("upload_folder", {**kwargs, "files": files, "card": card}))


@pytest.fixture
def hub(monkeypatch):
    RecordingHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    return RecordingHfApi.calls


def _run_folder(root: Path, tiny_model: str, status: str = "finished", gens: int = 2, cards: bool = False) -> str:
    """A run folder as a finished training leaves it: run.json and each generation's model folder."""
    entries = []
    for g in range(gens):
        shutil.copytree(tiny_model, root / f"gen_{g:03d}" / "model")
        entries.append({"index": g, "status": "finished", "rows": 100, "model": f"gen_{g:03d}/model",
                        "metrics": {"accuracy": 0.6 + g / 10, "macro_f1": 0.55 + g / 10, "nll": 0.7, "ece": 0.1,
                                    "n": 50.0}})
    manifest = {"version": 1, "name": "demo", "run_dir": str(root), "status": status, "created": "now",
                "config": {"run": {"name": "demo"}, "model": {"base": "minilm"}, "method": {"k": gens}},
                "label_names": ["c0", "c1", "c2"],
                "data": {"fingerprint": "f", "block_sizes": [100] * gens, "holdout_size": 50},
                "generations": entries}
    if status == "finished":
        manifest.update(final_generation=gens - 1, final_model=f"gen_{gens - 1:03d}/model")
    (root / "run.json").write_text(json.dumps(manifest))
    return str(root)


def _main(capsys, *args):
    capsys.readouterr()
    try:
        code = cli.main(list(args))
    except SystemExit as exit:
        code = exit.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_error_line(err: str, *needles):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("incr-ray: error:") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_push_uploads_the_final_model_folder_with_its_card(tmp_path, tiny_bert, hub, capsys):
    run = _run_folder(tmp_path / "demo", tiny_bert)
    # A run folder from before model cards: push writes the card first.
    assert not (tmp_path / "demo" / "gen_001" / "model" / "README.md").exists()
    code, out, err = _main(capsys, "push", "--run", run, "--repo", "alice/demo-minilm", "--token", "hf_abc")
    assert code == 0, err
    names = [name for name, _ in hub]
    assert names == ["init", "create_repo", "upload_folder"]
    assert hub[0][1] == {"token": "hf_abc"}
    assert hub[1][1] == {"repo_id": "alice/demo-minilm", "private": None, "exist_ok": True, "repo_type": "model"}
    upload = hub[2][1]
    assert upload["repo_id"] == "alice/demo-minilm" and upload["repo_type"] == "model"
    assert Path(upload["folder_path"]) == tmp_path / "demo" / "gen_001" / "model"
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(upload["files"])
    assert "generation 1 of run demo" in upload["commit_message"]
    card = ModelCard(upload["card"])
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert "This is the **final model** of run `demo`." in card.text
    assert "pushing generation 1" in out and "README.md" in out and "pushed: https://huggingface.co/alice/demo-minilm" in out


def test_push_a_chosen_generation_private(tmp_path, tiny_bert, hub, capsys):
    run = _run_folder(tmp_path / "demo", tiny_bert, status="running")  # its finished generations may go
    code, _, err = _main(capsys, "push", "--run", run, "--repo", "alice/gen0", "--generation", "0", "--private")
    assert code == 0, err
    assert hub[1][1]["private"] is True
    assert Path(hub[2][1]["folder_path"]) == tmp_path / "demo" / "gen_000" / "model"
    assert "# demo: generation 0" in hub[2][1]["card"]


def test_push_bad_usage_is_one_line_and_exit_2_before_any_upload(tmp_path, tiny_bert, hub, capsys):
    run = _run_folder(tmp_path / "demo", tiny_bert, status="running")
    for repo in ("demo-minilm", "alice/demo/x", "alice/de mo", "alice/--x", "/demo"):
        code, _, err = _main(capsys, "push", "--run", run, "--repo", repo)
        assert code == 2
        _one_error_line(err, "--repo", "OWNER/NAME")
    code, _, err = _main(capsys, "push", "--run", run, "--repo", "alice/demo")
    assert code == 2
    _one_error_line(err, "not finished", "--generation")
    code, _, err = _main(capsys, "push", "--run", run, "--repo", "alice/demo", "--generation", "5")
    assert code == 2
    _one_error_line(err, "no finished generation 5", "finished: 0, 1")
    code, _, err = _main(capsys, "push", "--run", str(tmp_path / "nothing"), "--repo", "alice/demo")
    assert code == 2
    _one_error_line(err, "not an incr-ray run folder")
    assert hub == []


def test_push_with_no_network_is_one_line_and_exit_1(tmp_path, tiny_bert, capsys, monkeypatch):
    """The real huggingface_hub, offline (as the test suite runs it): no traceback, exit 1."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    run = _run_folder(tmp_path / "demo", tiny_bert)
    code, _, err = _main(capsys, "push", "--run", run, "--repo", "alice/demo", "--token", "hf_abc")
    assert code == 1
    _one_error_line(err, "upload to alice/demo failed", "OfflineModeIsEnabled", "check the network")


def test_repo_ids_and_failures():
    assert repo_id_problem("alice/demo-minilm.v2_1") is None
    assert repo_id_problem("alice/demo.git") and repo_id_problem("a" * 50 + "/" + "b" * 50)
    assert _network_or_hub_failure(ConnectionError("refused"))
    assert not _network_or_hub_failure(TypeError("a bug of ours"))
