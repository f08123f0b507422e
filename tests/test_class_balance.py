"""Class imbalance: the class-weighted loss weights bags at every batch size, balanced sampling
draws every class equally often, reproducibly and in disjoint shares under DDP, and either
correction raises the rare class's recall on an imbalanced cohort.

Every run uses real feature files written by ``tests/random_bags.py`` and real torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from random_bags import make_random_work
from slidemil.errors import ConfigError
from slidemil.training import TrainConfig, load_checkpoint, load_model_from_checkpoint, train
from slidemil.training.bags import read_bag
from slidemil.training.loop import BagLoss, mean_loss
from slidemil.training.sampling import BalancedClassSampler

TORCH_THREADS = 1  # see conftest._torch_threads
TINY = {"hidden_dim": 16, "attention_dim": 8, "quiet": True, "device": "cpu"}
# fixed-length runs judged by their last epoch: no early stop, no checkpoint choice
NO_SELECTION = {"patience": 0, "min_epochs": 0, "smoothing": 1}  # 0: never stop


def test_the_bag_loss_weights_each_bag_by_its_class_at_batch_size_one():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3], [-1.0, 1.5]])
    labels = torch.tensor([0, 1, 1])
    weights = torch.tensor([0.25, 3.0])
    per_bag = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    # one bag per batch: the weight scales that bag's loss (CrossEntropyLoss(weight=) cancels it)
    for row in range(3):
        one = BagLoss(weights)(logits[row : row + 1], labels[row : row + 1])
        assert float(one) == pytest.approx(float(weights[labels[row]] * per_bag[row]))
    # a batch: the weighted sum over bags divided by the number of bags, not by the weight sum
    batch = BagLoss(weights)(logits, labels)
    assert float(batch) == pytest.approx(float((weights[labels] * per_bag).sum() / 3))
    assert float(BagLoss()(logits, labels)) == pytest.approx(float(per_bag.mean()))
    # the validation loss is the same quantity, from probabilities
    probabilities = torch.softmax(logits, 1).numpy().astype(np.float64)
    assert mean_loss(probabilities, labels.numpy(), weights) == pytest.approx(float(batch))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_class_weights_change_the_trained_weights_at_any_batch_size(tmp_path, batch_size):
    work = make_random_work(tmp_path / "work", class_patients=(9, 3), dim=16, seed=21)
    options = dict(TINY, epochs=2, batch_size=batch_size, seed=4, **NO_SELECTION)
    states = {}
    for weighted in (False, True):
        out = tmp_path / f"run_{weighted}"
        train(work.root, out, class_weights=weighted, **options)
        states[weighted] = load_checkpoint(out / "fold_0" / "checkpoint_latest.pt")["model_state"]
    assert states[True].keys() == states[False].keys()
    differs = [not torch.equal(states[True][k], states[False][k]) for k in states[True]]
    assert all(differs)


def _rare_class_recall(run: Path, held_out, rare: str) -> float:
    """Recall of ``rare`` on a balanced held-out cohort, with the run's last epoch."""
    model, state = load_model_from_checkpoint(run / "fold_0" / "checkpoint_latest.pt")
    mean, std = (state["standardization"][k].numpy() for k in ("mean", "std"))
    cohort = pd.read_csv(held_out.root / "cohort.csv")
    rare_index = state["class_names"].index(rare)
    hits = []
    for slide_id in cohort.loc[cohort["label"] == rare, "slide_id"]:
        bag = (read_bag(held_out.feature_path(slide_id)).astype(np.float32) - mean) / std
        with torch.no_grad():
            logits, _ = model(torch.from_numpy(bag)[None], torch.ones(1, len(bag), dtype=bool))
        hits.append(int(logits.argmax()) == rare_index)
    return float(np.mean(hits))


