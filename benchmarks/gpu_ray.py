"""The GPU check's Ray sections (``benchmarks/gpu_check.py``): Ray itself on the GPU machine, from
the bundle's ``site.tar.xz``.

- ``ray_bundle``: a local Ray, a Ray Data actor-pool ``map_batches`` and a one-worker Ray Train V2
  job with a checkpoint; where every actor and worker imported Ray from and which device it had.
  The test suite runs this section with the bundle's Ray alone (``tests/test_gpu_bundle.py``).
- ``ray_train``: a real ``incr-ray train`` (k=2, MiniLM-shaped), a training worker killed (SIGKILL)
  mid-generation 1 after an in-generation checkpoint, the resume; which processes held GPU memory
  when (the teacher pool must release it before training), and the run's scoring rows/s against a
  warm plain ``TargetScorer`` loop on the same GPU.
- ``zero3``: ``incr-ray train`` (k=2) under ZeRO-3 on one GPU: checkpoint, kill (generation 0), resume, the
  consolidated model's bytes, evaluation seconds per forward, and the in-worker holdout NLL against
  ``incr-ray evaluate``'s on the saved model.

Each runs in its own process (the launcher's time limit kills its process group, Ray included).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

LABELS = ["rotten", "fresh"]


def _ray_env() -> None:
    # Ray on 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 binds it there), quiet, no usage report; the section's own Ray.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.pop("RAY_ADDRESS", None)


def _where() -> dict[str, Any]:
    """Where this process imported Ray from, and its device."""
    import ray
    import torch

    cuda = torch.cuda.is_available()
    return {"pid": os.getpid(), "ray_file": ray.__file__, "python": sys.executable,
            "device": f"cuda:{torch.cuda.current_device()} {torch.cuda.get_device_name()}" if cuda else "cpu",
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


# =============================================================================================
# ray_bundle


class _DeviceMapper:
    """A ``map_batches`` class: doubles ``x`` on its device and says where it ran."""

    def __init__(self):
        import torch

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.where = _where()

    def __call__(self, batch):
        import numpy as np
        import torch

        x = torch.as_tensor(batch["x"], device=self.device)
        batch["y"] = (x * 2).cpu().numpy()
        batch["where"] = np.array([json.dumps(self.where)] * len(batch["x"]), dtype=object)
        return batch


def _train_fn(config):
    import tempfile

    import ray.train
    import torch

    ctx = ray.train.get_context()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = torch.nn.Linear(8, 2).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        loss = model(torch.randn(16, 8, device=device)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with tempfile.TemporaryDirectory() as d:
        torch.save(model.state_dict(), os.path.join(d, "model.pt"))
        ray.train.report({"loss": float(loss), "rank": ctx.get_world_rank(), "where": json.dumps(_where())},
                         checkpoint=ray.train.Checkpoint.from_directory(d))


def _train_v2(result) -> bool:
    """Whether the fit ran on Ray Train V2 (its Result subclasses V1's; both are exported as ray.train.Result)."""
    from ray.train.v2._internal.constants import is_v2_enabled
    from ray.train.v2.api.result import Result

    return bool(is_v2_enabled() and isinstance(result, Result))


def check_ray_bundle(ctx, out: dict[str, Any]) -> None:
    """A local Ray, an actor-pool map_batches and a one-worker Ray Train V2 job with a checkpoint."""
    _ray_env()
    import ray

    out["driver"] = _where()
    out.write()
    started = time.perf_counter()
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             **({"num_cpus": 2} if ctx.cpu else {}))
    try:
        out["ray_init_s"] = time.perf_counter() - started
        out["cluster"] = {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")}
        out.write()
        gpu = 1 if ctx.on_gpu else 0
        t = time.perf_counter()
        ds = ray.data.range(400).map_batches(lambda b: {"x": b["id"].astype("float32")})
        rows = ds.map_batches(_DeviceMapper, batch_size=100, compute=ray.data.ActorPoolStrategy(size=1),
                              num_gpus=gpu, num_cpus=0 if gpu else 1).take_all()
        out["data"] = {"rows": len(rows), "seconds": time.perf_counter() - t,
                       "doubled": all(r["y"] == 2 * r["x"] for r in rows),
                       "actors": sorted({r["where"] for r in rows})}
        out.write()

        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        t = time.perf_counter()
        result = TorchTrainer(_train_fn, scaling_config=ScalingConfig(num_workers=1, use_gpu=bool(gpu)),
                              run_config=RunConfig(name="bundle-probe", storage_path=str(ctx.work / "ray-train"))).fit()
        files = sorted(os.listdir(result.checkpoint.path)) if result.checkpoint else []
        out["train"] = {"seconds": time.perf_counter() - t, "metrics": {k: result.metrics.get(k) for k in ("loss", "rank")},
                        "worker": json.loads(result.metrics["where"]), "checkpoint_files": files,
                        "train_v2": _train_v2(result)}
    finally:
        ray.shutdown()
    where = [json.loads(a) for a in out["data"]["actors"]] + [out["train"]["worker"]]
    ray_dirs = {os.path.dirname(w["ray_file"]) for w in [out["driver"], *where]}
    out["summary"] = {"Ray imported from": ", ".join(sorted(ray_dirs)),
                      "actor devices": ", ".join(w["device"] for w in where[:-1]),
                      "train worker device": out["train"]["worker"]["device"],
                      "checkpoint files": out["train"]["checkpoint_files"],
                      "map_batches rows": out["data"]["rows"]}


# =============================================================================================
# The incr-ray train sections


def descendants(root: int) -> dict[int, str]:
    """{pid: command line} of ``root``'s descendants: the run's driver, its Ray, Ray's workers and
    actors (never another user's processes on a shared machine)."""
    import psutil

    try:
        procs = psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    out = {}
    for p in procs:
        try:
            out[p.pid] = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


class GpuMonitor(threading.Thread):
    """Samples, every ``every_s`` seconds, the processes under ``root`` by role (from the process
    titles Ray gives its actors and workers) and which of them hold GPU memory (``nvidia-smi``)."""

    ROLES = (("MapWorker", "teacher actor"), ("RayTrainWorker", "train worker"), ("TrainController", "train controller"),
             ("incr_ray.cli", "driver"))

    def __init__(self, root: int, every_s: float = 0.5):
        super().__init__(daemon=True)
        self.root, self.every_s, self.stop_flag = root, every_s, threading.Event()
        self.samples: list[tuple[float, dict[str, float]]] = []  # (time, {role: MiB on the GPU})
        self.roles_seen: dict[str, set[int]] = {}
        self.started = time.perf_counter()
        self.smi = shutil.which("nvidia-smi") is not None

    @classmethod
    def role(cls, cmdline: str) -> str | None:
        for key, role in cls.ROLES:
            if key in cmdline:
                return role
        return None

    def run(self) -> None:
        while not self.stop_flag.wait(self.every_s):
            now = time.perf_counter() - self.started
            ours = descendants(self.root)
            for pid, cmdline in ours.items():
                role = self.role(cmdline)
                if role:
                    self.roles_seen.setdefault(role, set()).add(pid)
            if not self.smi:
                continue
            proc = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True)
            held: dict[str, float] = {}
            for line in proc.stdout.strip().splitlines():
                try:
                    pid_s, mib = (x.strip() for x in line.split(","))
                    pid = int(pid_s)
                except ValueError:
                    continue
                if pid in ours:
                    role = self.role(ours[pid]) or "other"
                    held[role] = held.get(role, 0.0) + float(mib)
            self.samples.append((now, held))

    def summary(self) -> dict[str, Any]:
        """Devices by role, and whether the teacher pool had released the GPU before training held it."""
        on_gpu = sorted({r for _, held in self.samples for r in held})
        out: dict[str, Any] = {"nvidia_smi": self.smi, "samples": len(self.samples),
                               "processes_by_role": {r: len(p) for r, p in sorted(self.roles_seen.items())},
                               "roles_on_gpu": on_gpu,
                               "roles_on_cpu_only": sorted(set(self.roles_seen) - set(on_gpu))}
        if self.smi:
            both = [t for t, held in self.samples if held.get("teacher actor") and held.get("train worker")]
            out["samples_teacher_and_trainer_both_on_gpu"] = len(both)
            out["pool_released_gpu_before_training"] = not both
            out["peak_mib_by_role"] = {r: max(h.get(r, 0.0) for _, h in self.samples) for r in on_gpu}
            # A coarse timeline: the first and last time each role held memory.
            out["gpu_spans_s"] = {r: [round(min(t for t, h in self.samples if h.get(r)), 1),
                                      round(max(t for t, h in self.samples if h.get(r)), 1)] for r in on_gpu}
        return out


