"""Every registered MIL model keeps the model interface (version 2, slidemil.models.registry):
it trains on random bags, reloads from its checkpoint, resumes exactly, trains under 2-process
gloo DDP, scores every instance of bags of any size (one included) and ignores padding
(tests/test_export.py exports every entry).

Parametrised over ``list_models()``, so an entry is tested the day it is registered. Real feature
files (tests/random_bags.py), real training runs, real torchrun.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from launch import torchrun
from random_bags import RandomWork, make_random_work
from slidemil.errors import ConfigError
from slidemil.models import ModelEntry, build_model, get_model_entry, list_models
from slidemil.models.registry import coords_keywords
from slidemil.training import load_checkpoint, load_model_from_checkpoint, train
from slidemil.training.bags import Standardizer, read_bag, read_bag_coords
from slidemil.training.loop import model_uses_labels

TORCH_THREADS = 1  # see conftest._torch_threads
MODELS = list_models()
D, C = 12, 3
# tiny models: these tests check the interface, not learning
SMALL = {"hidden_dim": 16, "attention_dim": 8}
RUN = dict(SMALL, epochs=2, lr=3e-3, max_patches=10, dropout=0.25, device="cpu", quiet=True)
RUN.update(patience=0, min_epochs=0, smoothing=1)
BAG_SIZES = (1, 2, 17)
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> RandomWork:
    root = tmp_path_factory.mktemp("registry_work")
    return make_random_work(
        root / "work", patients=9, classes=C, dim=D, instances=(4, 14), signal_instances=2, seed=3
    )


@pytest.fixture(scope="module")
def runs(work, tmp_path_factory):
    """model name -> the folder of one uninterrupted run of it, trained on first use."""
    root = tmp_path_factory.mktemp("registry_runs")
    done: dict[str, Path] = {}

    def run_of(model: str) -> Path:
        if model not in done:
            train(work.root, root / model, model=model, **RUN)
            done[model] = root / model
        return done[model]

    return run_of


def _model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    options = {k: v for k, v in SMALL.items() if k in get_model_entry(name).defaults()}
    return build_model(name, in_dim=D, n_classes=C, **options)


LABEL_AWARE = [name for name in MODELS if model_uses_labels(_model(name))]


def _outputs(model: torch.nn.Module, features: torch.Tensor, mask: torch.Tensor) -> dict:
    """logits, attention, scores and (where the model has them) class_scores, without grad."""
    with torch.no_grad():
        logits, attention, scores = model(features, mask, return_scores=True)
        out = {"logits": logits, "attention": attention, "scores": scores}
        if hasattr(model, "class_scores"):
            out["class_scores"] = model.class_scores(features, mask)
    return out


@pytest.mark.parametrize("name", MODELS)
def test_a_checkpoint_reloads_to_the_runs_predictions(name, work, runs):
    run = runs(name)
    model, state = load_model_from_checkpoint(run / "fold_0" / "checkpoint_best.pt")
    assert state["model_name"] == name
    standardizer = Standardizer.from_state(state["standardization"])
    table = pd.read_csv(run / "fold_0" / "predictions.csv")
    columns = [f"prob_{c}" for c in state["class_names"]]
    for slide_id, expected in zip(table["slide_id"], table[columns].to_numpy(), strict=True):
        path = work.feature_path(slide_id)
        bag = torch.from_numpy(standardizer.apply(read_bag(path)))
        bag = bag.float()[None]
        # the run laid a coordinate-using model's patches out by the file's /coords
        xy = torch.from_numpy(read_bag_coords(path, bag.shape[1])).float()[None]
        with torch.no_grad():
            mask = torch.ones(bag.shape[:2], dtype=torch.bool)
            logits = model(bag, mask, **coords_keywords(model, xy))[0]
        got = torch.softmax(logits, dim=1)[0].numpy()
        assert np.abs(got - expected).max() < TOLERANCE, slide_id


@pytest.mark.parametrize("name", MODELS)
def test_an_interrupted_run_resumes_to_the_uninterrupted_runs_weights(name, work, runs, tmp_path):
    whole = runs(name)
    stopped = tmp_path / "stopped"
    assert train(work.root, stopped, model=name, epoch_budget=1, **RUN).folds == {0: None}
    train(work.root, stopped, model=name, **RUN)
    a = load_checkpoint(whole / "fold_0" / "checkpoint_latest.pt")
    b = load_checkpoint(stopped / "fold_0" / "checkpoint_latest.pt")
    assert a["epoch"] == b["epoch"] == RUN["epochs"] - 1
    assert a["model_state"].keys() == b["model_state"].keys()
    for key, tensor in a["model_state"].items():
        assert torch.equal(tensor, b["model_state"][key]), key
    history_a = pd.read_csv(whole / "fold_0" / "history.csv").drop(columns="seconds")
    history_b = pd.read_csv(stopped / "fold_0" / "history.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(history_a, history_b, check_exact=True)
    assert (whole / "fold_0" / "predictions.csv").read_text() == (
        stopped / "fold_0" / "predictions.csv"
    ).read_text()


@pytest.mark.parametrize("name", MODELS)
def test_every_instance_gets_a_score_for_bags_of_any_size(name):
    model = _model(name).eval()
    for n in BAG_SIZES:
        features = torch.randn(1, n, D, generator=torch.Generator().manual_seed(n))
        mask = torch.ones(1, n, dtype=torch.bool)
        out = _outputs(model, features, mask)
        assert out["logits"].shape == (1, C)
        assert out["attention"].shape == out["scores"].shape == (1, n)
        for key, value in out.items():
            assert torch.isfinite(value).all(), (key, n)
        assert torch.allclose(out["attention"].sum(dim=1), torch.ones(1), atol=1e-5)
        if "class_scores" in out:
            assert out["class_scores"].shape == (1, C, n)
        again = _outputs(model, features, mask)  # eval() is deterministic
        for key, value in out.items():
            assert torch.equal(value, again[key]), key


@pytest.mark.parametrize("name", LABEL_AWARE)
def test_a_label_aware_training_forward_returns_a_finite_auxiliary_loss(name):
    model = _model(name).train()
    for n in BAG_SIZES:
        features = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n))
        mask = torch.ones(2, n, dtype=torch.bool)
        mask[1, n // 2 + 1 :] = False  # a padded second bag
        logits, attention, auxiliary = model(features, mask, labels=torch.tensor([0, C - 1]))
        assert logits.shape == (2, C) and attention.shape == (2, n)
        assert auxiliary.shape == () and torch.isfinite(auxiliary)
        (logits.sum() + auxiliary).backward()
        model.zero_grad()
    # without labels it is a model like any other
    logits, attention = model(features, mask)[:2]
    assert logits.shape == (2, C)


@pytest.mark.parametrize("name", MODELS)
def test_padding_in_a_batch_of_bags_of_other_sizes_changes_nothing(name):
    model = _model(name, seed=1).eval()
    sizes = (1, 6, 11)
    noise = torch.Generator().manual_seed(2)
    bags = [torch.randn(n, D, generator=noise) for n in sizes]
    longest = max(sizes)
    batch = torch.full((len(bags), longest, D), 100.0)  # garbage padding must still be ignored
    mask = torch.zeros(len(bags), longest, dtype=torch.bool)
    for row, bag in enumerate(bags):
        batch[row, : len(bag)] = bag
        mask[row, : len(bag)] = True
    together = _outputs(model, batch, mask)
    for row, bag in enumerate(bags):
        n = len(bag)
        alone = _outputs(model, bag[None], torch.ones(1, n, dtype=torch.bool))
        assert torch.allclose(together["logits"][row], alone["logits"][0], atol=TOLERANCE), row
        for key in ("attention", "scores"):
            assert torch.allclose(together[key][row, :n], alone[key][0], atol=TOLERANCE), key
        assert torch.all(together["attention"][row, n:] == 0)
        assert torch.all(together["scores"][row, n:] == float("-inf"))
        if "class_scores" in alone:
            scores = together["class_scores"][row]
            assert torch.allclose(scores[:, :n], alone["class_scores"][0], atol=TOLERANCE)
            assert torch.all(scores[:, n:] == float("-inf"))


def _as_command_line_text(value) -> str:
    """A value as a user types it after ``--model-option KEY=``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return yaml.safe_dump(list(value), default_flow_style=True).strip()
    return str(value)


