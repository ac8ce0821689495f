"""incr-ray as users run it on a cluster: `ray job submit` to a Ray head with token authentication.

The head is a real `ray start --head` on 127.0.0.1 (tests/ray_head.py: one node, since `ray start`
refuses a second node under RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which keeps Ray on loopback). The
jobs are the project's own entry scripts, uploaded with `--working-dir .` and started with
`jobs/runtime_env.yaml`, as docs/cluster.md submits them; only the config is a tiny one (synthetic
data, a random-weight BERT, storage under pytest's tmp dir — the job runs on this machine).

Each Ray Train fit costs ~30 s here, so the module runs one: R5, an extension job on a copy of R2's
finished run (tests/scenarios.py), submitted to one head. `incr-ray compare` as a job, which does not
need R2's run, is tests/test_compare_job_e2e.py: make test runs it on the other xdist worker.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from ray_head import running_head

pytestmark = pytest.mark.e2e

# The head's workers bind in this range; test_compare_job_e2e.py's head (which may run at the same
# time, on the other xdist worker) uses the next one.
WORKER_PORTS = (20100, 20399)
NEW_LABEL = "hail"  # the label R5's new data brings (extend --allow-new-labels)
MEMORY = 8  # rows per old class in R5's herding memory (extend --set replay.per_class)


@pytest.fixture(scope="module")
def head():
    with running_head(WORKER_PORTS) as head:
        yield head


def copy_run(src_root: Path, storage: Path) -> Path:
    """A copy of a finished run folder (and its MLflow store) under ``storage``: the extension
    below must not change R2's run, which other tests read."""
    from incr_ray.run.manifest import load
    from incr_ray.storage import write_json_atomic

    dest = storage / src_root.name
    shutil.copytree(src_root, dest)
    shutil.copyfile(src_root.parent / "mlflow.db", storage / "mlflow.db")
    manifest = load(str(dest / "run.json"))
    manifest.run_dir = str(dest)
    manifest.config["storage"]["path"] = str(storage)  # its MLflow store is the copy's
    write_json_atomic(str(dest / "run.json"), manifest.to_json())
    return dest


@pytest.fixture(scope="module")
def extended_copy(head, crash_run, tmp_path_factory):
    """R5: `ray job submit -- python jobs/extend.py` on a copy of R2's finished run, with new data
    that brings a label the run has never seen (`--allow-new-labels`), its own holdout and one
    changed training setting."""
    from incr_ray.data import synthetic_rows
    from scenarios import CLASSES

    work = tmp_path_factory.mktemp("job_submit")
    run_dir = copy_run(crash_run.root, work / "runs")
    before = json.loads((run_dir / "run.json").read_text())
    # New data: synthetic rows the run has never seen (other ids), of its three labels and a fourth
    # one, NEW_LABEL (the synthetic data's fourth class: its own keywords).
    texts, classes = synthetic_rows(np.arange(100_000, 100_240), seed=7, classes=4)
    new_data = work / "new_block.csv"
    pd.DataFrame({"sentence": texts, "weather": np.array(CLASSES + [NEW_LABEL])[classes]}).to_csv(new_data, index=False)
    started = time.perf_counter()
    # The extension trains at half the run's peak learning rate: extend may change how its own
    # generation trains (a run on the run-long schedule extends at its floor, 10% of the peak).
    job_id, output = head.submit("python", "jobs/extend.py", "--run", str(run_dir), "--data", str(new_data),
                                 "--holdout-fraction", "0.25", "--allow-new-labels",
                                 "--set", "student.learning_rate=0.005",
                                 # New data is where label noise arrives: its suspects stay out of training.
                                 "--set", "method.suspects=drop",
                                 # A new class arrives: a herding memory of the old ones and balanced fine-tuning.
                                 "--set", "replay.fraction=0", "--set", f"replay.per_class={MEMORY}",
                                 "--set", "replay.selection=herding", "--set", "student.balanced_epochs=1",
                                 # A job attaches to a cluster, where `auto` with no GPU is refused (it may autoscale).
                                 "--set", "cluster.use_gpu=false")
    after = json.loads((run_dir / "run.json").read_text())
    from conftest import timings

    timings("R5 job extend", {"generations": after["generations"][2:]})
    return SimpleNamespace(job_id=job_id, output=output, run_dir=run_dir, before=before, after=after,
                           new_data=new_data, seconds=time.perf_counter() - started)


