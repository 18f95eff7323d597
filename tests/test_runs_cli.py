"""``sweeplab-runs`` against a real store holding runs with known params and metrics."""

import json

import mlflow
import pytest

from sweeplab.cli import runs as runs_cli

RUNS = [  # name, model, lr, val/acc, status
    ("a", "logreg", "0.1", 0.80, "FINISHED"),
    ("b", "mlp", "0.01", 0.95, "FINISHED"),
    ("c", "mlp", "0.1", 0.90, "FINISHED"),
    ("d", "mlp", "0.01", 0.99, "FAILED"),
]


@pytest.fixture
def known_runs(store: str) -> dict[str, str]:
    client = mlflow.MlflowClient(store)
    experiment = client.create_experiment("sweeplab")
    ids = {}
    for name, model, lr, acc, status in RUNS:
        run = client.create_run(
            experiment, run_name=name, tags={"sweeplab.overrides": f"model={model} optimizer.lr={lr}"}
        )
        client.log_batch(
            run.info.run_id,
            params=[
                mlflow.entities.Param(k, v)
                for k, v in {
                    "choice.model": model,
                    "model.name": model,
                    "optimizer.lr": lr,
                    "seed": "0",
                }.items()
            ],
            metrics=[
                mlflow.entities.Metric("val/acc", acc, 0, 1),
                mlflow.entities.Metric("test/acc", acc - 0.01, 0, 1),
            ],
        )
        client.set_terminated(run.info.run_id, status)
        ids[name] = run.info.run_id
    return ids


def _json(capsys: pytest.CaptureFixture, *argv: str) -> list[dict]:
    assert runs_cli.main([*argv, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_ls_filters_with_override_syntax_newest_first(known_runs, capsys) -> None:
    assert [r["name"] for r in _json(capsys, "ls")] == ["d", "c", "b", "a"]
    assert [r["name"] for r in _json(capsys, "ls", "model=mlp", "optimizer.lr=1e-2")] == ["d", "b"]
    assert [r["name"] for r in _json(capsys, "ls", "model=logreg")] == ["a"]
    assert [r["name"] for r in _json(capsys, "ls", "seed=0", "model=logreg")] == ["a"]  # a top-level key


def test_best_skips_unfinished_runs(known_runs, capsys) -> None:
    (best,) = _json(capsys, "best", "--metric", "val/acc")
    assert best["name"] == "b" and best["val/acc"] == pytest.approx(0.95)
    (worst,) = _json(capsys, "best", "--metric", "val/acc", "--mode", "min")
    assert worst["name"] == "a"


def test_compare_shows_only_params_that_differ(known_runs, capsys) -> None:
    rows = _json(capsys, "compare", known_runs["a"], known_runs["c"])
    keys = [r["key"] for r in rows]
    assert "choice.model" in keys and "seed" not in keys and "optimizer.lr" not in keys
    assert {"val/acc", "test/acc"} <= set(keys)


def test_show_prints_the_rerun_command(known_runs, capsys) -> None:
    assert runs_cli.main(["show", known_runs["b"]]) == 0
    out = capsys.readouterr().out
    assert "sweeplab model=mlp optimizer.lr=0.01" in out and known_runs["b"] in out


def test_table_and_csv_formats(known_runs, capsys) -> None:
    assert runs_cli.main(["ls", "model=logreg"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["run_id", "name", "status", "started", "val/acc", "test/acc", "test/loss"]
    assert row.split()[1:3] == ["a", "FINISHED"] and "0.8000" in row
    assert runs_cli.main(["ls", "model=logreg", "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "run_id,name,status,started,val/acc,test/acc,test/loss"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["show", "0123456789abcdef"], "no run '0123456789abcdef'"),
        (["ls", "--experiment", "nope"], "no experiment 'nope'"),
        (["ls", "model=mlp,logreg"], "give one value per key"),
        (["best", "--metric", "val/f1"], "no FINISHED run with metric 'val/f1'"),
    ],
)
def test_mistakes_exit_2_with_a_message(known_runs, capsys, argv: list[str], message: str) -> None:
    assert runs_cli.main(argv) == 2
    assert message in capsys.readouterr().err