@pytest.mark.parametrize("name", MODELS)
def test_every_option_can_be_set_from_the_command_line(name):
    entry = get_model_entry(name)
    defaults = entry.defaults()
    typed = {key: _as_command_line_text(value) for key, value in defaults.items()}
    assert entry.resolve_options(typed) == defaults
    with pytest.raises(ConfigError, match=rf"{name}' has no option\(s\) no_such_option"):
        entry.resolve_options({"no_such_option": "1"})


def test_option_values_are_coerced_to_the_type_of_the_default_or_refused():
    def builder(in_dim, n_classes, k=8, weight=0.3, flag=False, kind="svm", extra=None):
        return torch.nn.Identity()  # only its signature matters here

    entry = ModelEntry("toy", builder, "a signature")
    given = {"k": "16", "weight": "1e-3", "flag": "Yes", "kind": "ce", "extra": "[1, 2]"}
    assert entry.resolve_options(given) == {
        "k": 16, "weight": 0.001, "flag": True, "kind": "ce", "extra": [1, 2]
    }  # fmt: skip
    assert entry.resolve_options({"k": 16.0, "weight": 2, "extra": "none"}) == {
        "k": 16, "weight": 2.0, "extra": None
    }  # fmt: skip
    for key, value, expected in [
        ("k", "8.5", "an integer"),
        ("k", True, "an integer"),
        ("weight", "heavy", "a number"),
        ("weight", "inf", "a finite number"),
        ("flag", "maybe", "true or false"),
        ("kind", 3, "a string"),
    ]:
        with pytest.raises(ConfigError, match=f"option {key}=.*: expected {expected}"):
            entry.resolve_options({key: value})


def _ddp_job(work_root: str, out: str) -> None:
    """Run by torchrun (2 processes): one process group for the job, then every registered
    model trained under DDP."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        for name in MODELS:
            train(work_root, Path(out) / name, model=name, **RUN)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_model_trains_under_two_process_gloo_ddp(work, tmp_path):
    done = torchrun(__file__, str(work.root), str(tmp_path))
    assert done.returncode == 0, done.stderr[-4000:]
    for name in MODELS:
        fold = tmp_path / name / "fold_0"
        assert json.loads((fold / "metrics.json").read_text())["n_test"] > 0, name
        state = load_checkpoint(fold / "checkpoint_latest.pt")
        assert state["world_size"] == 2 and state["epoch"] == RUN["epochs"] - 1, name
        history = pd.read_csv(fold / "history.csv")
        assert len(history) == RUN["epochs"], name
        if name in LABEL_AWARE:  # the DDP-wrapped model got the labels and its auxiliary loss
            assert (history["train_auxiliary_loss"] > 0).all(), name


if __name__ == "__main__":
    _ddp_job(*sys.argv[1:])
