"""``slidemil.explain``: native per-class scores and integrated gradients for every model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import slidemil
from slidemil.explanation import ExplanationSettings, explain
from slidemil.models import build_model, get_model_entry, list_models

D, C = 12, 3
TORCH_THREADS = 1  # see conftest._torch_threads


class MaxFeatureModel(nn.Module):
    """Toy MIL model in which only one instance matters: class 1's logit is 3 × the largest
    value of feature 0 over the bag, class 0's its negative (contract A, class-agnostic)."""

    def forward(
        self, features: Tensor, mask: Tensor, return_scores: bool = False, labels=None
    ) -> tuple[Tensor, ...]:
        values = features[..., 0].masked_fill(~mask, float("-inf"))
        top = values.max(dim=1).values
        logits = torch.stack([-3 * top, 3 * top], dim=1)
        attention = torch.softmax(values, dim=1)
        return (logits, attention, values) if return_scores else (logits, attention)


class BranchModel(nn.Module):
    """Toy multi-branch model (CLAM-MB-like): one attention branch per class, with
    ``class_scores`` giving each branch's attention logits."""

    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        self.branches = nn.Linear(dim, n_classes)
        self.classifiers = nn.Parameter(torch.randn(n_classes, dim))

    def class_scores(self, features: Tensor, mask: Tensor) -> Tensor:
        return self.branches(features).transpose(1, 2).masked_fill(~mask[:, None], float("-inf"))

    def forward(self, features, mask, return_scores=False, labels=None):
        scores = self.class_scores(features, mask)  # (B, C, N)
        weights = torch.softmax(scores, dim=-1)
        bags = torch.einsum("bcn,bnd->bcd", weights, features)
        logits = (bags * self.classifiers).sum(-1)
        attention = weights.mean(dim=1)
        raw = scores.mean(dim=1)
        return (logits, attention, raw) if return_scores else (logits, attention)


SMALL = {"hidden_dim": 16, "attention_dim": 8, "heads": 2, "landmarks": 8}


def _small_model(name: str) -> nn.Module:
    """Registered model ``name`` at a test size (the options among SMALL that it has)."""
    defaults = get_model_entry(name).defaults()
    options = {k: v for k, v in SMALL.items() if k in defaults}
    return build_model(name, in_dim=D, n_classes=C, **options)


def _bag(n: int = 20, seed: int = 0) -> Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def test_the_api_is_one_function_on_the_package():
    assert slidemil.explain is explain
    with pytest.raises(ValueError, match="explanation method"):
        ExplanationSettings("shap")
    with pytest.raises(ValueError, match="one non-empty bag"):
        explain(build_model("abmil", in_dim=D, n_classes=C), np.zeros((0, D), np.float32))


@pytest.mark.parametrize("name", list_models())
def test_every_model_gives_scores_per_class_for_any_bag_size(name):
    torch.manual_seed(0)
    model = _small_model(name)
    model.train()  # explain evaluates in eval mode and gives the model back as it was
    for n in (1, 9):
        bag = _bag(n).numpy().astype(np.float16)  # any float dtype, NumPy or torch
        for method in ("attention", "ig"):
            result = explain(model, bag, method, steps=8)
            assert result.scores.shape == (C, n) and result.method == method
            assert np.isfinite(result.scores).all() and result.logits.shape == (C,)
            assert result.attention.shape == result.raw_scores.shape == (n,)
        native = explain(model, bag, "attention")
        assert native.class_specific == callable(getattr(model, "class_scores", None))
        if not native.class_specific:  # class-agnostic: the same scores for every class
            np.testing.assert_array_equal(native.scores, np.repeat(native.raw_scores[None], C, 0))
    assert model.training
    again = explain(model, _bag(9), "ig", steps=8).scores
    np.testing.assert_array_equal(again, explain(model, _bag(9), "ig", steps=8).scores)


@pytest.mark.parametrize("name", list_models())
def test_integrated_gradients_are_complete(name):
    """Σ over instances of class c's scores = logit_c(x) − logit_c(baseline), for each class, up
    to the quadrature error (ReLU kinks make it shrink slowly: ~3% at 64 steps, <1% at 256)."""
    torch.manual_seed(1)
    model = _small_model(name)
    for baseline in ("zero", "mean"):
        result = explain(model, _bag(30, seed=2) + 1.0, "ig", baseline=baseline, steps=256)
        difference = result.logits - result.baseline_logits
        gap = result.completeness_gap()
        total = result.scores.sum(axis=1)
        np.testing.assert_allclose(gap, np.abs(total - difference), atol=1e-5)
        assert (gap <= 0.01 * np.abs(difference).max() + 5e-4).all(), (baseline, gap, difference)


def test_completeness_is_tight_on_a_smooth_model_and_steps_are_batched_for_memory():
    torch.manual_seed(3)
    model = BranchModel(D, C)
    bag = _bag(40, seed=4)
    result = explain(model, bag, "ig", steps=32)
    np.testing.assert_allclose(
        result.scores.sum(axis=1), result.logits - result.baseline_logits, atol=1e-4
    )
    # one interpolated bag per pass (N instances) gives what 32 bags in one pass give
    chunked = explain(model, bag, "ig", steps=32, batch_instances=len(bag))
    np.testing.assert_allclose(chunked.scores, result.scores, atol=1e-5)
    assert result.settings == {"baseline": "zero", "steps": 32}


