"""``slidemil sweep``: the search space file, trials scored on validation parts only (poisoned
test parts change nothing), outputs (trials.csv, best.yaml that `slidemil train` accepts, plots),
pruning, reruns that continue, and a killed process's trial retried from its checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from random_bags import make_random_work
from slidemil.cli.app import app
from slidemil.config import build
from slidemil.errors import ConfigError
from slidemil.formats.feature_file import write_feature_file
from slidemil.training.config import TrainConfig
from slidemil.tuning import load_space, sweep

TORCH_THREADS = 1  # see conftest._torch_threads
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# patients cycle train, train, val, test, train: both classes in every part
SPLIT = ["train", "train", "val", "test", "train"]
FIXED = {"epochs": 4, "attention_dim": 8, "device": "cpu", "monitor": "loss", "patience": 0}


def _space(**params) -> dict:
    return {
        "sampler": "random", "seed": 3, "pruner": "none", "prune_every": 2, "startup_trials": 2,
        "params": {"lr": {"low": 1e-4, "high": 3e-2, "log": True},
                   "hidden_dim": {"choices": [8, 16]}, **FIXED, **params},
    }  # fmt: skip


def _work(root: Path, seed: int = 1):
    return make_random_work(
        root, patients=20, slides_per_patient=1, classes=2, dim=16, seed=seed, split=SPLIT
    )


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    work = _work(root / "work")
    result = sweep(work.root, _space(), root / "sweep", trials=4, quiet=True)
    return work, root / "sweep", result


def test_space_files_refuse_unknown_keys_fields_and_searches_of_the_split(tmp_path):
    cases = [
        ({"samplr": "tpe"}, "unknown key 'samplr'"),
        ({"params": {"learning_rate": {"low": 0.1, "high": 1}}}, "unknown TrainConfig field"),
        ({"params": {"folds": {"choices": [3, 5]}}}, "folds cannot be searched"),
        ({"params": {"lr": {"low": 1e-3, "high": 1e-4}}}, "must be below high"),
        ({"params": {"dropout": {"choices": [0.1, 1.5]}}}, "dropout"),
        ({"params": {"lr": {"low": 1e-4, "high": 1e-2, "lg": True}}}, "unknown key"),
        ({"params": {"epoch_budget": 3}}, "set by the sweep itself"),
        ({"params": {"model": {"choices": ["abmil", "transmil2"]}}}, "unknown MIL model"),
    ]
    for data, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_space(data)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"sampler": "grid", "params": {"lr": {"low": 0.1, "high": 1}}}))
    with pytest.raises(
        ConfigError, match=r"space\.yaml.*grid needs choices or a range with a step"
    ):
        load_space(path).grid(path)


def test_the_example_space_loads_and_samples_every_kind_of_parameter():
    import optuna

    space = load_space(EXAMPLES / "sweep.yaml")
    assert space.fixed["folds"] == 5 and "lr" in space.searched
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    values = space.suggest(study.ask())
    assert isinstance(values["attention_dim"], int) and values["attention_dim"] % 64 == 0
    assert 1e-5 <= values["lr"] <= 1e-3 and values["model"] in ("abmil", "abmil-gated")
    TrainConfig(**space.fixed, **values)  # every draw is a valid train section


def test_sweep_writes_trials_best_yaml_and_plots(swept, tmp_path):
    work, out, result = swept
    table = pd.read_csv(out / "trials.csv")
    assert len(table) == 4 and set(table["state"]) == {"COMPLETE"}
    for column in ("trial", "state", "value", "value_std", "seconds", "lr", "hidden_dim"):
        assert column in table.columns
    assert len(set(table["lr"])) == 4  # the sampler really drew different values
    assert table["value"].min() == pytest.approx(result.best_value)  # loss: minimised
    for name in ("history.png", "importances.png", "slice.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # each trial is an ordinary, complete run folder with its config
    trial = out / "trials" / "0000"
    assert (trial / "config.yaml").is_file() and (trial / "fold_0" / "run.json").is_file()
    best = build(TrainConfig, section="train", config_file=out / "best.yaml")
    assert best.lr == pytest.approx(result.best_params["lr"]) and best.epochs == 4
    # `slidemil train --config best.yaml` accepts it as it is; that run reports test metrics
    runner = CliRunner()
    from slidemil.cli import commands  # noqa: F401  (registers the commands)

    cli = runner.invoke(
        app,
        ["train", str(work.root), "--config", str(out / "best.yaml"), "--out", str(tmp_path / "r")],
    )
    assert cli.exit_code == 0, cli.output
    assert (tmp_path / "r" / "fold_0" / "predictions.csv").is_file()


@pytest.mark.slow
def test_the_objective_never_sees_the_test_part(swept, tmp_path):
    work, out, result = swept
    # the same work, but every test slide has the wrong label and features of pure noise
    poisoned = _work(tmp_path / "poisoned")
    cohort = pd.read_csv(poisoned.root / "cohort.csv")
    test = cohort["split"] == "test"
    assert test.sum() == 4
    flip = {"class_0": "class_1", "class_1": "class_0"}
    cohort.loc[test, "label"] = cohort.loc[test, "label"].map(flip)
    cohort.to_csv(poisoned.root / "cohort.csv", index=False)
    rng = np.random.default_rng(99)
    for slide_id in cohort.loc[test, "slide_id"]:
        n = 200
        coords = np.zeros((n, 2), np.int64)
        write_feature_file(poisoned.feature_path(slide_id), rng.normal(size=(n, 16)) * 50, coords,
                           {"slide_id": slide_id, "encoder": poisoned.encoder})  # fmt: skip
    again = sweep(poisoned.root, _space(), tmp_path / "sweep", trials=4, quiet=True)
    np.testing.assert_array_equal(again.trials["value"], result.trials["value"])
    np.testing.assert_array_equal(again.trials["lr"], result.trials["lr"])
    dev = pd.read_csv(out / "dev" / "fold_0" / "cohort.csv")
    assert set(dev["split"]) == {"train", "val"}
    assert not set(dev["slide_id"]) & set(cohort.loc[test, "slide_id"])
    # positive control: the test part does change the final run's test metrics
    clean = build(TrainConfig, section="train", config_file=out / "best.yaml")
    from slidemil.training import train

    a = train(work.root, tmp_path / "final_clean", clean).folds[0]
    b = train(poisoned.root, tmp_path / "final_poisoned", clean).folds[0]
    assert a["macro_auc"] != b["macro_auc"]


def test_a_rerun_continues_and_another_space_is_refused(swept, tmp_path):
    work, out, result = swept
    copy = tmp_path / "sweep"
    subprocess.run(["cp", "-a", str(out), str(copy)], check=True)
    more = sweep(work.root, _space(), copy, trials=6, quiet=True)
    assert len(more.trials) == 6
    pd.testing.assert_frame_equal(
        more.trials.iloc[:4][["trial", "value", "lr"]], result.trials[["trial", "value", "lr"]]
    )
    with pytest.raises(ConfigError, match="another params"):
        sweep(work.root, _space(epochs=5), copy, trials=6, quiet=True)


def test_weak_trials_are_pruned_by_their_validation_loss(tmp_path):
    work = _work(tmp_path / "work")
    space = {
        "sampler": "grid", "seed": 0, "prune_every": 1, "startup_trials": 1,
        "params": {"lr": {"choices": [2e-2, 1.9e-2, 1e-9]}, **FIXED, "epochs": 6},
    }  # fmt: skip
    result = sweep(work.root, space, tmp_path / "sweep", trials=3, quiet=True)
    states = dict(zip(result.trials["lr"], result.trials["state"], strict=True))
    order = list(result.trials["lr"])
    if order.index(1e-9) > 0:  # a good trial came first: the one that cannot learn is pruned
        assert states[1e-9] == "PRUNED"
        history = pd.read_csv(tmp_path / "sweep" / "trials" / f"{order.index(1e-9):04d}"
                              / "fold_0" / "fold_0" / "history.csv")  # fmt: skip
        assert len(history) < 6
    assert "COMPLETE" in set(result.trials["state"])


@pytest.mark.slow
def test_a_killed_trial_is_retried_and_resumes_from_its_checkpoints(tmp_path):
    work = _work(tmp_path / "work")
    space = _space(epochs=40)
    space["heartbeat_seconds"] = 0.5
    space["prune_every"] = 1
    out = tmp_path / "sweep"
    space_file = tmp_path / "space.yaml"
    command = [sys.executable, "-m", "slidemil", "sweep", str(work.root), "--space",
               str(space_file), "--trials", "1", "--out", str(out), "--quiet"]  # fmt: skip
    space_file.write_text(yaml.safe_dump(space))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    history = out / "trials" / "0000" / "fold_0" / "fold_0" / "history.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (history.is_file() and len(pd.read_csv(history)) >= 3):
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    epochs_before = len(pd.read_csv(history))
    assert 3 <= epochs_before < 40
    time.sleep(2)  # three heartbeats: the killed trial is now stale
    result = sweep(work.root, space, out, trials=1, quiet=True)
    states = list(result.trials["state"])
    assert states == ["FAIL", "COMPLETE"]
    assert list(result.trials["folder"]) == ["0000", "0000"]  # the retry reused the folder
    assert result.trials["lr"].iloc[0] == result.trials["lr"].iloc[1]
    # resumed, not restarted: the epochs before the kill were not trained again
    rows = pd.read_csv(history)
    assert len(rows) == 40 and rows["epoch"].tolist() == list(range(40))


def test_the_cli_names_the_missing_extra(tmp_path, monkeypatch):
    from slidemil.cli import commands  # noqa: F401  (registers the commands)

    monkeypatch.setitem(sys.modules, "optuna", None)  # as if the extra were not installed
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(_space()))
    result = CliRunner().invoke(
        app, ["sweep", str(tmp_path), "--space", str(space), "--out", str(tmp_path / "s")]
    )
    assert result.exit_code == 2
    assert "pip install 'slidemil[sweep]'" in result.output
