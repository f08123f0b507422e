"""MIL models: every registered model runs, attention is normalised and ignores padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slidemil.errors import ConfigError, RegistryError
from slidemil.models import build_model, get_model_entry, list_models, register_model
from slidemil.models.attention import masked_softmax
from slidemil.models.clam import smooth_top1_svm_loss

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
    if getattr(model, "uses_labels", False):  # contract A: the training call of such a model
        logits, attention, auxiliary = model(features, mask, labels=torch.tensor([0, C - 1]))
    else:
        (logits, attention), auxiliary = model(features, mask), 0.0
    assert logits.shape == (2, C)
    assert attention.shape == (2, 7)
    assert torch.allclose(attention.sum(dim=1), torch.ones(2), atol=1e-5)
    assert torch.all(attention[0, 4:] == 0)
    (logits.sum() + auxiliary).backward()
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


# DSMIL (Li et al. 2021): the dual-stream model's own behaviour.


def _dsmil(**options):
    torch.manual_seed(5)
    return build_model("dsmil", in_dim=D, n_classes=C, hidden_dim=16, **options).eval()


def test_dsmil_critical_instance_is_the_highest_scoring_valid_instance():
    model = _dsmil()
    bag = torch.randn(1, 6, D)
    with torch.no_grad():
        instance_logits = model.instance_classifier(model.project(bag))[0]  # (N, C)
        # garbage padding that would win the max if it were not masked
        padded = torch.cat([bag, 1e3 * instance_logits.new_ones(1, 4, D)], dim=1)
        mask = torch.tensor([[True] * 6 + [False] * 4])
        max_logits, _, _, critical = model.streams(padded, mask)
    assert torch.equal(critical[0], instance_logits.argmax(dim=0))
    assert torch.allclose(max_logits[0], instance_logits.max(dim=0).values, atol=1e-6)


def test_dsmil_attention_is_relative_to_the_critical_instance():
    """Moving the critical instance moves every other instance's attention logit; moving a far,
    non-critical one leaves the others' logits alone and barely changes their attention."""
    model = _dsmil()
    torch.manual_seed(6)
    bag, mask = torch.randn(1, 12, D), torch.ones(1, 12, dtype=torch.bool)
    with torch.no_grad():
        instance_logits = model.instance_classifier(model.project(bag))[0]  # (N, C)
        top2 = instance_logits.topk(2, dim=0).values
        c = int((top2[0] - top2[1]).argmax())  # the class whose critical instance is clearest
        crit = int(instance_logits[:, c].argmax())
        scores = model.class_scores(bag, mask)[:, c]
        attention = masked_softmax(scores, mask)[0]
        far = int(attention.argmin())
        assert far != crit

        def others_change(moved: int) -> tuple[float, float]:
            changed = bag.clone()
            changed[0, moved] += 0.05 * torch.randn(D)
            _, _, _, new_critical = model.streams(changed, mask)
            assert int(new_critical[0, c]) == crit, "the perturbation keeps the critical one"
            new_scores = model.class_scores(changed, mask)[:, c]
            new = masked_softmax(new_scores, mask)[0]
            keep = torch.arange(12) != moved
            score_change = (new_scores[0, keep] - scores[0, keep]).abs().max()
            return float(score_change), float((new[keep] - attention[keep]).abs().sum())

        torch.manual_seed(7)
        critical_scores, critical_attention = others_change(crit)
        torch.manual_seed(7)
        far_scores, far_attention = others_change(far)
    assert far_scores < 1e-6 < critical_scores
    assert critical_attention > 2 * far_attention


def test_dsmil_class_scores_are_per_class_and_padding_free():
    model = _dsmil()
    bag = torch.randn(1, 5, D)
    alone = model.class_scores(bag, torch.ones(1, 5, dtype=torch.bool))
    batch = torch.cat([torch.cat([bag, torch.full((1, 3, D), 50.0)], 1), torch.randn(1, 8, D)])
    mask = torch.tensor([[True] * 5 + [False] * 3, [True] * 8])
    scores = model.class_scores(batch, mask)
    assert alone.shape == (1, C, 5) and scores.shape == (2, C, 8)
    assert torch.allclose(scores[0, :, :5], alone[0], atol=1e-5)
    assert torch.all(scores[0, :, 5:] == float("-inf"))
    # the attention is the predicted class's row of the per-class attention
    logits, attention, raw = model(batch, mask, return_scores=True)
    rows = scores[torch.arange(2), logits.argmax(-1)]
    assert torch.equal(raw, rows)
    assert torch.allclose(attention, masked_softmax(rows, mask), atol=1e-6)


