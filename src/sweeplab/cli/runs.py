"""``sweeplab-runs``: list, rank, compare and re-create runs, filtering in Hydra override syntax.

    sweeplab-runs ls model=mlp optimizer.lr=0.01     newest first
    sweeplab-runs best --metric val/acc               the best FINISHED run
    sweeplab-runs compare RUN RUN ...                 params that differ, and metrics
    sweeplab-runs show RUN                            the command that re-runs it

Tables are plain text; ``--format csv`` or ``--format json`` is for scripts.
"""

import argparse
import csv
import dataclasses
import datetime
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from sweeplab.config.schema import Config, TrackingConfig
from sweeplab.run.process import apply_env_defaults
from sweeplab.tracking.store import tracking_uri
from sweeplab.tracking.tags import TAG_FAILURE, TAG_OVERRIDES

SHOWN_METRICS = ["val/acc", "test/acc", "test/loss"]
# top-level config keys that hold a value (seed=0), not a group option (model=mlp)
_TOP_LEVEL_VALUES = {
    f.name for f in dataclasses.fields(Config) if f.type is not Any and not dataclasses.is_dataclass(f.type)
}


class UsageError(Exception):
    """Bad arguments: printed without a traceback, exit code 2."""


def filter_string(filters: Sequence[str]) -> str:
    """MLflow filter from Hydra overrides: ``model=mlp`` matches the chosen group option,
    ``optimizer.lr=1e-2`` and ``seed=0`` the logged value (numbers compare as the config printed
    them). A top-level key without a dot is a config group unless it is one of the top-level
    values of the config schema, so groups added with ``--config-dir`` filter too."""
    try:
        overrides = OverridesParser.create().parse_overrides(list(filters))
    except OverrideParseException as exc:
        raise UsageError(f"cannot parse filter: {exc}") from exc
    clauses: list[str] = []
    for override in overrides:
        if override.is_sweep_override():
            raise UsageError(f"filter {override.input_line!r}: give one value per key, not a sweep")
        key = override.key_or_group
        value = str(override.value()).replace("'", "\\'")
        param = key if "." in key or key in _TOP_LEVEL_VALUES else f"choice.{key}"
        clauses.append(f"params.`{param}` = '{value}'")
    return " and ".join(clauses)


def _client(args: argparse.Namespace) -> tuple[MlflowClient, list[str]]:
    uri = args.tracking_uri or tracking_uri(TrackingConfig(), Path.cwd(), os.environ)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        names = [e.name for e in client.search_experiments()]
        raise UsageError(f"no experiment {args.experiment!r} in {uri}: experiments there are {names}")
    return client, [experiment.experiment_id]


def _row(run: Run, metrics: Sequence[str]) -> dict[str, object]:
    row: dict[str, object] = {
        "run_id": run.info.run_id,
        "name": run.info.run_name,
        "status": run.info.status,
        "started": _time(run.info.start_time),
    }
    return row | {m: run.data.metrics.get(m) for m in metrics}


def _time(millis: int | None) -> str:
    return datetime.datetime.fromtimestamp((millis or 0) / 1000).strftime("%Y-%m-%d %H:%M:%S")


def render(rows: list[dict[str, object]], fmt: str) -> str:
    """Rows as an aligned plain-text table, CSV or JSON."""
    if fmt == "json":
        return json.dumps(rows, indent=2, default=str) + "\n"
    columns = list(dict.fromkeys(k for row in rows for k in row))
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, columns)
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()

    def cell(value: object) -> str:
        if value is None:
            return "-"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    table = [columns, *([cell(row.get(c)) for c in columns] for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "".join(
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() + "\n" for line in table
    )


def cmd_ls(args: argparse.Namespace) -> list[dict[str, object]]:
    client, experiments = _client(args)
    runs = client.search_runs(
        experiments,
        filter_string(args.filters),
        order_by=["attributes.start_time DESC"],
        max_results=args.limit,
    )
    return [_row(run, SHOWN_METRICS) for run in runs]


def cmd_best(args: argparse.Namespace) -> list[dict[str, object]]:
    client, experiments = _client(args)
    clauses = [c for c in [filter_string(args.filters), "attributes.status = 'FINISHED'"] if c]
    order = "DESC" if args.mode == "max" else "ASC"
    runs = client.search_runs(
        experiments, " and ".join(clauses), order_by=[f"metrics.`{args.metric}` {order}"], max_results=1
    )
    if not runs or args.metric not in runs[0].data.metrics:
        raise UsageError(f"no FINISHED run with metric {args.metric!r} matches")
    return [_row(runs[0], [args.metric, *(m for m in SHOWN_METRICS if m != args.metric)])]


def _get(client: MlflowClient, run_id: str) -> Run:
    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        raise UsageError(f"no run {run_id!r} in this store") from exc


def cmd_compare(args: argparse.Namespace) -> list[dict[str, object]]:
    client, _ = _client(args)
    runs = [_get(client, run_id) for run_id in args.runs]
    keys = sorted({k for run in runs for k in run.data.params})
    differing = [k for k in keys if len({run.data.params.get(k) for run in runs}) > 1]
    metrics = sorted(
        {k for run in runs for k in run.data.metrics if not k.startswith(("time/", "throughput/"))}
    )
    rows: list[dict[str, object]] = [{"key": "name", **{r.info.run_id[:8]: r.info.run_name for r in runs}}]
    rows += [{"key": k, **{r.info.run_id[:8]: r.data.params.get(k) for r in runs}} for k in differing]
    rows += [{"key": k, **{r.info.run_id[:8]: r.data.metrics.get(k) for r in runs}} for k in metrics]
    return rows


def cmd_show(args: argparse.Namespace) -> list[dict[str, object]]:
    client, _ = _client(args)
    run = _get(client, args.run)
    overrides = run.data.tags.get(TAG_OVERRIDES, "")
    row = _row(run, SHOWN_METRICS) | {"rerun": f"sweeplab {overrides}".strip()}
    if TAG_FAILURE in run.data.tags:
        row["failure"] = run.data.tags[TAG_FAILURE]
    return [row]


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db")
    common.add_argument("--experiment", default="sweeplab", help="experiment name (default: %(default)s)")
    common.add_argument("--format", choices=["table", "csv", "json"], default="table")
    root = argparse.ArgumentParser(
        prog="sweeplab-runs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = root.add_subparsers(dest="command", required=True)
    ls = commands.add_parser("ls", parents=[common], help="runs matching key=value filters, newest first")
    ls.add_argument("filters", nargs="*", metavar="KEY=VALUE")
    ls.add_argument("--limit", type=int, default=50)
    ls.set_defaults(handler=cmd_ls)
    best = commands.add_parser("best", parents=[common], help="the best FINISHED run by a metric")
    best.add_argument("filters", nargs="*", metavar="KEY=VALUE")
    best.add_argument("--metric", default="val/acc")
    best.add_argument("--mode", choices=["max", "min"], default="max")
    best.set_defaults(handler=cmd_best)
    compare = commands.add_parser("compare", parents=[common], help="params that differ, and metrics")
    compare.add_argument("runs", nargs="+", metavar="RUN")
    compare.set_defaults(handler=cmd_compare)
    show = commands.add_parser("show", parents=[common], help="one run and the command that re-runs it")
    show.add_argument("run", metavar="RUN")
    show.set_defaults(handler=cmd_show)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    apply_env_defaults()
    args = parser().parse_args(argv)
    try:
        rows = args.handler(args)
    except UsageError as exc:
        print(f"sweeplab-runs: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(render(rows, args.format))
    return 0


if __name__ == "__main__":
    sys.exit(main())
