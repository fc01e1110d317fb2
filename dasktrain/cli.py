"""The ``dasktrain`` command line.

Commands (``dasktrain COMMAND --help`` for each):

* ``quickstart``: generate (once) a 1.2 GB synthetic classification dataset,
  train logistic regression out of core on an embedded cluster, report.
* ``make-data``: write a synthetic classification or regression dataset.
* ``inspect STORE``: describe a dataset or parameter store.
* ``train DATA --store RUN``: train a model (flags, or a TOML config file).
* ``evaluate RUN DATA``: loss and metrics of a trained run on a dataset.
* ``predict RUN DATA --out FILE``: predictions to ``.npy`` or a Zarr store.

Exit codes: 0 success; 1 a dasktrain error (bad store, bad data, locked
store, divergence...), message on stderr; 2 bad command-line usage;
130 interrupted (the run's last good step is committed).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import tomllib
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

QUICKSTART_ROWS = 3_000_000
QUICKSTART_FEATURES = 100
QUICKSTART_DATA = os.path.join("data", "quickstart.zarr")
QUICKSTART_RUN = os.path.join("runs", "quickstart.zarr")

MODELS = ("logistic", "linear", "softmax", "poisson", "gamma", "mlp")
#: ``auto`` (the default): Newton for the linear models and GLMs (the fastest
#: to the optimum in benchmarks/compare_peers.py) when their Hessian is small
#: enough, L-BFGS otherwise (the MLP, wide data).
OPTIMIZERS = ("auto", "newton", "lbfgs", "adam", "adamw", "sgd", "adagrad")


#: The table of a ``train --config`` file that holds fsspec storage options.
STORAGE_OPTIONS_TABLE = "storage_options"


class UsageError(Exception):
    """Bad flags or config (exit code 2)."""


# -- building blocks ---------------------------------------------------------------
def parse_storage_option(text: str) -> tuple[list[str], Any]:
    """One ``--storage-option``: ``KEY=VALUE`` (a string) or ``KEY:=JSON``
    (a JSON value: ``true``, ``3``, ``{"region_name": "eu-west-1"}``); a
    dotted ``KEY`` sets a nested option (``client_kwargs.region_name=...``).

    Examples
    --------
    >>> parse_storage_option("endpoint_url=http://127.0.0.1:9000")
    (['endpoint_url'], 'http://127.0.0.1:9000')
    >>> parse_storage_option("anon:=false")
    (['anon'], False)
    >>> parse_storage_option("client_kwargs.region_name=eu-west-1")
    (['client_kwargs', 'region_name'], 'eu-west-1')
    """
    key, sep, value = text.partition("=")
    if not sep:
        raise UsageError(
            f"--storage-option {text!r}: expected KEY=VALUE (a string) or "
            f"KEY:=JSON (a JSON value)"
        )
    parsed: Any = value
    if key.endswith(":"):
        key = key[:-1]
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise UsageError(
                f"--storage-option {text!r}: the value after ':=' is not JSON ({exc})"
            ) from exc
    path = key.split(".")
    if not all(part.strip() for part in path):
        raise UsageError(f"--storage-option {text!r}: empty key")
    return [part.strip() for part in path], parsed


def _set_option(options: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        inner = options.setdefault(part, {})
        if not isinstance(inner, dict):
            raise UsageError(
                f"storage option {'.'.join(path)!r}: {part!r} is already set to "
                f"a value, not a table"
            )
        options = inner
    options[path[-1]] = value


def _storage_options(
    args: argparse.Namespace, base: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """fsspec options for every store a command touches: ``base`` (a config
    file's ``[storage_options]`` table), then each ``--storage-option``.
    ``None`` if there are none (filesystems configure themselves from the
    environment)."""
    options: dict[str, Any] = dict(base or {})
    for text in getattr(args, "storage_option", None) or ():
        path, value = parse_storage_option(text)
        _set_option(options, path, value)
    return options or None


def _client(address: str | None) -> Any:
    from dasktrain.engine.cluster import get_client

    return get_client(address)


def _build_model(cfg: dict[str, Any], n_classes: int | None) -> Any:
    from dasktrain import models

    kind = cfg.get("model", "logistic")
    l2 = float(cfg.get("l2", 0.0))
    l1 = float(cfg.get("l1", 0.0))
    if kind == "logistic":
        return models.LogisticRegression(l2=l2, l1=l1)
    if kind == "linear":
        return models.LinearRegression(l2=l2, l1=l1)
    if kind == "poisson":
        return models.PoissonRegression(l2=l2, l1=l1)
    if kind == "gamma":
        return models.GammaRegression(l2=l2, l1=l1)
    if kind == "softmax":
        k = cfg.get("n_classes", n_classes)
        if k is None:
            raise UsageError("--model softmax needs --n-classes")
        return models.SoftmaxRegression(int(k), l2=l2, l1=l1)
    if kind == "mlp":
        hidden = tuple(int(h) for h in cfg.get("hidden", (64,)))
        loss = cfg.get("loss", "logistic")
        n_out = int(cfg.get("n_classes", n_classes or 1)) if loss == "softmax" else 1
        return models.MLP(hidden=hidden, n_outputs=n_out, loss=loss, l2=l2)
    raise UsageError(f"unknown model {kind!r}; choose one of {', '.join(MODELS)}")


def _build_optimizer(cfg: dict[str, Any], model: Any, n_features: int) -> Any:
    from dasktrain import optim
    from dasktrain.models.glm import coef_shape, supports_second_order
    from dasktrain.optim.newton import MAX_HESSIAN_PARAMS

    kind = cfg.get("optimizer", "auto")
    lr = float(cfg.get("learning_rate", 1e-2))
    clip = cfg.get("clip_norm")
    clip = None if clip is None else float(clip)
    tol = float(cfg.get("tol", 1e-6))
    if kind in ("auto", "newton"):
        rows, k = coef_shape(model, n_features)
        fits = supports_second_order(model) and rows * k <= MAX_HESSIAN_PARAMS
        if fits:
            return optim.Newton(tol=tol)
        if kind == "newton":
            raise UsageError(
                f"--optimizer newton needs a linear model or GLM with at most "
                f"{MAX_HESSIAN_PARAMS} coefficients; use lbfgs"
            )
        return optim.LBFGS(tol=tol)
    if kind == "lbfgs":
        return optim.LBFGS(tol=tol)
    if kind == "adam":
        return optim.Adam(lr, clip_norm=clip)
    if kind == "adamw":
        return optim.AdamW(
            lr, weight_decay=float(cfg.get("weight_decay", 1e-2)), clip_norm=clip
        )
    if kind == "sgd":
        return optim.SGD(lr, momentum=float(cfg.get("momentum", 0.0)), clip_norm=clip)
    if kind == "adagrad":
        return optim.Adagrad(lr, clip_norm=clip)
    raise UsageError(
        f"unknown optimizer {kind!r}; choose one of {', '.join(OPTIMIZERS)}"
    )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)


# -- commands ------------------------------------------------------------------------
def cmd_quickstart(args: argparse.Namespace) -> int:
    import dasktrain as dt

    options = _storage_options(args)
    handle = _client(args.scheduler)
    client = handle.client
    try:
        print(f"Dask dashboard: {client.dashboard_link}")
        print(f"  (the live training page is {_page_link(client.dashboard_link)})")
        t0 = time.perf_counter()
        ds = dt.datasets.make_classification(
            args.data,
            n_rows=args.rows,
            n_features=args.features,
            chunk_rows=args.chunk_rows,
            seed=0,
            client=client,
            storage_options=options,
        )
        gb = ds.nbytes / 1e9
        print(
            f"Dataset: {ds.path}: {ds.n_rows:,} rows x {ds.n_features} features, "
            f"{ds.n_chunks} chunks, {gb:.2f} GB uncompressed "
            f"(ready in {time.perf_counter() - t0:.1f} s)"
        )
        train, val = ds.split(val_fraction=0.1, seed=0)
        if _path_exists(args.run, options):
            _remove_run(args.run, options)
        model = dt.models.LogisticRegression(l2=1e-4)
        optimizer = dt.optim.Newton()
        trainer = dt.Trainer(
            model, optimizer, store=args.run, client=client, storage_options=options
        )
        print(
            f"Training {model!r} with {optimizer!r} on {train.n_rows:,} rows "
            f"(validation: {val.n_rows:,} rows)"
        )
        t0 = time.perf_counter()
        history = trainer.fit(train, epochs=args.epochs, validation=val)
        seconds = time.perf_counter() - t0
        train_metrics = trainer.evaluate(train)
        val_metrics = trainer.evaluate(val)
        print(f"Trained {len(history)} iterations in {seconds:.1f} s")
        print(
            f"  train: loss {train_metrics['loss']:.5f}  "
            f"accuracy {train_metrics['accuracy']:.4f}"
        )
        print(
            f"  valid: loss {val_metrics['loss']:.5f}  "
            f"accuracy {val_metrics['accuracy']:.4f}"
        )
        print(f"Parameters stored in {_display(args.run)} (step {trainer.step})")
        print(f"  reopen with: dasktrain.Trainer.resume({args.run!r})")
        trainer.close()
    finally:
        handle.close()
    return EXIT_OK


def _page_link(dashboard_link: str) -> str:
    base = dashboard_link.rsplit("/", 1)[0]
    return f"{base}/individual-dasktrain"


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _display(path: str) -> str:
    """A store argument as shown to the user: URLs as given, local paths
    absolute."""
    if _is_url(path):
        return path
    return os.path.abspath(path.removeprefix("file://"))


def _path_exists(path: str, options: dict[str, Any] | None = None) -> bool:
    """Whether anything exists at a local path or fsspec URL."""
    if not _is_url(path):
        return os.path.exists(path.removeprefix("file://"))
    import fsspec

    fs, fs_path = fsspec.core.url_to_fs(path, **(options or {}))
    return bool(fs.exists(fs_path))


def _remove_run(path: str, options: dict[str, Any] | None = None) -> None:
    """Delete a previous quickstart run (only if it is a parameter store)."""
    from dasktrain.params import ParamStore

    if not ParamStore.exists(path, storage_options=options):
        raise UsageError(
            f"{path!r} exists and is not a dasktrain parameter store; "
            f"pass --run with another path"
        )
    store = ParamStore.open(path, storage_options=options)
    with store.lock(owner="dasktrain quickstart"):
        store.remove()


def cmd_make_data(args: argparse.Namespace) -> int:
    import dasktrain as dt

    handle = _client(args.scheduler)
    try:
        common = {
            "n_rows": args.rows,
            "n_features": args.features,
            "chunk_rows": args.chunk_rows,
            "codec": args.codec,
            "seed": args.seed,
            "client": handle.client,
            "overwrite": args.overwrite,
            "progress": not args.quiet,
            "storage_options": _storage_options(args),
        }
        if args.task == "classification":
            ds = dt.datasets.make_classification(
                args.path, n_classes=args.classes, **common
            )
        else:
            ds = dt.datasets.make_regression(args.path, **common)
    finally:
        handle.close()
    print(
        f"{ds.path}: {ds.n_rows:,} rows x {ds.n_features} features, "
        f"{ds.n_chunks} chunks"
    )
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from dasktrain.data import Dataset
    from dasktrain.errors import StoreError
    from dasktrain.params import ParamStore

    options = _storage_options(args)
    if ParamStore.exists(args.store, storage_options=options):
        ps = ParamStore.open(args.store, storage_options=options)
        meta = ps.meta
        info: dict[str, Any] = {
            "kind": "parameter store",
            "path": ps.path,
            "committed_step": ps.committed,
            "versions": ps.versions,
            "model": meta.get("model"),
            "optimizer": meta.get("optimizer"),
            "seed": meta.get("seed"),
            "progress": meta.get("progress"),
            "status": meta.get("status"),
            "dataset": {
                k: v for k, v in meta.get("dataset", {}).items() if k != "chunk_ids"
            },
        }
        if ps.committed is not None:
            version = ps.read()
            info["params"] = {
                k: {"shape": list(v.shape), "dtype": str(v.dtype)}
                for k, v in version.params.items()
            }
            tables = ps.table_layouts()
            if tables:
                info["tables"] = {
                    name: {
                        "shape": [t.n_rows, t.width],
                        "dtype": t.dtype,
                        "shard_rows": t.shard_rows,
                        "n_shards": t.n_shards,
                        "optimizer_state": sorted(t.state),
                    }
                    for name, t in tables.items()
                }
        history = meta.get("history", [])
        info["history"] = {
            "steps": len(history),
            "last": history[-1] if history else None,
        }
    else:
        try:
            ds = Dataset.open(args.store, storage_options=options)
        except StoreError as exc:
            raise StoreError(
                f"{args.store!r} is neither a dasktrain dataset nor a parameter "
                f"store: {exc}"
            ) from exc
        info = {
            "kind": "dataset",
            "path": ds.path,
            "n_rows": ds.n_rows,
            "n_chunks": ds.n_chunks,
            "chunk_rows": ds.chunk_rows,
            "codec": ds.codec,
            "fields": {
                k: {"shape": list(v.shape), "dtype": v.dtype}
                for k, v in ds.fields.items()
            },
            "nbytes": ds.nbytes,
            "uuid": ds.uuid,
            "provenance": {
                k: v
                for k, v in ds.provenance.items()
                if k not in ("coef", "coefficients")
            },
        }
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        for key, value in info.items():
            if isinstance(value, dict):
                print(f"{key}:")
                for k, v in value.items():
                    print(f"  {k}: {_fmt(v)}")
            else:
                print(f"{key}: {_fmt(value)}")
    return EXIT_OK


def _train_config(args: argparse.Namespace) -> dict[str, Any]:
    cfg: dict[str, Any] = {}
    if args.config:
        try:
            with open(args.config, "rb") as f:
                cfg = tomllib.load(f)
        except FileNotFoundError as exc:
            raise UsageError(f"config file {args.config!r} not found") from exc
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(
                f"config file {args.config!r} is not valid TOML: {exc}"
            ) from exc
        known = {a.dest for a in TRAIN_FLAGS} | {STORAGE_OPTIONS_TABLE}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise UsageError(
                f"config file {args.config!r}: unknown keys {unknown}; "
                f"known: {sorted(known)}"
            )
        table = cfg.get(STORAGE_OPTIONS_TABLE, {})
        if not isinstance(table, dict):
            raise UsageError(
                f"config file {args.config!r}: {STORAGE_OPTIONS_TABLE!r} must be "
                f"a table ([{STORAGE_OPTIONS_TABLE}]), got {type(table).__name__}"
            )
    for flag in TRAIN_FLAGS:
        value = getattr(args, flag.dest)
        if value is not None:
            cfg[flag.dest] = value
    cfg[STORAGE_OPTIONS_TABLE] = _storage_options(args, cfg.get(STORAGE_OPTIONS_TABLE))
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    import dasktrain as dt

    cfg = _train_config(args)
    options = cfg[STORAGE_OPTIONS_TABLE]
    data = dt.Dataset.open(args.data, storage_options=options)
    val_fraction = float(cfg.get("val_fraction", 0.0))
    train, val = (data, None) if val_fraction <= 0 else data.split(val_fraction, seed=0)
    model = _build_model(cfg, None)
    optimizer = _build_optimizer(cfg, model, data.schema.n_features)
    handle = _client(args.scheduler)
    try:
        trainer = dt.Trainer(
            model,
            optimizer,
            store=args.store,
            client=handle.client,
            seed=int(cfg.get("seed", 0)),
            storage_options=options,
        )
        early = None
        if cfg.get("patience") is not None and val is not None:
            early = dt.EarlyStopping("val_loss", patience=int(cfg["patience"]))
        history = trainer.fit(
            train,
            epochs=int(cfg.get("epochs", 10)),
            batch_rows=cfg.get("batch_rows"),
            validation=val,
            early_stopping=early,
            progress=not args.quiet,
        )
        last = history.last or {}
        print(
            json.dumps(
                {
                    "store": _display(args.store),
                    "step": trainer.step,
                    "epoch": trainer.epoch,
                    **{
                        k: v
                        for k, v in last.items()
                        if k in ("loss", "objective", "val_loss")
                    },
                }
            )
        )
        trainer.close()
    finally:
        handle.close()
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    import dasktrain as dt

    options = _storage_options(args)
    data = dt.Dataset.open(args.data, storage_options=options)
    handle = _client(args.scheduler)
    try:
        trainer = dt.Trainer.resume(
            args.run, client=handle.client, storage_options=options
        )
        print(json.dumps(trainer.evaluate(data)))
    finally:
        handle.close()
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    import dasktrain as dt

    options = _storage_options(args)
    data = dt.Dataset.open(args.data, storage_options=options)
    if not (args.out.endswith(".npy") or args.out.endswith(".zarr")):
        raise UsageError(f"--out must end in .npy or .zarr, got {args.out!r}")
    if _path_exists(args.out, options) and not args.overwrite:
        raise UsageError(f"{args.out!r} exists; pass --overwrite to replace it")
    out_options = options if _is_url(args.out) else None
    handle = _client(args.scheduler)
    try:
        trainer = dt.Trainer.resume(
            args.run, client=handle.client, storage_options=options
        )
        kind = "predict_proba" if args.proba else "predict"
        pred = getattr(trainer, kind)(data)
        if args.out.endswith(".npy"):
            import fsspec

            # Sync point: the predictions come to the client (one value per row).
            values = pred.compute()
            with fsspec.open(args.out, "wb", **(out_options or {})) as f:
                np.save(f, values)
        else:
            pred.to_zarr(
                args.out, overwrite=args.overwrite, storage_options=out_options
            )
    finally:
        handle.close()
    print(f"{args.out}: predictions for {data.n_rows:,} rows")
    return EXIT_OK


# -- argument parsing ----------------------------------------------------------------
class _Flag:
    def __init__(
        self, dest: str, flag: str, kind: Any, help: str, **extra: Any
    ) -> None:
        self.dest, self.flag, self.kind, self.help, self.extra = (
            dest,
            flag,
            kind,
            help,
            extra,
        )


TRAIN_FLAGS = (
    _Flag("model", "--model", str, "model: " + ", ".join(MODELS), choices=MODELS),
    _Flag("n_classes", "--n-classes", int, "classes (softmax, mlp with softmax loss)"),
    _Flag("hidden", "--hidden", int, "MLP hidden layer sizes", nargs="+"),
    _Flag("loss", "--loss", str, "MLP loss: logistic, softmax or squared"),
    _Flag("l2", "--l2", float, "L2 penalty (l2/2 * ||w||^2 added to the mean loss)"),
    _Flag("l1", "--l1", float, "L1 penalty (linear models)"),
    _Flag(
        "optimizer",
        "--optimizer",
        str,
        "optimizer: " + ", ".join(OPTIMIZERS),
        choices=OPTIMIZERS,
    ),
    _Flag(
        "learning_rate",
        "--learning-rate",
        float,
        "learning rate (not Newton or LBFGS)",
    ),
    _Flag("momentum", "--momentum", float, "SGD momentum"),
    _Flag("weight_decay", "--weight-decay", float, "AdamW weight decay"),
    _Flag("clip_norm", "--clip-norm", float, "clip gradients to this global norm"),
    _Flag("tol", "--tol", float, "Newton and LBFGS gradient tolerance"),
    _Flag(
        "epochs",
        "--epochs",
        int,
        "total epochs of the run (Newton, LBFGS: iterations)",
    ),
    _Flag("batch_rows", "--batch-rows", int, "rows per step (default: full batch)"),
    _Flag(
        "val_fraction",
        "--val-fraction",
        float,
        "fraction of chunks held out for validation",
    ),
    _Flag(
        "patience", "--patience", int, "early stopping patience on val_loss (epochs)"
    ),
    _Flag("seed", "--seed", int, "seed of initialization and batch order"),
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dasktrain",
        description="Train models on Zarr data with Dask, out of core.",
        epilog="Exit codes: 0 ok, 1 dasktrain error, 2 usage error, 130 interrupted.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log progress details"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def scheduler_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--scheduler",
            metavar="ADDRESS",
            help="address of a running Dask scheduler "
            "(default: an embedded LocalCluster)",
        )
        storage_option_flag(p)

    def storage_option_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--storage-option",
            action="append",
            metavar="KEY=VALUE",
            help="fsspec option of the stores given as URLs (s3://...), sent to "
            "the workers too; repeatable. KEY=VALUE sets a string, KEY:=JSON a "
            "JSON value (anon:=true); a dotted KEY a nested one "
            "(client_kwargs.region_name=eu-west-1). Without any, filesystems "
            "configure themselves from the environment",
        )

    p = sub.add_parser("quickstart", help="generate data once, train, report")
    p.add_argument(
        "--rows", type=int, default=QUICKSTART_ROWS, help="rows of the dataset"
    )
    p.add_argument("--features", type=int, default=QUICKSTART_FEATURES, help="features")
    p.add_argument("--chunk-rows", type=int, default=65_536, help="rows per chunk")
    p.add_argument("--data", default=QUICKSTART_DATA, help="dataset store path")
    p.add_argument(
        "--run", default=QUICKSTART_RUN, help="parameter store path (replaced)"
    )
    p.add_argument("--epochs", type=int, default=50, help="maximum Newton iterations")
    scheduler_flag(p)
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("make-data", help="write a synthetic dataset store")
    p.add_argument("path", help="store path or URL (s3://bucket/key.zarr) to create")
    p.add_argument(
        "--task", choices=("classification", "regression"), default="classification"
    )
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--features", type=int, default=100)
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--chunk-rows", type=int, default=65_536)
    p.add_argument("--codec", choices=("lz4", "zstd", "none"), default="lz4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    scheduler_flag(p)
    p.set_defaults(func=cmd_make_data)

    p = sub.add_parser(
        "inspect", help="describe a dataset or parameter store (path or URL)"
    )
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="print JSON")
    storage_option_flag(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("train", help="train a model on a dataset store")
    p.add_argument("data", help="dataset store")
    p.add_argument(
        "--store", required=True, help="parameter store of the run (path or URL)"
    )
    p.add_argument(
        "--config",
        help="TOML file with the same keys as the flags (flags win), and a "
        "[storage_options] table (--storage-option entries are added to it)",
    )
    for flag in TRAIN_FLAGS:
        p.add_argument(
            flag.flag, dest=flag.dest, type=flag.kind, help=flag.help, **flag.extra
        )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    scheduler_flag(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="loss and metrics of a run on a dataset")
    p.add_argument("run", help="parameter store")
    p.add_argument("data", help="dataset store")
    scheduler_flag(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="write predictions for a dataset")
    p.add_argument("run", help="parameter store")
    p.add_argument("data", help="dataset store")
    p.add_argument("--out", required=True, help="output: FILE.npy or STORE.zarr")
    p.add_argument("--proba", action="store_true", help="class probabilities")
    p.add_argument("--overwrite", action="store_true")
    scheduler_flag(p)
    p.set_defaults(func=cmd_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dasktrain`` command."""
    from dasktrain.errors import DasktrainError

    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"dasktrain {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DasktrainError as exc:
        print(f"dasktrain {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"dasktrain {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
