"""``incr-ray``: train | extend | compare | evaluate | status | suspects | predict | push | plan.

Exit codes: 0 success, 2 bad usage/config/data (one line on stderr, no traceback), 1 anything
unexpected (with its traceback, since that is our bug) — or, for ``push``, a Hub that could not be
reached or refused the upload (one line, no traceback).

The package is imported per command, inside each ``cmd_*``: ``--help``, ``plan`` and ``predict``
must not pay for importing Ray, and a config error is reported before Ray starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

EXIT_USAGE = 2
EXIT_HUB = 1


class UsageError(ValueError):
    pass


def _user_errors() -> tuple[type[BaseException], ...]:
    from .config import ConfigError
    from .data import DataError
    from .modeling import ModelError
    from .run.manifest import RunError
    from .storage import StorageError

    return (ConfigError, DataError, ModelError, RunError, StorageError, UsageError)


def _quiet_env() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def init_ray(address: str | None) -> None:
    """Local Ray unless an address is given (``--address`` or ``RAY_ADDRESS``)."""
    import logging

    import ray

    if ray.is_initialized():  # started by the caller (tests, a notebook)
        _ray_data_logs_to_file_only()
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # Attached to a cluster: `cluster.use_gpu: auto` then refuses to fall back to CPU (it may
        # autoscale GPU nodes in later); incr_ray.resolve.probe_cluster reads this.
        os.environ["RAY_ADDRESS"] = address
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
                        "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning"}}
    # Workers' output stays in the session's log files; the driver's "ray" logger says only warnings.
    quiet = {"runtime_env": env, "log_to_driver": False, "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **quiet)
    else:
        # "local" starts a fresh single-node cluster; a bare ray.init() could attach to a stale one.
        ray.init(address="local", include_dashboard=False, **quiet)
    _ray_data_logs_to_file_only()
    for name in ("ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _ray_data_logs_to_file_only() -> None:
    """Keep Ray Data's log records off the console; they still go to ``logs/ray-data/`` in Ray's session folder.

    Ray Data logs a failed read task with its whole traceback (streaming_executor_state.py,
    ``_record_errored_block``) and again on the way out (exceptions.py, ``omit_traceback_stdout``)
    through the "console" handler its logging config puts on the "ray.data" logger
    (ray/data/_internal/logging.py, ``DEFAULT_CONFIG``) -- before the error reaches :func:`main`,
    which reports bad input as one line. Our own one-line-per-step progress replaces its
    per-dataset INFO logs, and its progress bars unless the console is a terminal.
    """
    import logging

    from ray.data import DataContext
    from ray.data._internal.logging import SessionFileHandler

    # On a terminal Ray Data's progress bars show teacher scoring (and reads) as they go; elsewhere
    # (a log file, `ray job submit`) they would be noise, and the scoring prints a line per tenth.
    DataContext.get_current().enable_progress_bars = sys.stdout.isatty()
    logger = logging.getLogger("ray.data")
    for handler in list(logger.handlers):
        if not isinstance(handler, SessionFileHandler):
            logger.removeHandler(handler)


def _config(args) -> Any:
    from .config import load_config

    return load_config(args.config, args.set or [])


def cmd_train(args) -> int:
    cfg = _config(args)  # before the heavy imports below: a config error is reported at once
    from .run.folder import claim_run
    from .run.preflight import check_model_and_storage

    check_model_and_storage(cfg)  # before Ray starts
    # An existing run is locked, and its run.json checked against cfg, before Ray starts too (and
    # before the training stack is imported): a second train on a run in use, or with changed
    # settings, is refused at once.
    with claim_run(cfg) as lock:
        from .run.loop import run_generations

        init_ray(args.address)
        manifest = run_generations(cfg, lock=lock)
    _print_final(manifest)
    return 0


def _print_final(manifest: dict[str, Any]) -> None:
    from .run.report import final_entry, table_markdown

    gens = [g for g in manifest["generations"] if g.get("status") == "finished"]
    print()
    print(table_markdown(gens))
    final = final_entry(manifest)  # a generation gate (method.keep_best) may keep an earlier one
    print(f"final model: {os.path.join(manifest['run_dir'], final['model'])} (generation {final['index']})  "
          f"holdout accuracy {final['metrics']['accuracy']:.4f}")


def _check_run_and_data(run_dir: str, data_path: str | None) -> None:
    """What can be checked without Ray: ``run_dir`` is a run folder, a local ``data_path`` exists."""
    from .run.folder import read_manifest
    from .storage import absolute, is_remote

    read_manifest(run_dir)
    if data_path and not is_remote(data_path) and not os.path.exists(absolute(data_path)):
        raise UsageError(f"--data {data_path!r} does not exist; point --data at a csv, jsonl or parquet file or folder")


def cmd_extend(args) -> int:
    from .run.folder import claim_finished

    if not 0.0 <= args.holdout_fraction < 1.0:
        raise UsageError(f"--holdout-fraction {args.holdout_fraction} is not a share in [0, 1); e.g. 0.2")
    _check_run_and_data(args.run, args.data)
    with claim_finished(args.run, args.set or []) as lock:  # locked and checked before Ray starts
        from .run.loop import extend_run

        init_ray(args.address)
        manifest = extend_run(args.run, args.data, args.set or [], holdout_fraction=args.holdout_fraction,
                              lock=lock, allow_new_labels=args.allow_new_labels)
    _print_final(manifest)
    return 0


def cmd_compare(args) -> int:
    from .compare.trials import run_compare
    from .config import load_config, raw_config
    from .run.preflight import check_model_and_storage

    raw = raw_config(args.config)
    check_model_and_storage(load_config(args.config, args.set or []))  # before Ray starts
    summary = run_compare(raw, args.set or [], args.seeds, args.against, args.grid or [], args.max_concurrent,
                          start_ray=lambda: init_ray(args.address))
    from .compare.report import render_markdown

    print()
    print(render_markdown(summary))
    if any(t.get("status") == "stopped" for t in summary["trials"]):
        print("incr-ray: interrupted; run the same command again to resume the stopped trials", file=sys.stderr)
        return 130
    failed = [t for t in summary["trials"] if t.get("status") != "finished"]
    return 1 if failed and len(failed) == len(summary["trials"]) else 0


def cmd_evaluate(args) -> int:
    from .run.loop import evaluate_run

    _check_run_and_data(args.run, args.data)
    init_ray(args.address)
    rows = evaluate_run(args.run, args.data, all_generations=args.all)
    print(f"{'gen':>4} {'accuracy':>9} {'macro_f1':>9} {'nll':>8} {'ece':>8} {'n':>7}")
    for g, m in rows:
        print(f"{g:>4} {m['accuracy']:>9.4f} {m['macro_f1']:>9.4f} {m['nll']:>8.4f} {m['ece']:>8.4f} {m['n']:>7}")
    return 0


def cmd_status(args) -> int:
    from .run.status import read_status

    print(read_status(args.run))  # run.json and progress.json only: no Ray
    return 0


def cmd_suspects(args) -> int:
    from .run.suspects import run_suspects

    g, table, record = run_suspects(args.run, args.generation)  # run.json and Parquet only: no Ray
    shown = table.slice(0, args.top) if args.top else table
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        shown.to_pandas().to_csv(args.csv, index=False)
    print(f"generation {g}: {record['rows']} of {record['block_rows']} block rows ({100 * record['share']:.1f}%) "
          f"get under {record['below']:g} of the teacher for their label; the student was set to "
          f"{record['policy']} them (method.suspects)" + (f"; {shown.num_rows} written to {args.csv}" if args.csv else ""))
    if shown.num_rows:
        print(f"{'row_id':>8}  {'label':<12} {'teacher':<12} {'p(teacher)':>10} {'p(label)':>9}  text")
        for r in shown.slice(0, args.top or 20).to_pylist():
            text = r["text"] if len(r["text"]) <= 70 else r["text"][:67] + "..."
            print(f"{r['row_id']:>8}  {r['label'][:12]:<12} {r['teacher_class'][:12]:<12} {r['teacher_prob']:>10.3f} "
                  f"{r['label_prob']:>9.3f}  {text}")
    return 0


def cmd_predict(args) -> int:
    from .predict import predict_texts

    if not args.texts:
        raise UsageError("give at least one text to classify, e.g. incr-ray predict --model DIR \"great film\"")
    for text, ranked in zip(args.texts, predict_texts(args.model, args.texts)):
        probs = "  ".join(f"{name}={p:.3f}" for name, p in ranked)
        print(f"{ranked[0][0]}\t{probs}\t{text}")
    return 0


def cmd_push(args) -> int:
    from .run.push import HubError, files_to_upload, model_to_push, repo_id_problem, upload_model

    problem = repo_id_problem(args.repo)
    if problem:
        raise UsageError(problem)
    g, folder = model_to_push(args.run, args.generation)
    files = files_to_upload(folder)
    print(f"pushing generation {g} of {args.run} ({len(files)} files: {', '.join(files)}) to {args.repo}")
    try:
        url = upload_model(folder, args.repo, private=args.private, token=args.token,
                           message=f"incr-ray push: generation {g} of run {Path(args.run.rstrip('/')).name}")
    except HubError as err:
        print(f"incr-ray: error: {err}", file=sys.stderr)
        return EXIT_HUB
    print(f"pushed: {url}")
    return 0


def cmd_plan(args) -> int:
    from .plan import plan_text

    print(plan_text(_config(args), params_override=args.params, hidden_size=args.hidden_size, layers=args.layers,
                    heads=args.heads, gpus_per_node=args.gpus_per_node, cpu_memory_gb=args.cpu_memory_gb), end="")
    return 0


def _param_count(text: str) -> int:
    from .plan import parse_count

    try:
        return parse_count(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be positive")
        return value

    parse.__name__ = kind.__name__
    return parse


def _plan_epilog() -> str:
    from .plan import KNOWN_SHAPES

    return ("Where the parameter count comes from, in order: --params; else model.base as a local model folder "
            "(or minilm), built on the meta device without loading weights; else a built-in shape usable as "
            "model.base here only: " + ", ".join(KNOWN_SHAPES) + ". "
            "Example: incr-ray plan --config jobs/gpu_cluster.yaml --set model.base=llama-70b --set cluster.workers=8")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="incr-ray", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp):
        sp.add_argument("--config", help="YAML config file (see jobs/*.yaml)")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. method.k=4")

    def with_address(sp):
        sp.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a new local Ray)")

    t = sub.add_parser("train", help="train all generations (resumes an interrupted run)")
    with_config(t)
    with_address(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("extend", help="train one more generation of a finished run on new data")
    e.add_argument("--run", required=True, help="run folder (storage.path/run.name)")
    e.add_argument("--data", required=True, help="new labelled data file (csv, jsonl, parquet)")
    e.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override resource settings, or how the new generation trains: student.learning_rate, "
                        "student.schedule (run: at 10%% of the peak, no warmup back to it), student.min_steps, "
                        "student.epochs, ...")
    e.add_argument("--holdout-fraction", type=float, default=0.0, metavar="F",
                   help="carve this share of the new data off as its own holdout (seeded per-row hash): this and "
                        "every later generation is scored on it, so drift and forgetting show (default 0: off)")
    e.add_argument("--allow-new-labels", action="store_true",
                   help="labels the run has never seen become new classes: appended to the label map (old ids "
                        "stay), the head grown (old rows kept, new rows from run.seed); without it they are refused")
    with_address(e)
    e.set_defaults(func=cmd_extend)

    c = sub.add_parser(
        "compare", help="does the config help on this data? its variants × seeds as Ray Tune trials, paired by seed",
        description="Run the config, each --against baseline and each --grid value on --seeds seeds (run.seed, "
        "run.seed+1, ...) as Ray Tune trials, each a normal run folder in <storage.path>/<run.name>/, and report "
        "each variant minus the config's own run per seed, with the 95%% interval of the mean difference, in "
        "compare.{json,md,png} there. The same command again reads finished trials back and runs the rest.")
    with_config(c)
    c.add_argument("--seeds", type=_positive(int), default=3, metavar="N", help="seeds per variant (default 3, at least 2)")
    c.add_argument("--against", metavar="NAMES",
                   help="baselines, comma-separated: full (one fine-tune on all training rows, method.k=1), "
                        "sequential (the same blocks with one-hot targets, method.threshold=1)")
    c.add_argument("--grid", action="append", metavar="KEY=V1,V2",
                   help="one variant per value of a setting, e.g. --grid method.threshold=0.8,0.95 (repeatable)")
    c.add_argument("--max-concurrent", type=_positive(int), metavar="N",
                   help="trials at once (default: as many runs as the cluster's CPUs and GPUs hold)")
    with_address(c)
    c.set_defaults(func=cmd_compare)

    v = sub.add_parser("evaluate", help="holdout (or --data) metrics of a run's final model")
    v.add_argument("--run", required=True)
    v.add_argument("--data", help="labelled file to evaluate on instead of the run's holdout")
    v.add_argument("--all", action="store_true", help="every generation, not only the final one")
    with_address(v)
    v.set_defaults(func=cmd_evaluate)

    st = sub.add_parser("status", help="where a run stands (generation, step, last metrics, ETA), from its folder "
                        "alone; starts no Ray")
    st.add_argument("--run", required=True, help="run folder (storage.path/run.name), local or a storage URI")
    st.set_defaults(func=cmd_status)

    sp = sub.add_parser("suspects", help="the rows whose teacher contradicts their label with confidence "
                        "(suspected label errors), surest first, from the run folder alone; starts no Ray")
    sp.add_argument("--run", required=True, help="run folder (storage.path/run.name), local or a storage URI")
    sp.add_argument("--generation", type=int, metavar="G", help="this generation's (default: the last that has any)")
    sp.add_argument("--top", type=_positive(int), metavar="N", help="only the N surest (default: print 20, write all)")
    sp.add_argument("--csv", metavar="FILE", help="write them (all, or --top N) to this CSV file")
    sp.set_defaults(func=cmd_suspects)

    r = sub.add_parser("predict", help="classify texts with a model folder")
    r.add_argument("--model", required=True)
    r.add_argument("texts", nargs="*")
    r.set_defaults(func=cmd_predict)

    u = sub.add_parser("push", help="upload a run's final model (or --generation G), model card included, to a "
                       "Hugging Face Hub repo")
    u.add_argument("--run", required=True, help="run folder (storage.path/run.name)")
    u.add_argument("--repo", required=True, metavar="OWNER/NAME", help="Hub model repo, created if missing")
    u.add_argument("--generation", type=int, metavar="G",
                   help="push this finished generation instead of the run's final model")
    u.add_argument("--private", action="store_true", help="create the repo private")
    u.add_argument("--token", help="Hub token with write access (default: HF_TOKEN or `hf auth login`)")
    u.set_defaults(func=cmd_push)

    pl = sub.add_parser(
        "plan", help="per-GPU memory of the student (ZeRO 0-3, offload) and the teacher, and a recommendation; "
        "starts neither Ray nor training", epilog=_plan_epilog(),
        description="Print, for the config's base model and cluster, the student's per-GPU memory at ZeRO "
        "stages 0-3 with and without CPU offload (ZeRO-paper formulas next to DeepSpeed's own estimators), "
        "activations per micro-batch, the teacher's inference memory and GPUs per actor, and a recommendation; "
        "warn when the configured deepspeed section will not fit cluster.gpu_memory_gb. Units: GiB (2^30 bytes).")
    with_config(pl)
    pl.add_argument("--params", type=_param_count, metavar="N",
                    help="parameter count instead of reading model.base, e.g. 7e9 or 70B")
    pl.add_argument("--hidden-size", type=_positive(int), metavar="H", help="hidden size, for activation estimates")
    pl.add_argument("--layers", type=_positive(int), metavar="L", help="transformer layers, for activation estimates")
    pl.add_argument("--heads", type=_positive(int), metavar="A",
                    help="attention heads (default: hidden size / 128)")
    pl.add_argument("--gpus-per-node", type=_positive(int), metavar="G",
                    help="GPUs per node (default: all cluster.workers on one node); sets CPU memory per node")
    pl.add_argument("--cpu-memory-gb", type=_positive(float), metavar="GIB",
                    help="host memory per node in GiB; when given, offload rows must fit it too")
    pl.set_defaults(func=cmd_plan)

    return p


def main(argv: list[str] | None = None) -> int:
    _quiet_env()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as err:
        print(f"incr-ray: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("incr-ray: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