def test_integrated_gradients_rank_the_one_instance_that_matters_first():
    bag = torch.rand(25, D)
    bag[17, 0] = 4.0  # the bag's largest feature 0: the only instance the logits see
    result = explain(MaxFeatureModel(), bag, "ig", steps=16)
    assert result.class_specific
    assert int(np.argmax(result.scores[1])) == 17 and int(np.argmin(result.scores[0])) == 17
    others = np.delete(result.scores, 17, axis=1)
    np.testing.assert_allclose(others, 0.0, atol=1e-6)
    np.testing.assert_allclose(result.scores[1, 17], 12.0, rtol=1e-5)  # 3 × 4 from baseline 0


def test_a_feature_the_model_ignores_gets_no_attribution():
    torch.manual_seed(5)
    model = build_model("abmil-gated", in_dim=D, n_classes=C)
    ignored, used = 4, 5
    with torch.no_grad():
        model.project[0].weight[:, ignored] = 0.0  # the model never reads feature 4
    bag = _bag(15, seed=6)
    before = explain(model, bag, "ig", steps=16).scores
    changed = bag.clone()
    changed[:, ignored] += 5.0 * torch.randn(15)
    np.testing.assert_allclose(explain(model, changed, "ig", steps=16).scores, before, atol=1e-5)
    only_ignored = torch.zeros(15, D)
    only_ignored[:, ignored] = torch.randn(15)  # differs from the zero baseline only there
    np.testing.assert_allclose(explain(model, only_ignored, "ig", steps=16).scores, 0.0, atol=1e-7)
    changed[:, used] += 5.0 * torch.randn(15)  # a feature the model reads does move the scores
    assert np.abs(explain(model, changed, "ig", steps=16).scores - before).max() > 1e-3


def test_class_specific_native_scores_differ_per_class_and_agnostic_ones_are_flagged():
    torch.manual_seed(7)
    bag = _bag(10, seed=8)
    branched = explain(BranchModel(D, C), bag, "attention")
    assert branched.class_specific and branched.method == "attention"
    assert not np.allclose(branched.scores[0], branched.scores[1])
    plain = explain(build_model("abmil", in_dim=D, n_classes=C), bag, "attention")
    assert not plain.class_specific and plain.completeness_gap() is None
    assert (plain.scores == plain.scores[:1]).all()
    # integrated gradients separate the classes even of a class-agnostic model
    ig = explain(build_model("abmil", in_dim=D, n_classes=C), bag, "ig", steps=8)
    assert ig.class_specific and not np.allclose(ig.scores[0], ig.scores[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_scores():
    torch.manual_seed(9)
    model = build_model("abmil-gated", in_dim=D, n_classes=C)
    bag = _bag(300, seed=10)
    cpu = explain(model, bag, "ig", steps=16)
    gpu = explain(model.cuda(), bag, "ig", steps=16, batch_instances=600)
    np.testing.assert_allclose(gpu.scores, cpu.scores, atol=1e-4, rtol=1e-3)


def test_bags_made_under_inference_mode_are_explained_too():
    torch.manual_seed(11)
    model = build_model("abmil", in_dim=D, n_classes=C)
    bag = _bag(8, seed=12)
    with torch.inference_mode():
        frozen = bag.clone()  # an inference tensor, as Ensemble's device copy once was
        inside = explain(model, frozen, "ig", steps=8).scores
    np.testing.assert_allclose(inside, explain(model, bag, "ig", steps=8).scores, atol=1e-6)


def test_a_coordinate_aware_model_is_explained_on_the_bags_coords():
    """TransMIL lays the patches out by ``coords``: ``explain`` gives the model's outputs on
    them (not on the bag order), integrated gradients stay complete with the coords held fixed
    along the path, and a model without ``uses_coords`` ignores them."""
    torch.manual_seed(3)
    model = _small_model("transmil").eval()
    bag = _bag(30, seed=4)
    cells = np.random.default_rng(5).choice(100, size=30, replace=False)
    coords = np.stack([cells % 10, cells // 10], axis=1).astype(np.float32) * 256
    mask = torch.ones(1, 30, dtype=torch.bool)
    with torch.no_grad():
        on_grid = model(bag[None], mask, coords=torch.from_numpy(coords)[None])[0][0]
    native = explain(model, bag, "attention", coords=coords)
    np.testing.assert_allclose(native.logits, on_grid.numpy(), atol=1e-5)
    assert np.abs(explain(model, bag, "attention").logits - native.logits).max() > 1e-4
    result = explain(model, bag + 1.0, "ig", steps=256, coords=coords)
    difference = result.logits - result.baseline_logits
    assert (result.completeness_gap() <= 0.01 * np.abs(difference).max() + 5e-4).all()
    abmil = _small_model("abmil")
    np.testing.assert_array_equal(
        explain(abmil, bag, "ig", steps=8, coords=coords).scores,
        explain(abmil, bag, "ig", steps=8).scores,
    )
    with pytest.raises(ValueError, match="coords"):
        explain(model, bag, coords=coords[:5])