def test_cluster_refuses_clients_without_the_token(head):
    ok = head.ray("job", "list", "--address", head.address)
    assert ok.returncode == 0, ok.stdout[-2000:]
    wrong = head.ray("job", "list", "--address", head.address, RAY_AUTH_TOKEN="not-the-token")
    assert wrong.returncode != 0, "a wrong token must be refused"
    empty_home = head.temp_dir / "home"
    empty_home.mkdir(exist_ok=True)
    no_token = head.ray("job", "list", "--address", head.address, HOME=str(empty_home),
                        RAY_AUTH_MODE=None, RAY_AUTH_TOKEN_PATH=None)
    assert no_token.returncode != 0, "a client without any token must be refused"


def test_the_extend_job_ran_on_this_cluster(head, extended_copy):
    details = head.job_details(extended_copy.job_id)
    assert details["status"] == "SUCCEEDED", details
    # The driver registered with *this* cluster's GCS: jobs/extend.py attached through the
    # RAY_ADDRESS that Ray sets for a submitted job instead of starting a Ray of its own.
    assert details["driver_info"] and details["driver_info"]["node_ip_address"] == "127.0.0.1", details
    assert "final model:" in extended_copy.output  # the job's stdout reached `ray job submit`
    assert "optimizer steps can hardly move a pretrained model; raise student.min_steps" in extended_copy.output


def test_the_job_extension_is_held_toward_its_teacher_by_ewc(extended_copy):
    """The run trains with method.ewc (R1's config), so the job's student pays the penalty against
    its teacher's Fisher (the run's final model: the gate may have kept generation 0); the head it
    grew for the new label changed shape and is left out."""
    ewc = extended_copy.after["generations"][2]["ewc"]
    assert ewc["lambda"] == 10.0, ewc
    assert ewc["anchor_generation"] == extended_copy.before["final_generation"] and ewc["anchor_rows"] > 0, ewc
    assert ewc["left_out"] == 2  # classifier.weight and classifier.bias: 3 rows then, 4 now
    assert ewc["penalty_first"] == 0.0 and ewc["penalty_mean"] > 0.0  # starts at the teacher, then moves
    assert ewc["fisher"]["rows"] > 0  # and stores its own for the next extension


def test_the_extension_adds_one_generation_and_keeps_the_earlier_ones(extended_copy):
    before, after = extended_copy.before, extended_copy.after
    assert after["status"] == "finished"
    gens = after["generations"]
    assert [g["index"] for g in gens] == [0, 1, 2] and all(g["status"] == "finished" for g in gens)
    assert gens[2].get("extended") is True and not gens[0].get("extended") and not gens[1].get("extended")
    assert gens[2]["source"] == str(extended_copy.new_data)
    assert gens[:2] == before["generations"]
    assert after["data"]["block_sizes"][:2] == before["data"]["block_sizes"]
    assert (extended_copy.run_dir / "gen_002" / "targets").is_dir()

    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(extended_copy.run_dir / "gen_002" / "model")
    assert [model.config.id2label[i] for i in range(4)] == after["label_names"] == before["label_names"] + [NEW_LABEL]


