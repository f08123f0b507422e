"""MIL models: every registered model runs, attention is normalised and ignores padding."""

from __future__ import annotations

import pytest
import torch

from slidemil.errors import RegistryError
from slidemil.models import build_model, list_models, register_model
from slidemil.models.attention import masked_softmax

D, C = 24, 3


TORCH_THREADS = 1  # see conftest._torch_threads


def test_registry_lists_the_baselines_and_attention_models():
    assert {"abmil", "abmil-gated", "mean-mil", "max-mil"} <= set(list_models())
    assert list_models("abmil*") == ["abmil", "abmil-gated"]


@pytest.mark.parametrize("name", list_models())
def test_every_model_runs_forward_and_backward(name):
    torch.manual_seed(0)
    model = build_model(name, in_dim=D, n_classes=C, hidden_dim=16)
    features = torch.randn(2, 7, D)
    mask = torch.tensor([[True] * 4 + [False] * 3, [True] * 7])
    logits, attention = model(features, mask)
    assert logits.shape == (2, C)
    assert attention.shape == (2, 7)
    assert torch.allclose(attention.sum(dim=1), torch.ones(2), atol=1e-5)
    assert torch.all(attention[0, 4:] == 0)
    logits.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", list_models())
def test_padding_does_not_change_a_bags_output(name):
    torch.manual_seed(1)
    model = build_model(name, in_dim=D, n_classes=C, hidden_dim=16).eval()
    small = torch.randn(1, 5, D)
    large = torch.randn(1, 9, D)
    alone_logits, alone_attention = model(small, torch.ones(1, 5, dtype=torch.bool))
    batch = torch.zeros(2, 9, D)
    batch[0, :5] = small[0]
    batch[0, 5:] = 100.0  # padding with garbage must still be ignored
    batch[1] = large[0]
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, :5] = True
    mask[1] = True
    logits, attention = model(batch, mask)
    assert torch.allclose(logits[0], alone_logits[0], atol=1e-5)
    assert torch.allclose(attention[0, :5], alone_attention[0], atol=1e-5)
    assert torch.all(attention[0, 5:] == 0)


@pytest.mark.parametrize("name", list_models())
def test_return_scores_adds_raw_scores_and_keeps_the_rest(name):
    torch.manual_seed(2)
    model = build_model(name, in_dim=D, n_classes=C, hidden_dim=16).eval()
    features = torch.randn(2, 6, D)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    logits, attention = model(features, mask)
    logits_s, attention_s, scores = model(features, mask, return_scores=True)
    assert torch.equal(logits, logits_s) and torch.equal(attention, attention_s)
    assert scores.shape == (2, 6)
    assert torch.all(scores[0, 4:] == float("-inf")), "padding is -inf"
    assert torch.isfinite(scores[mask]).all()
    if name.startswith("abmil"):
        # the attention is the softmax of the scores over each bag's valid instances
        assert torch.allclose(attention, masked_softmax(scores, mask), atol=1e-6)
    elif name == "mean-mil":
        assert torch.equal(scores[mask], torch.zeros(10))
    elif name == "max-mil":
        # vote counts: every hidden unit has one winning instance per bag
        assert scores[0, :4].sum() == 16 and scores[1].sum() == 16
        assert torch.allclose(attention, torch.where(mask, scores, 0) / 16)


def test_raw_scores_do_not_depend_on_the_rest_of_the_bag():
    """What makes ``attention_raw`` comparable across slides: an instance's score is its own."""
    torch.manual_seed(3)
    model = build_model("abmil-gated", in_dim=D, n_classes=C, hidden_dim=16).eval()
    bag = torch.randn(1, 8, D)
    _, _, scores = model(bag, torch.ones(1, 8, dtype=torch.bool), return_scores=True)
    _, _, first_half = model(bag[:, :4], torch.ones(1, 4, dtype=torch.bool), return_scores=True)
    assert torch.allclose(scores[0, :4], first_half[0], atol=1e-6)


def test_masked_softmax_of_an_empty_bag_is_zero_not_nan():
    weights = masked_softmax(torch.randn(2, 3), torch.tensor([[False] * 3, [True, True, False]]))
    assert torch.equal(weights[0], torch.zeros(3))
    assert weights[1, 2] == 0 and torch.isclose(weights[1].sum(), torch.tensor(1.0))


def test_model_options_are_settable_and_unknown_ones_refused():
    model = build_model("abmil-gated", in_dim=D, n_classes=2, hidden_dim=40, dropout=0.1)
    assert model.project[0].out_features == 40
    with pytest.raises(RegistryError, match="attention_dim"):
        build_model("mean-mil", in_dim=D, n_classes=2, attention_dim=8)
    with pytest.raises(RegistryError, match="choose one of"):
        build_model("no-such-model", in_dim=D, n_classes=2)


def test_registering_a_duplicate_name_is_an_error():
    with pytest.raises(RegistryError, match="already registered"):
        register_model("abmil", "again")(lambda in_dim, n_classes: None)
