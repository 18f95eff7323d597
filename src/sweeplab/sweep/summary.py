"""The sweep summary written onto the parent run: a ranked table, the best child, figures, and
when seeds were swept each config's mean and spread over its seeds."""

import math
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Run

from sweeplab.config.schema import SweepConfig
from sweeplab.tracking.store import RunLog
from sweeplab.tracking.tags import TAG_BEST_RUN_ID, TAG_BEST_RUN_NAME, TAG_HASH, TAG_PARENT, TAG_REUSED

METRICS = ["test/acc", "test/loss", "val/acc", "val/loss", "best/val_acc", "time/training_s"]


def _value(text: str | None) -> object:
    """MLflow params are strings; numbers come back as numbers so they sort and plot as such."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return text


def _log_scaled(values: pd.Series) -> bool:
    """Learning rates and the like: positive values spanning a decade or more."""
    return bool((values > 0).all() and values.max() / values.min() >= 10)


def sweep_table(
    runs: list[tuple[Run, str]], swept: list[str], objective: str, direction: str
) -> pd.DataFrame:
    """One row per child: id, name, status, how it was obtained, swept values, final metrics."""
    metrics = [objective, *(m for m in METRICS if m != objective)]
    rows = []
    for run, origin in runs:
        params = run.data.params
        row: dict[str, object] = {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "status": run.info.status,
            "origin": origin,
            "config_hash": run.data.tags.get(TAG_HASH),
        }
        row |= {key: _value(params.get(key, params.get(f"choice.{key}"))) for key in swept}
        row |= {m: run.data.metrics.get(m, math.nan) for m in metrics}
        rows.append(row)
    columns = ["run_id", "run_name", "status", "origin", "config_hash", *swept, *metrics]
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values(objective, ascending=direction == "minimize", na_position="last", kind="stable")


def unfinished_killed(table: pd.DataFrame) -> int:
    """KILLED children whose config has no FINISHED run: what a re-run still has to resume. (A
    job killed before its first checkpoint trains again in a new run, leaving the old one.)"""
    finished = set(table.config_hash[table.status == "FINISHED"])
    return int(((table.status == "KILLED") & ~table.config_hash.isin(finished)).sum())


def markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (pandas needs the optional tabulate for this)."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _configs(table: pd.DataFrame, keys: list[str]) -> pd.Series:
    """Each row's values of ``keys``, as one label (``model=mlp, optimizer.lr=0.01``)."""
    if not keys:
        return pd.Series("", index=table.index)
    return table[keys].astype(str).apply(lambda row: ", ".join(f"{k}={v}" for k, v in row.items()), axis=1)


def objective_vs(table: pd.DataFrame, key: str, objective: str, others: Sequence[str] = ()) -> Figure:
    """The objective of every finished child against one swept value; the children's values
    of the ``others`` swept keys (seeds aside: they are the spread) colour the points, with a
    legend, when there are at most 10 such configs."""
    done = table.dropna(subset=[objective])
    fig = Figure(figsize=(7, 4.5))
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.14, top=0.92)
    ax = fig.add_subplot()
    values = done[key]
    numeric = pd.api.types.is_numeric_dtype(values)
    if numeric:
        x = values
        if _log_scaled(values):
            ax.set_xscale("log")
    else:
        labels = sorted(values.astype(str).unique())
        x = pd.Series([labels.index(v) for v in values.astype(str)], index=done.index)
        ax.set_xticks(range(len(labels)), labels)
    configs = _configs(done, [k for k in others if k not in (key, "seed")])
    groups = sorted(configs.unique())
    if len(groups) <= 10:
        for group in groups:
            mine = configs == group
            ax.scatter(x[mine], done[objective][mine], label=group or None)
        if len(groups) > 1:
            ax.legend(fontsize=8)
    else:
        ax.scatter(x, done[objective])
    ax.set_xlabel(key)
    ax.set_ylabel(objective)
    ax.set_title(f"{objective} vs {key} ({len(done)} finished runs)")
    ax.grid(alpha=0.3)
    return fig


SEED_METRICS = ("test/acc", "test/loss")


def seed_table(table: pd.DataFrame, swept: list[str], objective: str) -> pd.DataFrame:
    """Finished children that differ only in ``seed``, one row per config: how many seeds, and
    the mean and standard deviation of the objective and the test metrics over them."""
    keys = [k for k in swept if k != "seed"]
    done = table[(table.status == "FINISHED")].dropna(subset=[objective])
    metrics = list(dict.fromkeys([objective, *SEED_METRICS]))
    grouped = done.assign(config=_configs(done, keys)).groupby("config", sort=False)
    rows = []
    for config, runs in grouped:
        row: dict[str, object] = {"config": config, "seeds": len(runs)}
        for metric in metrics:
            row[f"{metric} mean"] = runs[metric].mean()
            row[f"{metric} std"] = runs[metric].std(ddof=1) if len(runs) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def seed_spread(seeds: pd.DataFrame, objective: str) -> Figure:
    """Mean objective per config with one standard deviation over its seeds as error bars."""
    fig = Figure(figsize=(max(6, 0.9 * len(seeds) + 2), 5))
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.35, top=0.92)
    ax = fig.add_subplot()
    ax.errorbar(
        range(len(seeds)),
        seeds[f"{objective} mean"],
        yerr=seeds[f"{objective} std"].fillna(0),
        fmt="o",
        capsize=4,
    )
    ax.set_xticks(range(len(seeds)), seeds.config, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"{objective} (mean ± std over seeds)")
    ax.set_title(f"{objective} over seeds ({int(seeds.seeds.sum())} finished runs)")
    ax.grid(alpha=0.3)
    return fig