@pytest.mark.slow
def test_weights_or_balanced_sampling_raise_the_rare_class_recall_on_a_10_to_1_cohort(tmp_path):
    # 40 : 5 bags (32 : 4 in training); a bag's class shows in 2 of its 20-40 instances only
    faint = {"dim": 16, "signal_instances": 2, "strength": 3.0, "slides_per_patient": 1}
    work = make_random_work(
        tmp_path / "work", class_patients=(40, 5), split=["train"] * 4 + ["val"], seed=11,
        **faint,
    )  # fmt: skip
    held_out = make_random_work(tmp_path / "held", class_patients=(30, 30), seed=12, **faint)
    options = dict(TINY, epochs=20, lr=1e-3, max_patches=None, grad_clip=None, **NO_SELECTION)
    recall = {}
    for name, correction in {
        "none": {"class_weights": False},
        "weights": {"class_weights": True},
        "balanced": {"sampler": "balanced"},
    }.items():
        train(work.root, tmp_path / name, **options, **correction)
        recall[name] = _rare_class_recall(tmp_path / name, held_out, "class_1")
    assert recall["none"] <= 0.2  # the rare class is all but ignored
    assert recall["weights"] >= recall["none"] + 0.5
    assert recall["balanced"] >= recall["none"] + 0.5


def test_balanced_sampling_draws_every_class_equally_often_reproducibly():
    labels = [0] * 90 + [1] * 9 + [2] * 1
    sampler = BalancedClassSampler(labels, seed_keys=(3, 0))
    assert len(sampler) == 100  # an epoch is as long as the training part
    draws = []
    for epoch in range(40):
        sampler.set_epoch(epoch)
        draws.append(list(sampler))
    shares = np.bincount(np.asarray(labels)[np.concatenate(draws)], minlength=3) / 4000
    np.testing.assert_allclose(shares, 1 / 3, atol=0.03)
    assert draws[0] != draws[1]  # a new draw every epoch, with replacement
    assert len(set(draws[0])) < 100
    again = BalancedClassSampler(labels, seed_keys=(3, 0))  # e.g. after a resume
    again.set_epoch(7)
    assert list(again) == draws[7]
    other_fold = BalancedClassSampler(labels, seed_keys=(3, 1))
    assert list(other_fold) != draws[0]


def test_balanced_sampling_gives_each_rank_an_equal_disjoint_share_of_one_draw():
    labels = [0] * 20 + [1] * 3
    single = BalancedClassSampler(labels, num_replicas=1, seed_keys=(0, 2))
    ranks = [
        BalancedClassSampler(labels, num_replicas=3, rank=r, seed_keys=(0, 2)) for r in range(3)
    ]
    for sampler in (single, *ranks):
        sampler.set_epoch(5)
    shares = [list(s) for s in ranks]
    assert [len(s) for s in shares] == [8, 8, 8]  # 23 bags -> 24 positions, the same steps
    interleaved = [shares[p % 3][p // 3] for p in range(24)]
    # position p of one epoch's order goes to rank p % 3: together the ranks take the order a
    # single process draws (plus one more draw to even out the shares)
    assert interleaved[:23] == list(single)


def test_class_weights_follow_the_sampler_and_both_at_once_are_refused():
    assert TrainConfig().class_weights is True
    assert TrainConfig(sampler="balanced").class_weights is False
    assert TrainConfig(sampler="balanced", class_weights=False).class_weights is False
    with pytest.raises(ValueError, match="over-correct"):
        TrainConfig(sampler="balanced", class_weights=True)


def test_balanced_sampling_with_class_weights_is_refused_before_anything_is_written(tmp_path):
    work = make_random_work(tmp_path / "work", patients=12, dim=16, seed=22)
    with pytest.raises(ConfigError, match="over-correct"):
        train(work.root, tmp_path / "run", sampler="balanced", class_weights=True, **TINY)
    assert not (tmp_path / "run").exists()


def test_the_command_line_takes_the_sampler_and_records_the_resolved_weights(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from slidemil.cli import commands  # noqa: F401  (registers the commands)
    from slidemil.cli.app import app

    work = make_random_work(tmp_path / "work", patients=12, dim=16, seed=23)
    out = tmp_path / "run"
    args = ["train", str(work.root), "--out", str(out), "--epochs", "1", "--quiet"]
    args += ["--hidden-dim", "8", "--attention-dim", "4", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--sampler", "balanced", "--min-epochs", "0"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert resolved["sampler"] == "balanced" and resolved["class_weights"] is False
    assert load_checkpoint(out / "fold_0" / "checkpoint_latest.pt")["class_weights"] is None

    both = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "both"), "--sampler",
                                    "balanced", "--class-weights"])  # fmt: skip
    assert both.exit_code == 2 and "over-correct" in both.output