def _kill_train_worker_when(root: int, checkpoints_under: Path, generation: int, deadline: float,
                            log: dict[str, Any]) -> None:
    """Once an in-generation checkpoint of ``generation`` exists under the run's Ray Train storage,
    SIGKILL the run's Ray Train worker (a descendant of ``root``), as an OOM kill or a lost node ends it."""
    tag = f"gen_{generation:03d}-"
    while time.monotonic() < deadline:
        found = [p for p in checkpoints_under.glob(f"{tag}*/checkpoint_*") if p.is_dir()]
        if found:
            time.sleep(3)  # Ray Train's controller registers a reported checkpoint on its next poll
            pids = [pid for pid, cmd in descendants(root).items() if GpuMonitor.role(cmd) == "train worker"]
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            log.update(killed_pids=pids, killed_after_checkpoint=found[0].name, killed_at=time.strftime("%H:%M:%S"))
            return
        time.sleep(0.2)
    log["kill"] = "no in-generation checkpoint appeared in time: nothing killed"


def run_cli_train(ctx, name: str, raw: dict[str, Any], kill_generation: int | None, out: dict[str, Any],
                  reserve_s: float) -> tuple[Path, dict[str, Any]]:
    """``incr-ray train`` on ``raw`` as a subprocess (its output into the section's log), the
    monitor running and a training worker killed in ``kill_generation``; returns the run folder and
    its run.json. Leaves ``reserve_s`` of the section's time for what comes after."""
    import yaml

    _ray_env()
    cfg_path = ctx.work / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    run_dir = Path(raw["storage"]["path"]) / raw["run"]["name"]
    kill: dict[str, Any] = {}
    budget = max(30.0, ctx.left() - reserve_s)
    started = time.perf_counter()
    sys.stdout.flush()
    proc = subprocess.Popen([sys.executable, "-m", "incr_ray.cli", "train", "--config", str(cfg_path)], cwd=ctx.root)
    monitor = GpuMonitor(proc.pid)
    monitor.start()
    if kill_generation is not None:
        threading.Thread(target=_kill_train_worker_when, daemon=True,
                         args=(proc.pid, run_dir / "_ray_train", kill_generation, time.monotonic() + budget, kill)).start()
    try:
        rc = proc.wait(timeout=budget)
        out["exit_code"] = rc
    except BaseException:
        proc.kill()  # its Ray goes with it (Ray's processes die with their driver)
        raise
    finally:
        out["seconds_train"] = time.perf_counter() - started
        monitor.stop_flag.set()
        monitor.join(timeout=5)
        out["kill"] = kill
        out["devices"] = monitor.summary()
        out.write()
    if rc != 0:
        raise RuntimeError(f"incr-ray train exited {rc} (its output: the section's log)")
    return run_dir, json.loads((run_dir / "run.json").read_text())