def test_the_changed_setting_is_the_extensions_own(extended_copy):
    gens, after = extended_copy.after["generations"], extended_copy.after
    assert gens[2]["settings"] == {"student.learning_rate": 0.005, "method.suspects": "drop", "replay.fraction": 0.0,
                                   "replay.per_class": MEMORY, "replay.selection": "herding",
                                   "student.balanced_epochs": 1}
    assert "settings" not in gens[1]
    assert after["config"]["student"]["learning_rate"] == 0.01  # the run's own, for its next extension
    assert after["config"]["method"]["suspects"] == "keep"
    line = next(x for x in extended_copy.output.splitlines() if "generation 2 trains with " in x)
    own, runs = line.split("generation 2 trains with ", 1)[1].rstrip(")").split(" (the run's: ")
    assert set(own.split(", ")) == {
        "student.learning_rate=0.005", "method.suspects=drop", "replay.fraction=0.0", f"replay.per_class={MEMORY}",
        "replay.selection=herding", "student.balanced_epochs=1.0"}
    assert set(runs.split(", ")) == {
        "student.learning_rate=0.01", "method.suspects=keep", "replay.fraction=0.5", "replay.per_class=0",
        "replay.selection=uniform", "student.balanced_epochs=0.0"}
    # The run-long schedule is spent: the extension trains at its floor, 10% of its own peak.
    assert gens[2]["train"]["max_learning_rate"] == pytest.approx(5e-4)
    report = (extended_copy.run_dir / "report.md").read_text()
    trained = report.split("extension (trained with ", 1)[1].split(")", 1)[0]
    assert set(trained.split(", ")) == {f"`{k}={v}`" for k, v in gens[2]["settings"].items()}


def test_the_extensions_suspects_are_left_out_of_its_training(extended_copy):
    """`--set method.suspects=drop`: the new block's rows its teacher gives their label less than
    0.3 (R1's method.suspect_below) are listed and not trained on; replay rows are trained on."""
    from incr_ray.method.hashing import validation_mask
    from incr_ray.method.suspects import suspect_mask

    gen = extended_copy.after["generations"][2]
    targets = pq.read_table(extended_copy.run_dir / "gen_002" / "targets").to_pandas()
    # The teacher knows 3 classes: the new label's rows (its probability 0) are no suspects.
    suspect = suspect_mask(np.stack(targets.teacher_probs.to_numpy()), targets.label.to_numpy(), 0.3,
                           teacher_classes=3)
    suspect &= ~targets.replay.to_numpy()
    training = ~validation_mask(targets.row_id.to_numpy(), 3, 0.2)  # the run's seed and validation slice
    listed = pq.read_table(extended_copy.run_dir / "gen_002" / "suspects.parquet").to_pandas()
    assert sorted(listed.row_id) == sorted(targets.row_id[suspect])
    assert gen["suspects"]["policy"] == "drop" and gen["suspects"]["rows"] == suspect.sum()
    assert (suspect & training).sum() > 0  # the lever had rows to drop
    assert gen["train"]["rows"] == (training & ~suspect).sum()
    assert "left out of training (method.suspects drop)" in extended_copy.output
    assert NEW_LABEL not in set(listed.label) and (targets.label == 3).sum() > 0


def test_the_new_label_is_appended_and_the_grown_head_starts_from_the_teacher(extended_copy):
    """`--allow-new-labels`: the run's label map gains NEW_LABEL as id 3, recorded with the
    generation that added it; the student's initial model is its teacher with one more head row."""
    from safetensors.torch import load_file

    before, after, run_dir = extended_copy.before, extended_copy.after, extended_copy.run_dir
    gen = after["generations"][2]
    assert after["label_names"] == before["label_names"] + [NEW_LABEL] and gen["new_labels"] == [NEW_LABEL]
    assert gen["initial_model"] == "gen_002/initial_model"
    assert (f"generation 2 adds 1 label(s) the run has never seen to its label map (--allow-new-labels): "
            f"3 = {NEW_LABEL!r}") in extended_copy.output
    assert "[gen 2] the teacher's head grown from 3 to 4 classes" in extended_copy.output
    teacher = before["generations"][1] if before["generations"][1]["promoted"] else before["generations"][0]
    old, grown = (load_file(str(run_dir / folder / "model.safetensors"))
                  for folder in (teacher["model"], gen["initial_model"]))
    assert grown["classifier.weight"].shape[0] == 4 and (grown["classifier.weight"][:3] == old["classifier.weight"]).all()
    assert (grown["classifier.bias"][:3] == old["classifier.bias"]).all() and grown["classifier.bias"][3] == 0
    assert all((grown[k] == v).all() for k, v in old.items() if not k.startswith("classifier."))