def parallel_coordinates(table: pd.DataFrame, keys: list[str], objective: str) -> Figure:
    """One line per finished child through every swept value, coloured by the objective."""
    done = table.dropna(subset=[objective])
    columns = [*keys, objective]
    fig = Figure(figsize=(2.2 * len(columns) + 2, 5))
    fig.subplots_adjust(left=0.06, right=0.88, bottom=0.12, top=0.9)
    ax = fig.add_subplot()
    scaled, ticks = [], []
    for column in columns:
        values = done[column]
        if pd.api.types.is_numeric_dtype(values):
            numbers = values.to_numpy(float)
            if _log_scaled(values):
                numbers = np.log10(numbers)
            span = numbers.max() - numbers.min()
            scaled.append((numbers - numbers.min()) / span if span else np.full(len(numbers), 0.5))
            ticks.append(f"{values.min():.3g} .. {values.max():.3g}")
        else:
            labels = sorted(values.astype(str).unique())
            codes = np.array([labels.index(v) for v in values.astype(str)], float)
            scaled.append(codes / max(len(labels) - 1, 1))
            ticks.append(" / ".join(labels))
    norm = Normalize(done[objective].min(), done[objective].max())
    cmap = colormaps["viridis"]
    points = np.column_stack(scaled)
    for line, value in zip(points, done[objective], strict=True):
        ax.plot(range(len(columns)), line, color=cmap(norm(value)), alpha=0.8)
    ax.set_xticks(range(len(columns)), [f"{c}\n{t}" for c, t in zip(columns, ticks, strict=True)], fontsize=8)
    ax.set_yticks([])
    for x in range(len(columns)):
        ax.axvline(x, color="grey", linewidth=0.8)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=objective)
    ax.set_title(f"{len(done)} finished runs, coloured by {objective}")
    return fig


def summarize(
    client: MlflowClient, parent_id: str, experiment_id: str, swept: list[str], sweep: SweepConfig
) -> pd.DataFrame:
    """Write the table, the best child and the figures onto the parent run; return the table."""
    children = client.search_runs(
        [experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_id}'", max_results=50000
    )
    parent = client.get_run(parent_id)
    reused = [
        client.get_run(run_id) for key, run_id in parent.data.tags.items() if key.startswith(TAG_REUSED)
    ]
    runs = [(run, "ran") for run in children] + [(run, "reused") for run in reused]
    table = sweep_table(runs, swept, sweep.objective, sweep.direction)
    client.log_text(parent_id, table.to_csv(index=False), "summary/sweep.csv")
    client.log_text(parent_id, markdown(table), "summary/sweep.md")

    metrics = {
        "sweep/children": len(runs),
        "sweep/finished": int((table.status == "FINISHED").sum()),
        "sweep/failed": int((table.status == "FAILED").sum()),
        "sweep/killed": unfinished_killed(table),
        "sweep/reused": len(reused),
    }
    finished = table[(table.status == "FINISHED") & table[sweep.objective].notna()]
    if len(finished):
        best = finished.iloc[0]
        client.set_tag(parent_id, TAG_BEST_RUN_ID, best.run_id)
        client.set_tag(parent_id, TAG_BEST_RUN_NAME, best.run_name)
        best_metrics = next(run for run, _ in runs if run.info.run_id == best.run_id).data.metrics
        # best/val_acc is already a "best" metric; everything else gets the prefix
        metrics |= {
            key if key.startswith("best/") else f"best/{key}": value
            for key, value in best_metrics.items()
            if key in METRICS or key == sweep.objective
        }
        for key in swept:
            fig = objective_vs(table, key, sweep.objective, swept)
            client.log_figure(
                parent_id, fig, f"summary/objective_vs_{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}.png"
            )
        if "seed" in swept:  # each config's spread over its seeds
            seeds = seed_table(table, swept, sweep.objective)
            client.log_text(parent_id, seeds.to_csv(index=False), "summary/seeds.csv")
            client.log_text(parent_id, markdown(seeds), "summary/seeds.md")
            client.log_figure(parent_id, seed_spread(seeds, sweep.objective), "summary/seeds.png")
        if len(swept) > 1:
            client.log_figure(
                parent_id,
                parallel_coordinates(table, swept, sweep.objective),
                "summary/parallel_coordinates.png",
            )
    RunLog(client, parent_id).log_metrics({k: float(v) for k, v in metrics.items()}, step=0)
    return table