def _text_file(ctx, rows: int) -> Path:
    data = ctx.work / "ray-data.parquet"
    df = ctx.texts().head(rows).copy()
    df["label"] = df["label"].map(dict(enumerate(LABELS)))
    df.to_parquet(data, index=False)
    return data


def check_ray_train(ctx, out: dict[str, Any]) -> None:
    """A real ``incr-ray train`` through Ray Train + Ray Data, k=2, a worker killed in generation 1."""
    st = (dict(rows=300, max_length=32, batch=8, epochs=2, every=3, teacher_batch=32, warm_batches=3) if ctx.cpu else
          dict(rows=2400, max_length=128, batch=32, epochs=2, every=10, teacher_batch=256, warm_batches=8))
    base = ctx.minilm_model()
    raw = {
        "run": {"name": "gpu-check-k2", "seed": 0}, "storage": {"path": str(ctx.work / "runs")},
        "data": {"source": str(_text_file(ctx, st["rows"])), "labels": LABELS, "eval_fraction": 0.15},
        "model": {"base": base, "max_length": st["max_length"]},
        "method": {"k": 2}, "student": {"epochs": st["epochs"], "min_steps": 0, "learning_rate": 1e-4, "batch_size": st["batch"],
                                        "checkpoint_every_steps": st["every"], "max_failures": 1},
        "deepspeed": {"stage": "auto"}, "cluster": {"workers": 1},
        "teacher": {"batch_size": st["teacher_batch"]},
    }
    out.update(settings=st, model=base)
    run_dir, manifest = run_cli_train(ctx, "ray-train", raw, kill_generation=1, out=out, reserve_s=25)
    gens = manifest["generations"]
    out["generations"] = [{k: g.get(k) for k in ("index", "rows", "scoring_seconds", "eval_seconds", "seconds", "metrics")}
                          | {"train": g.get("train")} for g in gens]
    g1 = gens[1]
    train1 = g1.get("train") or {}
    scoring_rps = (g1.get("rows") or 0) / g1["scoring_seconds"] if g1.get("scoring_seconds") else None
    out.write()

    # The same teacher over the same rows, warm, in this process: what the pool's rate compares with.
    warm = warm_plain_loop(ctx, str(run_dir / gens[0]["model"]), raw, st["teacher_batch"], st["warm_batches"])
    out["warm_plain_loop"] = warm
    devices = out["devices"]
    out["summary"] = {
        "worker killed (pids) in generation 1": out["kill"].get("killed_pids") or out["kill"].get("kill"),
        "generation 1 resumed from step": train1.get("resumed_from_step"),
        "generation 1 steps / max": f"{train1.get('steps')} / {train1.get('max_steps')}",
        "roles on the GPU": devices.get("roles_on_gpu"),
        "roles on CPU only": devices.get("roles_on_cpu_only"),
        "teacher pool released the GPU before training": devices.get("pool_released_gpu_before_training"),
        "run scoring rows/s (pool start-up included)": scoring_rps,
        "warm plain loop rows/s (same GPU, same teacher)": warm["rows_per_s"],
        "run scoring / warm plain loop": scoring_rps / warm["rows_per_s"] if scoring_rps else None,
        "generation 1 holdout accuracy": (g1.get("metrics") or {}).get("accuracy"),
    }