def test_the_stored_targets_are_the_rule_on_the_padded_teacher(extended_copy):
    """The 3-class teacher's softmax padded with a zero for NEW_LABEL, then the rule (p = 0.9, no
    floor): a NEW_LABEL row gets 0.9 and the teacher's distribution scaled by 0.1."""
    from incr_ray.method.targets import soft_targets

    targets = pq.read_table(extended_copy.run_dir / "gen_002" / "targets").to_pandas()
    probs, target = np.stack(targets.teacher_probs.to_numpy()), np.stack(targets.target.to_numpy())
    labels = targets.label.to_numpy()
    assert probs.shape == target.shape == (len(targets), 4) and (probs[:, 3] == 0).all()
    np.testing.assert_allclose(probs[:, :3].sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(target, soft_targets(probs, labels, threshold=0.9), rtol=0, atol=1e-12)
    new = labels == 3
    assert new.sum() > 0 and not targets.replay[new].any()  # replay rows come from the run's blocks
    np.testing.assert_allclose(target[new, 3], 0.9)
    np.testing.assert_allclose(target[new, :3], 0.1 * probs[new, :3], rtol=0, atol=1e-12)
    assert (target[~new, 3] == 0).all()


def test_the_extended_model_knows_the_new_label(extended_copy):
    """gen_002/model: 4 labels in its config, loads with transformers.pipeline, and has learned
    NEW_LABEL: on the extension's own holdout, training raised its log-probability more on the rows
    of that label than on the others (against the initial model, whose new head row is random)."""
    from transformers import pipeline

    after, run_dir = extended_copy.after, extended_copy.run_dir
    folder = run_dir / "gen_002" / "model"
    config = json.loads((folder / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(after["label_names"])}
    assert config["label2id"][NEW_LABEL] == 3
    if after["generations"][2]["promoted"]:
        assert after["final_model"] == "gen_002/model"
    held_out = pq.read_table(run_dir / "gen_002" / "own_holdout").to_pandas()
    log_p = {}
    for name in ("model", "initial_model"):
        classify = pipeline("text-classification", model=str(run_dir / "gen_002" / name), top_k=None)
        scores = [{p["label"]: p["score"] for p in row} for row in classify(held_out.text.tolist())]
        assert all(set(s) == set(after["label_names"]) for s in scores)
        log_p[name] = np.log([s[NEW_LABEL] for s in scores])
    new = held_out.label.to_numpy() == 3
    gain = log_p["model"] - log_p["initial_model"]
    assert new.sum() > 0 and gain[new].mean() > gain[~new].mean(), (gain[new].mean(), gain[~new].mean())
    assert "4 labels: `calm`, `storm`, `drizzle`, `hail`" in (folder / "README.md").read_text()
    assert "3 labels" in (run_dir / "gen_001" / "model" / "README.md").read_text()


def test_the_extension_holds_out_its_own_rows(extended_copy):
    """A quarter of the new rows (a seeded hash) held out as the extension's own holdout, scored
    by the generation trained on the rest."""
    from incr_ray.method.hashing import extension_holdout_mask, row_ids

    run_dir, gens = extended_copy.run_dir, extended_copy.after["generations"]
    held_out = pq.read_table(run_dir / "gen_002" / "own_holdout").to_pandas()
    frame = pd.read_csv(extended_copy.new_data)
    ids = row_ids(frame.sentence.tolist(), frame.weather.tolist())
    mask = extension_holdout_mask(ids, 3, 0.25)  # the run's seed
    assert sorted(held_out.row_id) == sorted(ids[mask]) and gens[2]["own_holdout_rows"] == mask.sum()
    assert gens[2]["block_rows"] == 240 - mask.sum()
    assert extended_copy.after["data"]["block_sizes"][2] == 240 - mask.sum()
    assert gens[2]["drift"]["2"]["rows"] == mask.sum() and 0 <= gens[2]["drift"]["2"]["accuracy"] <= 1
    assert "## Drift: accuracy on each data set's own holdout" in (run_dir / "report.md").read_text()


def test_the_gate_and_the_console_say_what_the_extension_did(extended_copy):
    after, output = extended_copy.after, extended_copy.output
    gens = after["generations"]
    teacher = gens[1] if gens[1]["promoted"] else gens[0]
    promoted = gens[2]["promoted"]
    assert after["final_generation"] == (2 if promoted else teacher["index"])
    assert after["final_model"] == f"gen_{after['final_generation']:03d}/model"
    a, b = teacher["metrics"]["accuracy"], gens[2]["metrics"]["accuracy"]
    assert f"extension: holdout accuracy {a:.4f} (gen {teacher['index']}) → {b:.4f} (gen 2)" in output
    if not promoted:
        assert f"the final model stays generation {teacher['index']}" in output
    elif b < a:
        assert "warning: generation 2 is" in output


def test_the_extension_logs_into_the_runs_mlflow_parent(extended_copy):
    from mlflow.tracking import MlflowClient

    after = extended_copy.after
    client = MlflowClient(tracking_uri=f"sqlite:///{extended_copy.run_dir.parent / 'mlflow.db'}")
    parent = client.get_run(after["tracking_run_id"])
    assert after["tracking_run_id"] == extended_copy.before["tracking_run_id"] and parent.info.status == "FINISHED"
    nested = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_gen = {int(r.data.tags["generation"]): r for r in nested}
    assert sorted(by_gen) == [0, 1, 2]
    assert by_gen[2].data.tags["extension.student.learning_rate"] == "0.005"


def _old_new(extended_copy):
    """R5's generation 2, its teacher and its ``old_new`` record."""
    gens = extended_copy.after["generations"]
    teacher = gens[1] if gens[1]["promoted"] else gens[0]
    return gens[2], teacher, gens[2]["old_new"]


def test_old_and_new_classes_are_recorded_on_each_holdout(extended_copy):
    """run.json's ``old_new``: calm, storm and drizzle are old, hail new since generation 2; on the
    run's holdout (old classes only) and on generation 2's own (both), the sides' accuracies
    weigh to the generation's own holdout figures and the classes' rows to the holdout's."""
    gen, teacher, record = _old_new(extended_copy)
    assert record["added_by"] == 2 and record["old_classes"] == 3 and record["new_labels"] == [NEW_LABEL]
    assert record["before"] == teacher["index"] and set(record["holdouts"]) == {"holdout", "2"}
    run_holdout, own = record["holdouts"]["holdout"], record["holdouts"]["2"]
    assert run_holdout["rows"] == run_holdout["old_rows"] == extended_copy.after["data"]["holdout_size"]
    assert run_holdout["new_rows"] == 0 and "new_accuracy" not in run_holdout and NEW_LABEL not in run_holdout["classes"]
    assert run_holdout["accuracy"] == run_holdout["old_accuracy"] == pytest.approx(gen["metrics"]["accuracy"], abs=1e-9)
    held_out = pq.read_table(extended_copy.run_dir / "gen_002" / "own_holdout").to_pandas()
    assert own["rows"] == len(held_out) == gen["own_holdout_rows"]
    assert own["new_rows"] == (held_out.label == 3).sum() > 0 and own["old_rows"] == (held_out.label < 3).sum()
    assert own["accuracy"] == pytest.approx(gen["drift"]["2"]["accuracy"], abs=1e-9)
    assert own["old_accuracy"] * own["old_rows"] + own["new_accuracy"] * own["new_rows"] == pytest.approx(
        own["accuracy"] * own["rows"])
    for h in (run_holdout, own):
        assert sum(c["rows"] for c in h["classes"].values()) == h["rows"]
        assert all(c["recall"] == pytest.approx(c["correct"] / c["rows"]) for c in h["classes"].values())
    assert own["classes"][NEW_LABEL]["rows"] == own["new_rows"]


def test_the_old_classes_forgetting_is_against_the_teacher_on_the_same_rows(extended_copy):
    """Before: the teacher's accuracy on the old-class rows — on the run's holdout its own holdout
    accuracy (every row there is of an old class), on generation 2's data the teacher scored
    there by the extension (checked here again, on the same loading and scoring path)."""
    from incr_ray.config import config_from_dict
    from incr_ray.modeling import classifier_logits, load_for_inference

    gen, teacher, record = _old_new(extended_copy)
    run_holdout, own = record["holdouts"]["holdout"], record["holdouts"]["2"]
    assert run_holdout["old_accuracy_before"] == pytest.approx(teacher["metrics"]["accuracy"], abs=1e-9)
    held_out = pq.read_table(extended_copy.run_dir / "gen_002" / "own_holdout").to_pandas()
    old = held_out[held_out.label < 3]
    cfg = config_from_dict(extended_copy.after["config"])
    model, tokenizer = load_for_inference(str(extended_copy.run_dir / teacher["model"]), cfg, on_gpu=False)
    preds = classifier_logits(model, tokenizer, old.text.tolist(), cfg.model.max_length).argmax(axis=1)
    assert own["old_accuracy_before"] == pytest.approx((preds == old.label.to_numpy()).mean(), abs=1e-9)
    for h in (run_holdout, own):
        assert h["forgetting"] == pytest.approx(h["old_accuracy_before"] - h["old_accuracy"], abs=1e-12)
    assert (f"[gen 2] scoring its teacher (gen {teacher['index']}) on the old classes' rows of gen 2's data"
            in extended_copy.output)


def test_extend_says_the_old_and_new_classes(extended_copy):
    _, teacher, record = _old_new(extended_copy)
    output, h = extended_copy.output, record["holdouts"]["holdout"]
    old = ", ".join(extended_copy.before["label_names"])  # calm, storm, drizzle
    assert f"extension: old classes {old}; new since gen 2: {NEW_LABEL}\n" in output
    assert (f"extension, on the run's holdout ({h['old_rows']} rows of old classes): gen 2 old classes "
            f"{h['old_accuracy']:.4f} ({h['old_accuracy_before']:.4f} by gen {teacher['index']}, ") in output
    own = record["holdouts"]["2"]
    assert (f"extension, on gen 2's data ({own['old_rows']} rows of old classes, {own['new_rows']} of new): gen 2 "
            f"old classes {own['old_accuracy']:.4f}") in output
    assert f"; new classes {own['new_accuracy']:.4f}; all {own['accuracy']:.4f}" in output
    assert ("extension, recall per class on gen 2's data: " in output
            and f"{NEW_LABEL} {own['classes'][NEW_LABEL]['recall']:.4f}" in output)


def test_the_report_and_the_model_cards_show_the_old_and_new_classes(extended_copy):
    _, teacher, record = _old_new(extended_copy)
    run_dir, h = extended_copy.run_dir, record["holdouts"]["holdout"]
    report = (run_dir / "report.md").read_text()
    assert "## Old and new classes" in report
    assert (f"| 2 | run's holdout | {h['old_rows']} / 0 | {h['old_accuracy']:.4f} | "
            f"{h['old_accuracy_before']:.4f} (gen {teacher['index']}) | {100 * h['forgetting']:+.1f} points |") in report
    assert "| gen | data set | " + " | ".join(f"`{n}`" for n in extended_copy.after["label_names"]) + " |" in report
    assert json.loads((run_dir / "report.json").read_text())["generations"][2]["old_new"] == record
    card = (run_dir / "gen_002" / "model" / "README.md").read_text()
    assert "## Old and new classes" in card and f"Generation 2 added `{NEW_LABEL}` to the 3 labels known before" in card
    assert "| 2 | gen 2's data |" in card
    assert "## Old and new classes" not in (run_dir / "gen_001" / "model" / "README.md").read_text()


def test_the_old_and_new_figures_reach_mlflow(extended_copy):
    from mlflow.tracking import MlflowClient

    after, (_, _, record) = extended_copy.after, _old_new(extended_copy)
    client = MlflowClient(tracking_uri=f"sqlite:///{extended_copy.run_dir.parent / 'mlflow.db'}")
    metrics = client.get_run(after["generations"][2]["tracking_run_id"]).data.metrics
    assert metrics["old_new/gen_2/new_accuracy"] == pytest.approx(record["holdouts"]["2"]["new_accuracy"])
    assert metrics["old_new/holdout/forgetting"] == pytest.approx(record["holdouts"]["holdout"]["forgetting"])
    assert metrics[f"old_new/gen_2/recall/{NEW_LABEL}"] == pytest.approx(
        record["holdouts"]["2"]["classes"][NEW_LABEL]["recall"])


def test_evaluate_all_scores_the_older_generations_on_the_labels_they_know(extended_copy):
    """`incr-ray evaluate --all --data` the new data: generations 0 and 1 know 3 of its 4 labels;
    their rows of hail count as wrong (and are said); without --all the final model alone."""
    from conftest import start_local_ray
    from incr_ray.run.loop import evaluate_run

    start_local_ray()
    after, said = extended_copy.after, []
    frame = pd.read_csv(extended_copy.new_data)
    hail = int((frame.weather == NEW_LABEL).sum())
    evaluated = dict(evaluate_run(str(extended_copy.run_dir), str(extended_copy.new_data), all_generations=True,
                                  say=said.append))
    assert sorted(evaluated) == [0, 1, 2] and all(m["n"] == len(frame) for m in evaluated.values())
    assert said == [f"gen {g} knows 3 of the run's 4 labels: its {hail} row(s) of {NEW_LABEL} count as wrong"
                    for g in (0, 1)]
    for g in (0, 1):
        assert evaluated[g]["accuracy"] <= 1 - hail / len(frame) + 1e-12
    final = evaluate_run(str(extended_copy.run_dir), str(extended_copy.new_data), say=said.append)
    assert [g for g, _ in final] == [after["final_generation"]]
    assert final[0][1] == pytest.approx(evaluated[after["final_generation"]])


def test_the_extension_keeps_a_herding_memory_of_the_old_classes_only(extended_copy):
    """`--set replay.per_class/selection=herding`: gen_002/memory.parquet holds MEMORY rows of each
    of the three old classes, chosen by herding on the teacher's features (reproduced here), and
    they are the extension's only replay rows; the new label has none."""
    from folder_checks import check_herding_is_reproduced, check_memory, memory_rows

    run_dir, after = extended_copy.run_dir, extended_copy.after
    said = extended_copy.output.splitlines()
    check_memory(run_dir, after, 2, said, per_class=MEMORY)
    check_herding_is_reproduced(run_dir, after, 2)
    memory = memory_rows(run_dir, 2)
    assert NEW_LABEL not in set(memory.label) and memory.label.nunique() == 3 and set(memory.block) <= {0, 1}
    assert after["config"]["replay"] == {**extended_copy.before["config"]["replay"]}  # the run's own stay


def test_balanced_fine_tuning_ran_after_the_extensions_main_training(extended_copy):
    from folder_checks import check_balanced

    check_balanced(extended_copy.after, 2, extended_copy.output.splitlines(), per_class=MEMORY)
    assert "balanced" not in extended_copy.after["generations"][1]["train"]
    assert "| balanced fine-tuning |" in (extended_copy.run_dir / "gen_002" / "model" / "README.md").read_text()


def test_the_extension_is_taught_by_the_ensemble_of_the_last_two_generations(extended_copy):
    """R1's `teacher.ensemble: 2`: generation 1 had generation 0 alone; the extension (gen 2) the
    mean of generations 0 and 1's softmaxes (when the gate promoted 1), recomputed here."""
    from folder_checks import check_ensemble_targets

    gens = extended_copy.after["generations"]
    assert gens[1]["ensemble"] == [0]
    if gens[1].get("promoted") is False:
        assert gens[2]["ensemble"] == [0]
        return
    check_ensemble_targets(extended_copy.run_dir, extended_copy.after, 2, extended_copy.output.splitlines())
