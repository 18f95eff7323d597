"""The run record's vocabulary: which keys change results, in the code and in the YAML alike."""

from hydra import compose

from sweeplab.tracking.tags import config_hash, not_result_keys


def test_run_names_leave_out_exactly_the_keys_that_do_not_change_results(compose_cfg) -> None:
    cfg = compose("config", return_hydra_config=True)
    excluded = list(cfg.hydra.job.config.override_dirname.exclude_keys)
    assert sorted(excluded) == sorted(not_result_keys())


def test_config_hash_follows_results_only(compose_cfg) -> None:
    base = config_hash(compose_cfg(["data=synthetic"]))
    logging_only = [
        "tracking.experiment_name=other",
        "tracking.figures=false",
        "sweep.objective=val/loss",
        "checkpoint.keep_last=3",
        "resume_force=true",
    ]
    assert config_hash(compose_cfg(["data=synthetic", *logging_only])) == base
    assert config_hash(compose_cfg(["data=synthetic", "optimizer.lr=0.5"])) != base
    assert config_hash(compose_cfg(["data=synthetic", "seed=1"])) != base