def warm_plain_loop(ctx, model_dir: str, raw: dict[str, Any], batch: int, batches: int) -> dict[str, Any]:
    """``TargetScorer`` over ``batches`` batches of real text in one process, after one warm-up batch."""
    from incr_ray.config import config_from_dict
    from incr_ray.generation.teacher import TargetScorer

    cfg = config_from_dict({**raw, "data": {"source": "rotten_tomatoes", "binary": True, "labels": LABELS}})
    df = ctx.texts()
    rows = [{"text": df["text"].astype(str).to_numpy(dtype=object)[i:i + batch],
             "label": df["label"].to_numpy()[i:i + batch]} for i in range(0, batch * (batches + 1), batch)]
    scorer = TargetScorer(model_dir, cfg, on_gpu=ctx.on_gpu)
    scorer(rows[0])
    t = time.perf_counter()
    n = sum(scorer(b).num_rows for b in rows[1:])
    dt = time.perf_counter() - t
    return {"rows": n, "batch": batch, "seconds": dt, "rows_per_s": n / dt}


def check_zero3(ctx, out: dict[str, Any]) -> None:
    """ZeRO-3 through Ray Train on one GPU: checkpoint, kill, resume, save, evaluate (item 8's two NLLs)."""
    st = (dict(rows=240, max_length=32, batch=8, epochs=2, every=3, shape=None) if ctx.cpu else
          dict(rows=1200, max_length=128, batch=32, epochs=1, every=5,
               shape=dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
                          intermediate_size=2816, max_position_embeddings=512)))
    base = ctx.random_model("llama", st["shape"], ctx.work / "zero3-base")
    raw = {
        "run": {"name": "gpu-check-zero3", "seed": 0}, "storage": {"path": str(ctx.work / "runs")},
        "data": {"source": str(_text_file(ctx, st["rows"])), "labels": LABELS, "eval_fraction": 0.15},
        "model": {"base": base, "max_length": st["max_length"]},
        "method": {"k": 2}, "student": {"epochs": st["epochs"], "min_steps": 0, "learning_rate": 1e-4, "batch_size": st["batch"],
                                        "checkpoint_every_steps": st["every"], "max_failures": 1},
        "deepspeed": {"stage": 3}, "cluster": {"workers": 1}, "eval": {"batch_size": 64},
    }
    out.update(settings={k: v for k, v in st.items()}, model=base)
    run_dir, manifest = run_cli_train(ctx, "zero3", raw, kill_generation=0, out=out, reserve_s=30)
    gens = manifest["generations"]
    g0, last = gens[0], gens[-1]  # the kill was in generation 0; the NLLs compared on the final model
    train = g0.get("train") or {}
    model_dir = run_dir / last["model"]
    saved = {p.name: p.stat().st_size for p in model_dir.iterdir() if p.is_file()}
    out.update(generations=gens, saved_files=saved)
    out.write()

    # The saved model through `incr-ray evaluate`'s code on the same holdout.
    import ray

    from incr_ray.run.loop import evaluate_run

    ray.init(address="local", include_dashboard=False, log_to_driver=False, **({"num_cpus": 2} if ctx.cpu else {}))
    try:
        t = time.perf_counter()
        (_, saved_metrics), = evaluate_run(str(run_dir))
        out["saved_model_eval"] = {**saved_metrics, "seconds": time.perf_counter() - t}
    finally:
        ray.shutdown()
    in_worker = last.get("metrics") or {}
    holdout_n = in_worker.get("n") or saved_metrics.get("n")
    forwards = -(-int(holdout_n or 0) // raw["eval"]["batch_size"]) if holdout_n else None
    eval_s = (last.get("train") or {}).get("eval_seconds", last.get("eval_seconds"))
    out["summary"] = {
        "ZeRO stage": train.get("zero_stage"),
        "worker killed (pids)": out["kill"].get("killed_pids") or out["kill"].get("kill"),
        "resumed from step": train.get("resumed_from_step"),
        "steps / max": f"{train.get('steps')} / {train.get('max_steps')}",
        "consolidated save bytes": sum(v for k, v in saved.items() if k.endswith((".safetensors", ".bin"))),
        "evaluation seconds": eval_s,
        "evaluation seconds per forward (holdout rows / eval.batch_size)": eval_s / forwards if eval_s and forwards else None,
        "final model: in-worker holdout NLL": in_worker.get("nll"),
        "final model: saved, holdout NLL (incr-ray evaluate)": saved_metrics.get("nll"),
        "|NLL difference|": abs(in_worker["nll"] - saved_metrics["nll"]) if "nll" in in_worker else None,
        "roles on the GPU": out["devices"].get("roles_on_gpu"),
    }