def test_dsmil_takes_a_single_instance_bag():
    model = _dsmil()
    single = torch.ones(2, 1, dtype=torch.bool)
    logits, attention, scores = model(torch.randn(2, 1, D), single, return_scores=True)
    assert logits.shape == (2, C) and torch.isfinite(logits).all()
    assert torch.equal(attention, torch.ones(2, 1)) and torch.isfinite(scores).all()


def test_dsmil_gradients_reach_both_streams_and_logits_average_them():
    model = _dsmil(passing_v=True).train()
    bag, mask = torch.randn(3, 9, D), torch.ones(3, 9, dtype=torch.bool)
    logits, _ = model(bag, mask)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    for part in (model.instance_classifier, model.query, model.value, model.bag_classifier):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    model.eval()
    with torch.no_grad():
        max_logits, bag_logits, _, _ = model.streams(bag, mask)
        assert torch.allclose(model(bag, mask)[0], (max_logits + bag_logits) / 2, atol=1e-6)
        assert not torch.allclose(max_logits, bag_logits)


def _planted_instance_bags(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` bags of 10 noise instances; bags of class 1 hide one shifted (planted) instance.
    Returns features (n, 10, D), labels (n,) and the planted index of each bag (n,)."""
    x = torch.randn(n, 10, D)
    labels = torch.arange(n) % 2
    planted = torch.randint(0, 10, (n,))
    x[labels == 1, planted[labels == 1]] += torch.cat([torch.full((4,), 3.0), torch.zeros(D - 4)])
    return x, labels, planted


def _train_on_planted_instances(name: str, *, steps: int, batch: int, lr: float):
    """A 2-class model trained on planted-instance bags; returns its eval-mode logits and
    attention on 100 fresh bags with their labels and planted indices."""
    torch.manual_seed(8)
    model = build_model(name, in_dim=D, n_classes=2, hidden_dim=16, dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    mask = torch.ones(batch, 10, dtype=torch.bool)
    for _ in range(steps):
        x, labels, _ = _planted_instance_bags(batch)
        loss = torch.nn.functional.cross_entropy(model(x, mask)[0], labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    x, labels, planted = _planted_instance_bags(100)
    with torch.no_grad():
        logits, attention = model(x, torch.ones(100, 10, dtype=torch.bool))
    return logits, attention, labels, planted


def test_dsmil_learns_to_attend_to_the_planted_instance():
    """After training, the predicted class's attention peaks on the planted instance."""
    logits, attention, labels, planted = _train_on_planted_instances(
        "dsmil", steps=150, batch=16, lr=1e-2
    )
    positive = labels == 1
    assert (logits.argmax(-1) == labels).float().mean() >= 0.9
    assert (attention[positive].argmax(-1) == planted[positive]).float().mean() >= 0.9
    assert attention[positive, planted[positive]].mean() > 0.3  # uniform would be 0.1


# CLAM-SB / CLAM-MB (Lu et al. 2021): the instance-level clustering loss and the class branches.


def _clam(name: str, n_classes: int = C, **options):
    torch.manual_seed(11)
    return build_model(name, in_dim=D, n_classes=n_classes, hidden_dim=16, dropout=0.0, **options)


def _clam_loss(model, features, mask, labels) -> torch.Tensor:
    return model(features, mask, labels=labels)[-1]


@pytest.mark.parametrize("name", ["clam-sb", "clam-mb"])
def test_clam_instance_loss_trains_the_instance_classifiers_and_the_projection(name):
    model = _clam(name)  # 3 classes: subtyping, every class's classifier takes part
    features, mask = torch.randn(2, 10, D), torch.ones(2, 10, dtype=torch.bool)
    loss = _clam_loss(model, features, mask, torch.tensor([0, 2]))
    assert loss.shape == () and loss > 0
    loss.backward()
    for classifier in model.instance_classifiers:
        assert classifier.weight.grad.abs().sum() > 0
    # the attention reads the projection the loss trains; its own layers only pick the instances
    assert model.project[0].weight.grad.abs().sum() > 0
    scorer_grad = model.attention.weight.weight.grad
    assert scorer_grad is None or not scorer_grad.any()


def test_clam_instance_loss_follows_the_attention():
    """The instances taken as positives and negatives are the attended ones: reversing the
    attention's ranking swaps them and changes the loss."""
    model = _clam("clam-sb", n_classes=2).eval()
    features, mask = torch.randn(1, 20, D), torch.ones(1, 20, dtype=torch.bool)
    labels = torch.tensor([1])
    with torch.no_grad():
        before = _clam_loss(model, features, mask, labels)
        model.attention.weight.weight.neg_()
        model.attention.weight.bias.neg_()
        after = _clam_loss(model, features, mask, labels)
    assert not torch.isclose(before, after, atol=1e-4)


@pytest.mark.parametrize("name", ["clam-sb", "clam-mb"])
def test_clam_top_k_never_selects_padding_and_counts_k_per_bag(name):
    model = _clam(name, n_classes=2, k_sample=2).eval()  # 2 classes: no subtyping
    bag = torch.randn(1, 9, D)
    padded = torch.cat([bag, torch.full((1, 7, D), 100.0)], dim=1)  # garbage padding
    padded.requires_grad_(True)
    mask = torch.tensor([[True] * 9 + [False] * 7])
    labels = torch.tensor([1])
    loss = _clam_loss(model, padded, mask, labels)
    loss.backward()
    touched = padded.grad[0].abs().sum(dim=1) > 0
    assert not touched[9:].any(), "padding was selected"
    assert touched.sum() == 4, "top-2 positives and bottom-2 negatives of the true class"
    alone = _clam_loss(model, bag, torch.ones(1, 9, dtype=torch.bool), labels)
    assert torch.allclose(loss, alone, atol=1e-5)


@pytest.mark.parametrize("name", ["clam-sb", "clam-mb"])
@pytest.mark.parametrize("n_valid", [1, 2, 5])
def test_clam_small_bags_cap_k_without_error(name, n_valid):
    """k = 8 with bags of 1, 2 and 5 instances: no instance is both a positive and a negative,
    a 1-instance bag has no pair, and under subtyping it is still another class's negative."""
    for n_classes, subtyping in [(2, False), (3, True)]:
        model = _clam(name, n_classes=n_classes).eval()
        assert model.subtyping is subtyping  # "auto": subtyping when there are more than 2 classes
        features = torch.randn(1, n_valid, D, requires_grad=True)
        mask = torch.ones(1, n_valid, dtype=torch.bool)
        loss = _clam_loss(model, features, mask, torch.tensor([0]))
        assert torch.isfinite(loss)
        if n_valid == 1 and not subtyping:
            assert loss == 0
        else:
            assert loss > 0
            loss.backward()
            selected = int((features.grad[0].abs().sum(dim=1) > 0).sum())
            assert selected == (n_valid if subtyping else 2 * (n_valid // 2))


@pytest.mark.parametrize("name", ["clam-sb", "clam-mb"])
def test_clam_bag_alone_equals_the_bag_padded_in_a_batch(name):
    model = _clam(name).eval()
    small, large = torch.randn(1, 5, D), torch.randn(1, 9, D)
    batch = torch.cat([torch.cat([small, torch.full((1, 4, D), 100.0)], dim=1), large])
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 5:] = False
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        logits, attention, scores, loss = model(batch, mask, return_scores=True, labels=labels)
        alone = model(small, torch.ones(1, 5, dtype=torch.bool), True, labels[:1])
        other = model(large, torch.ones(1, 9, dtype=torch.bool), True, labels[1:])
    assert torch.allclose(logits[0], alone[0][0], atol=1e-5)
    assert torch.allclose(attention[0, :5], alone[1][0], atol=1e-5)
    assert torch.allclose(scores[0, :5], alone[2][0], atol=1e-5)
    assert torch.all(scores[0, 5:] == float("-inf")) and torch.all(attention[0, 5:] == 0)
    assert torch.allclose(loss, (alone[3] + other[3]) / 2, atol=1e-5), "mean over the bags"
    if name == "clam-mb":
        per_class = model.class_scores(batch, mask)
        assert torch.allclose(per_class[0, :, :5], model.class_scores(small, mask[:1, :5])[0])
        assert torch.all(per_class[0, :, 5:] == float("-inf"))


def test_clam_mb_has_one_branch_per_class_and_each_drives_its_own_logit():
    model = _clam("clam-mb").eval()
    features, mask = torch.randn(1, 12, D), torch.ones(1, 12, dtype=torch.bool)
    with torch.no_grad():
        per_class = model.class_scores(features, mask)
        logits, attention, scores = model(features, mask, return_scores=True)
        assert per_class.shape == (1, C, 12)
        assert not torch.allclose(per_class[0, 0], per_class[0, 1], atol=1e-3)
        predicted = int(logits.argmax())
        # the class-agnostic map is the predicted class's branch
        assert torch.allclose(scores[0], per_class[0, predicted])
        assert torch.allclose(attention, masked_softmax(per_class[:, predicted], mask))
        model.attention.weight.weight[1] += torch.randn(model.attention.weight.in_features)
        changed = model(features, mask)[0]
    assert not torch.isclose(changed[0, 1], logits[0, 1], atol=1e-5)
    assert torch.allclose(changed[0, [0, 2]], logits[0, [0, 2]], atol=1e-6)
    assert not hasattr(_clam("clam-sb"), "class_scores"), "clam-sb is class-agnostic"


def test_clam_options_change_the_loss_and_bad_values_are_refused():
    features, mask = torch.randn(2, 12, D), torch.ones(2, 12, dtype=torch.bool)
    labels = torch.tensor([0, 1])

    def loss(**options):
        with torch.no_grad():
            return _clam_loss(_clam("clam-mb", **options).eval(), features, mask, labels)

    assert torch.isclose(loss(instance_loss_weight=2.0), 2 * loss(instance_loss_weight=1.0))
    assert loss(instance_loss_weight=0.0) == 0
    assert not torch.isclose(loss(instance_loss="ce"), loss(instance_loss="svm"))
    assert not torch.isclose(loss(k_sample=1), loss(k_sample=4))
    assert not torch.isclose(loss(subtyping="false"), loss(subtyping="true"))
    assert torch.isclose(loss(subtyping="true"), loss())  # 3 classes: auto is subtyping
    for bad in [{"k_sample": 0}, {"instance_loss": "hinge"}, {"subtyping": "maybe"}]:
        with pytest.raises(ConfigError, match=next(iter(bad))):
            _clam("clam-sb", **bad)


def test_clam_options_from_the_command_line_and_yaml_reach_the_model():
    entry = get_model_entry("clam-mb")
    for given, expected in [("false", False), (True, True), ("auto", True), ("none", True)]:
        options = entry.resolve_options({"subtyping": given, "k_sample": "4"})
        model = build_model("clam-mb", in_dim=D, n_classes=C, hidden_dim=16, **options)
        assert model.subtyping is expected and model.k_sample == 4
    two_classes = build_model("clam-sb", in_dim=D, n_classes=2, hidden_dim=16)
    assert two_classes.subtyping is False  # auto: tumour vs normal is not subtyping


def test_smooth_svm_loss_is_a_smoothed_multiclass_hinge():
    logits = torch.tensor([[2.0, -1.0], [0.2, 0.0], [-3.0, 3.0]])
    targets = torch.tensor([0, 0, 0])
    hinge = torch.tensor([0.0, 0.8, 7.0])  # max_j(s_j + [j != y]) - s_y
    assert torch.allclose(smooth_top1_svm_loss(logits, targets, tau=1e-3), hinge, atol=1e-2)
    smooth = smooth_top1_svm_loss(logits, targets)
    assert torch.all(smooth > hinge) and torch.all(smooth - hinge <= torch.log(torch.tensor(2.0)))


def test_clam_learns_instance_clusters_when_the_positive_instances_are_few():
    """Positive bags hold 2 lesion instances among 24: training on bag loss + clustering loss
    lowers the clustering loss (the attended instances become separable from the ignored ones)."""
    generator = torch.Generator().manual_seed(3)
    n_bags, n_instances = 32, 24
    features = torch.randn(n_bags, n_instances, D, generator=generator)
    labels = torch.arange(n_bags) % 2
    lesion = torch.zeros(n_bags, n_instances, dtype=torch.bool)
    lesion[labels == 1, :2] = True
    features[lesion] += 2.5 * torch.nn.functional.one_hot(torch.tensor(0), D).float()
    mask = torch.ones(n_bags, n_instances, dtype=torch.bool)
    mask[::3, 20:] = False  # some bags padded
    model = _clam("clam-sb", n_classes=2, k_sample=2, instance_loss_weight=1.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def instance_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(_clam_loss(model, features, mask, labels))

    before = instance_loss()
    for _ in range(60):
        model.train()
        logits, _, auxiliary = model(features, mask, labels=labels)
        loss = torch.nn.functional.cross_entropy(logits, labels) + auxiliary
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = instance_loss()
    assert after < 0.5 * before


# TransMIL (Shao et al. 2021): Nyström attention, the PPEG's square layout, the explanation.


def _transmil(**options):
    torch.manual_seed(9)
    return build_model("transmil", in_dim=D, n_classes=C, hidden_dim=16, **options).eval()


def _softmax_attention(module, tokens):
    """Exact multi-head softmax attention of a NystromAttention's own weights: the output
    (without the values' skip convolution) and the attention matrices (B, h, T, T)."""
    q, k, v = (
        part.unflatten(-1, (module.heads, module.dim_head)).transpose(1, 2)
        for part in module.to_qkv(tokens).chunk(3, dim=-1)
    )
    matrix = torch.softmax(q @ k.transpose(-1, -2) * module.dim_head**-0.5, dim=-1)
    return matrix @ v, matrix


@pytest.mark.parametrize("n", [1, 2, 5, 17, 300])
def test_transmil_gives_outputs_for_bags_of_any_size(n):
    model = _transmil()
    torch.manual_seed(n)
    logits, attention, scores = model(
        torch.randn(1, n, D), torch.ones(1, n, dtype=torch.bool), return_scores=True
    )
    assert logits.shape == (1, C) and torch.isfinite(logits).all()
    assert attention.shape == scores.shape == (1, n)
    assert torch.isclose(attention.sum(), torch.tensor(1.0), atol=1e-5)
    assert (attention >= 0).all() and torch.isfinite(scores).all()


def test_transmil_padding_anywhere_in_a_batch_does_not_change_a_bag():
    """Bags whose squares and landmark segments differ share a batch; one is padded in the
    middle with garbage. Each gives what it gives alone."""
    model = _transmil(landmarks=8)  # bag 5: 6 landmarks alone; 17, 40: 2-6 tokens each
    torch.manual_seed(10)
    sizes = (5, 17, 40)
    bags = [torch.randn(1, n, D) for n in sizes]
    alone = [model(b, torch.ones(1, n, dtype=torch.bool), return_scores=True) for b, n in
             zip(bags, sizes, strict=True)]  # fmt: skip
    batch = torch.full((3, 46, D), 1e4)
    mask = torch.zeros(3, 46, dtype=torch.bool)
    where = [torch.arange(5), torch.cat([torch.arange(8), torch.arange(20, 29)]), torch.arange(40)]
    for row, (bag, index) in enumerate(zip(bags, where, strict=True)):
        batch[row, index] = bag[0]
        mask[row, index] = True
    batch[0, 30] = float("nan")
    logits, attention, scores = model(batch, mask, return_scores=True)
    for row, (expected, index) in enumerate(zip(alone, where, strict=True)):
        assert torch.allclose(logits[row], expected[0][0], atol=1e-5)
        assert torch.allclose(attention[row, index], expected[1][0], atol=1e-5)
        assert torch.allclose(scores[row, index], expected[2][0], atol=1e-4)
        assert torch.all(attention[row, ~mask[row]] == 0)
        assert torch.all(scores[row, ~mask[row]] == float("-inf"))


def test_nystrom_attention_is_softmax_attention_when_every_token_is_a_landmark():
    """With m >= T the landmarks are the tokens: F A⁺ B is the softmax matrix once the
    pseudo-inverse has converged. These attention matrices are ill-conditioned (condition
    number ~1e5): the paper's 6 iterations leave ~0.05, 30 reach float32's ~3e-4."""
    from slidemil.models.nystrom import NystromAttention

    torch.manual_seed(11)
    tokens = 3 * torch.randn(2, 40, 32)
    lengths = torch.tensor([40, 40])
    errors = []
    for iterations in (6, 30):
        torch.manual_seed(12)  # the same weights for every iteration count
        module = NystromAttention(32, heads=4, dim_head=8, landmarks=64, pinv_iterations=iterations)
        with torch.no_grad():
            out, first_row = module(tokens, lengths, first_token_attention=True)
            exact, matrix = _softmax_attention(module, tokens)
            v = module.to_qkv(tokens).chunk(3, dim=-1)[2].unflatten(-1, (4, 8)).transpose(1, 2)
            exact = module.to_out((exact + module.value_skip(v)).transpose(1, 2).flatten(2))
        errors.append(float((out - exact).abs().max()))
        row_error = float((first_row - matrix[:, :, 0]).abs().max())
    assert 1e-3 < errors[0] < 0.1
    assert errors[1] < 1e-3 and row_error < 1e-3


def test_nystrom_approximation_tightens_as_landmarks_grow():
    """T = 300 random tokens (no structure for the segment means to summarise: the hard case):
    the relative error of the attention output falls from ~0.6 with 4 landmarks to ~0.3 with 64
    and ~0.03 with one landmark per token."""
    from slidemil.models.nystrom import NystromAttention

    torch.manual_seed(16)
    tokens = torch.randn(1, 300, 32)
    relative = []
    for landmarks in (4, 64, 300):
        torch.manual_seed(13)
        module = NystromAttention(32, heads=4, dim_head=8, landmarks=landmarks)
        torch.nn.init.zeros_(module.value_skip.weight)  # compare the attention part alone
        torch.nn.init.zeros_(module.to_out[0].bias)
        with torch.no_grad():
            out, _ = module(tokens, torch.tensor([300]))
            exact = module.to_out(_softmax_attention(module, tokens)[0].transpose(1, 2).flatten(2))
        relative.append(float((out - exact).norm() / exact.norm()))
    assert relative[0] > relative[1] > relative[2]
    assert relative[1] < 0.5 and relative[2] < 0.06


@pytest.mark.parametrize("n", [1, 5, 17, 50])
def test_ppeg_is_the_papers_convolutions_on_the_square_of_the_bag(n):
    """The paper's way: repeat the first instances up to ⌈√n⌉², view the sequence as a square
    image, x + conv7 + conv5 + conv3; the PPEG gives it for each bag of a padded batch."""
    from slidemil.models.transmil import PPEG

    torch.manual_seed(14)
    ppeg = PPEG(6)
    instances = torch.randn(1, n, 6)
    side = int(torch.ceil(torch.tensor(n**0.5)))
    square = torch.cat([instances, instances[:, : side * side - n]], dim=1)
    image = square.transpose(1, 2).reshape(1, 6, side, side)
    expected = image + ppeg.conv7(image) + ppeg.conv5(image) + ppeg.conv3(image)
    expected = expected.flatten(2).transpose(1, 2)[:, :n]
    padded = torch.cat([torch.cat([instances, torch.randn(1, 3, 6)], 1), torch.randn(1, n + 3, 6)])
    with torch.no_grad():
        got = ppeg(padded, torch.tensor([n, n + 3]))
    assert torch.allclose(got[0, :n], expected[0], atol=1e-5)
    assert torch.all(got[0, n:] == 0)


def _tissue_grid(seed: int, rows: int = 12, columns: int = 15) -> tuple[np.ndarray, np.ndarray]:
    """An irregular scattered tissue shape on a patch grid of step 256 (x) by 224 (y) off an odd
    origin, its rows shuffled: the cells (n, 2) row, column and the level-0 coords (n, 2) x, y."""
    rng = np.random.default_rng(seed)
    kept = [(r, c) for r in range(rows) for c in range(columns) if rng.random() < 0.45]
    cells = np.array(kept or [(0, 0)])  # one patch at least
    cells = cells[rng.permutation(len(cells))]
    return cells, np.stack([1000 + 256 * cells[:, 1], 77 + 224 * cells[:, 0]], axis=1)


def test_grid_neighbours_are_the_patches_in_the_neighbouring_cells():
    """On a scattered tissue shape the PPEG's 7×7 gathers find what a brute-force search of the
    cells finds: the patch in each neighbouring cell, none where the cell is background."""
    from slidemil.models.transmil import PPEG_RADIUS, grid_neighbours

    cells, coords = _tissue_grid(21)
    got = grid_neighbours(torch.tensor(coords)[None], torch.tensor([len(cells)]), PPEG_RADIUS)[0]
    where = {(int(r), int(c)): i for i, (r, c) in enumerate(cells)}
    offsets = [(dr, dc) for dr in range(-3, 4) for dc in range(-3, 4)]
    for k, (dr, dc) in enumerate(offsets):
        expected = [where.get((int(r) + dr, int(c) + dc), -1) + 1 for r, c in cells]
        assert got[k].tolist() == expected
    assert 0 < int((got > 0).sum()) < got.numel()  # both patches and background were looked up


def test_transmil_on_coords_does_not_depend_on_the_order_of_the_rows():
    """The same bag with its rows shuffled: the coords layout gives the same outputs (for the
    same rows), the bag-order layout does not."""
    cells, coords = _tissue_grid(22)
    n = len(cells)
    model = _transmil(landmarks=8)  # Nyström segments of the raster order, not of the rows
    in_order = _transmil(landmarks=8, layout="order")
    torch.manual_seed(23)
    bag, shuffle = torch.randn(1, n, D), torch.randperm(n)
    mask = torch.ones(1, n, dtype=torch.bool)
    xy = torch.tensor(coords)[None]
    with torch.no_grad():
        for layout_model, invariant in ((model, True), (in_order, False)):
            first = layout_model(bag, mask, return_scores=True, coords=xy)
            second = layout_model(bag[:, shuffle], mask, return_scores=True, coords=xy[:, shuffle])
            same = torch.allclose(first[0], second[0], atol=1e-5) and torch.allclose(
                first[2][:, shuffle], second[2], atol=1e-4
            )
            assert same == invariant
        # and the coords change what the model computes: the layout is not the bag order
        assert not torch.allclose(model(bag, mask, coords=xy)[0], model(bag, mask)[0], atol=1e-4)


def test_transmil_on_coords_ignores_padding_rows_and_their_coords():
    """Bags of different tissue shapes share a batch, padded in the middle with garbage
    features and coords; each gives what it gives alone (float32 and int64 coords alike)."""
    model = _transmil(landmarks=8)
    shapes = [_tissue_grid(seed, rows, columns) for seed, rows, columns in
              ((24, 1, 1), (25, 3, 4), (26, 9, 9))]  # fmt: skip
    torch.manual_seed(27)
    bags = [torch.randn(1, len(cells), D) for cells, _ in shapes]
    alone = [
        model(b, torch.ones(1, b.shape[1], dtype=torch.bool), True, coords=torch.tensor(xy)[None])
        for b, (_, xy) in zip(bags, shapes, strict=True)
    ]
    longest = max(b.shape[1] for b in bags) + 6
    batch, mask = torch.full((3, longest, D), 1e4), torch.zeros(3, longest, dtype=torch.bool)
    xy_batch = torch.full((3, longest, 2), -5e6)
    for row, (bag, (_, xy)) in enumerate(zip(bags, shapes, strict=True)):
        index = torch.tensor([0, 1, *range(6, bag.shape[1] + 4)][: bag.shape[1]])
        batch[row, index], mask[row, index] = bag[0], True
        xy_batch[row, index] = torch.tensor(xy, dtype=torch.float32)
    for coords in (xy_batch, xy_batch.long()):
        logits, attention, scores = model(batch, mask, True, coords=coords)
        for row, expected in enumerate(alone):
            assert torch.allclose(logits[row], expected[0][0], atol=1e-5)
            assert torch.allclose(attention[row, mask[row]], expected[1][0], atol=1e-5)
            assert torch.allclose(scores[row, mask[row]], expected[2][0], atol=1e-4)


def test_transmil_refuses_an_unknown_layout():
    with pytest.raises(ConfigError, match="layout='grid' must be one of coords, order"):
        _transmil(layout="grid")


def test_square_side_is_exact_for_large_bags():
    from slidemil.models.transmil import square_side

    k = torch.arange(1, 5000, dtype=torch.long) * 997
    n = torch.cat([k * k - 1, k * k, k * k + 1, torch.tensor([1, 2, 3, 4, 5])])
    side = square_side(n)
    assert torch.all(side * side >= n) and torch.all((side - 1) * (side - 1) < n)


def test_transmil_attention_is_the_class_tokens_row_of_the_last_layer():
    """The explanation is the last layer's class-token row of F A⁺ B (which the test above
    checks against softmax attention), mean over heads, without the class token's own share."""
    model = _transmil(depth=3)
    rows = []
    for layer in model.layers:
        layer.attention.register_forward_hook(lambda module, args, out: rows.append(out[1]))
    torch.manual_seed(15)
    bag = torch.randn(1, 20, D)
    with torch.no_grad():
        _, attention, scores = model(bag, torch.ones(1, 20, dtype=torch.bool), return_scores=True)
    assert rows[0] is None and rows[1] is None and rows[2].shape == (1, 8, 21)
    to_instances = rows[2][0].mean(dim=0)[1:]
    assert torch.allclose(scores[0], 20 * to_instances, atol=1e-6)
    clipped = to_instances.clamp(min=0)
    assert torch.allclose(attention[0], clipped / clipped.sum(), atol=1e-6)


def test_a_traced_transmil_serves_bags_of_any_size():
    """A trace keeps all m landmarks and the square's side as tensor ops, where eager runs use
    min(m, T) landmarks: both give the same outputs for bags smaller and larger than m."""
    from slidemil.deployment.graph import torchscript_warnings_silenced

    class WholeBag(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = _transmil(landmarks=32)

        def forward(self, features):
            mask = torch.ones_like(features[..., 0], dtype=torch.bool)
            return self.model(features, mask, return_scores=True)

    outputs = WholeBag().eval()
    with torchscript_warnings_silenced(), torch.no_grad():
        traced = torch.jit.trace(outputs, (torch.randn(1, 16, D),), check_trace=False)
        for n in (1, 5, 300):
            bag = torch.randn(1, n, D)
            for got, expected in zip(traced(bag), outputs(bag), strict=True):
                assert got.shape == expected.shape
                assert torch.allclose(got, expected, atol=1e-5)


def test_transmil_gradients_reach_every_parameter():
    model = build_model("transmil", in_dim=D, n_classes=C, hidden_dim=16, depth=3).train()
    features = torch.randn(2, 30, D)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[0, 11:] = False
    logits, _ = model(features, mask)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_transmil_options_are_checked_and_shape_the_model():
    shallow, deep = _transmil(depth=1), _transmil(depth=3)
    assert len(shallow.layers) == 1 and len(deep.layers) == 3
    with torch.no_grad():
        logits, _ = shallow(torch.randn(1, 7, D), torch.ones(1, 7, dtype=torch.bool))
    assert logits.shape == (1, C)
    with pytest.raises(ConfigError, match="depth=0"):
        _transmil(depth=0)
    with pytest.raises(RegistryError, match="landmarks"):
        build_model("transmil", in_dim=D, n_classes=C, num_landmarks=8)


@pytest.mark.slow
def test_transmil_learns_to_attend_to_the_planted_instance():
    """After training, the class token's attention peaks on the planted instance."""
    logits, attention, labels, planted = _train_on_planted_instances(
        "transmil", steps=60, batch=8, lr=5e-3
    )
    positive = labels == 1
    assert (logits.argmax(dim=1) == labels).float().mean() > 0.9
    assert (attention[positive].argmax(dim=1) == planted[positive]).float().mean() > 0.9
