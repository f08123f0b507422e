"""CLAM: clustering-constrained attention MIL (Lu et al., "Data-efficient and weakly supervised
computational pathology on whole-slide images", Nat Biomed Eng 2021).

Each instance is projected (Linear D -> H, ReLU, dropout) and scored by gated attention; the
attention network's tanh and sigmoid layers are shared, its last layer has one output per branch.

- ``clam-sb``: one attention branch pools the bag into one vector, Linear(H, C) gives the logits.
- ``clam-mb``: one attention branch per class; class c's logit is Linear(H, 1) of the vector that
  branch c pools, so each class looks at its own instances.

Instance-level clustering (training only, when ``labels`` are given): per class an instance
classifier Linear(H, 2). For a bag of class y, the ``k_sample`` instances of y's branch with the
highest attention are targets 1 of y's instance classifier and the ``k_sample`` lowest targets 0.
With ``subtyping`` (the classes are mutually exclusive subtypes, so one class's evidence is
negative evidence for the others) the top-k instances of every other class c's branch are also
targets 0 of c's classifier. The per-bag loss is the mean over the selected instances per
classifier, summed over classifiers (divided by C under subtyping), and averaged over bags.
Selection is a hard top-k, as in the paper: the loss shapes the instance representations (the
projection) and the instance classifiers, and reaches the attention only through what it reads.

``k`` is capped per bag: at most half the bag's valid instances are taken for each side of the
true class (so no instance is both a positive and a negative; a 1-instance bag has no pair), at
most all of them for the other classes; padding is never selected. A bag with nothing to select
adds nothing, and the loss is averaged over the bags that have a term.

The paper trains with ``0.7 × bag loss + 0.3 × instance loss``; slidemil's loop adds the
auxiliary loss to the bag loss, so ``instance_loss_weight = 0.3 / 0.7`` gives the same objective
up to the overall factor 1 / 0.7 (which AdamW's step size does not feel).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slidemil.errors import ConfigError
from slidemil.models.abmil import input_projection
from slidemil.models.attention import GatedAttention, masked_softmax
from slidemil.models.registry import register_model

PAPER_INSTANCE_LOSS_WEIGHT = (
    0.3 / 0.7
)  # the paper's 0.7 bag + 0.3 instance, as a weight on the latter
INSTANCE_LOSSES = ("svm", "ce")


def smooth_top1_svm_loss(
    logits: Tensor, targets: Tensor, tau: float = 1.0, margin: float = 1.0
) -> Tensor:
    """Smooth multi-class SVM loss (Berrada et al., ICLR 2018, top-1 with temperature ``tau``),
    per element: ``tau * logsumexp((s_j + margin * [j != y] - s_y) / tau)`` over classes j.

    ``logits`` (..., K), ``targets`` (...) int64 -> (...). It tends to the hinge loss
    ``max_j(s_j + margin * [j != y]) - s_y`` as ``tau`` -> 0; CLAM uses tau = 1, margin = 1.
    """
    true = logits.gather(-1, targets.unsqueeze(-1))
    off_target = 1.0 - nn.functional.one_hot(targets, logits.shape[-1]).to(logits.dtype)
    return tau * torch.logsumexp((logits + margin * off_target - true) / tau, dim=-1)


def _cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-element cross-entropy of ``logits`` (..., K) against ``targets`` (...)."""
    flat = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    return flat.view(targets.shape)


class BranchedGatedAttention(GatedAttention):
    """Gated attention with ``n_branches`` scores per instance: the tanh and sigmoid layers are
    shared, the last layer has one output per branch. (B, N, in_dim) -> (B, N, n_branches)."""

    def __init__(self, in_dim: int, attention_dim: int, n_branches: int, dropout: float = 0.0):
        super().__init__(in_dim, attention_dim, dropout)
        self.weight = nn.Linear(attention_dim, n_branches)

    def forward(self, instances: Tensor) -> Tensor:
        gated = self.dropout(self.content(instances) * self.gate(instances))
        return self.weight(gated)


def ranked_instances(scores: Tensor, mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Indices (B, k) of each bag's ``k`` highest and ``k`` lowest ``scores`` (B, N) among its
    valid instances (``mask`` (B, N) bool), highest (resp. lowest) first.

    Valid instances always come before padding, so the first ``n_valid`` slots of a bag are real;
    slots past that point at padding and must be ignored by the caller. ``k`` must be <= N.
    """
    top = scores.masked_fill(~mask, float("-inf")).topk(k, dim=1).indices
    bottom = (-scores).masked_fill(~mask, float("-inf")).topk(k, dim=1).indices
    return top, bottom


def _gather_instances(instances: Tensor, indices: Tensor) -> Tensor:
    """``instances`` (B, N, H) at ``indices`` (B, k): (B, k, H)."""
    return instances.gather(1, indices.unsqueeze(-1).expand(-1, -1, instances.shape[-1]))


def _masked_mean(values: Tensor, valid: Tensor, count: Tensor) -> Tensor:
    """Sum of ``values`` (B, k) where ``valid`` over ``count`` (B,) (0 where count is 0)."""
    total = torch.where(valid, values, torch.zeros_like(values)).sum(dim=1)
    return total / count.clamp_min(1).to(values.dtype)


class CLAMSB(nn.Module):
    """CLAM single-branch: gated attention, one branch, Linear(H, C) bag classifier, and the
    instance-level clustering loss when ``labels`` are given (see the module docstring).

    ``forward(features (B, N, D), mask (B, N) bool, return_scores=False, labels=None)`` returns
    ``(logits (B, C), attention (B, N))``; with ``return_scores`` the raw attention logits
    (B, N) (``-inf`` on padding) come third; with ``labels`` (B,) int64 the weighted instance loss
    (a scalar) comes last.
    """

    uses_labels = True

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden_dim: int = 256,
        attention_dim: int = 128,
        dropout: float = 0.25,
        k_sample: int = 8,
        instance_loss_weight: float = PAPER_INSTANCE_LOSS_WEIGHT,
        subtyping: bool = False,
        instance_loss: str = "svm",
    ):
        super().__init__()
        self.n_classes = n_classes
        self.k_sample = k_sample
        self.instance_loss_weight = instance_loss_weight
        self.subtyping = subtyping
        self.instance_loss_name = instance_loss
        self.project = input_projection(in_dim, hidden_dim, dropout)
        self.attention = BranchedGatedAttention(
            hidden_dim, attention_dim, self._n_branches(n_classes), dropout
        )
        self.classifier = self._bag_classifier(hidden_dim, n_classes)
        self.instance_classifiers = nn.ModuleList(
            nn.Linear(hidden_dim, 2) for _ in range(n_classes)
        )

    @staticmethod
    def _n_branches(n_classes: int) -> int:
        return 1

    @staticmethod
    def _bag_classifier(hidden_dim: int, n_classes: int) -> nn.Module:
        return nn.Linear(hidden_dim, n_classes)

    def _classify(self, pooled: Tensor) -> Tensor:
        """Bag vectors (B, branches, H) -> logits (B, C)."""
        return self.classifier(pooled[:, 0])

    def _class_agnostic(self, logits: Tensor, branch_values: Tensor) -> Tensor:
        """Per-branch values (B, branches, N) -> the class-agnostic map (B, N)."""
        return branch_values[:, 0]

    def _branch_scores(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Projected instances (B, N, H) and raw attention logits per branch (B, branches, N)."""
        instances = self.project(features)
        return instances, self.attention(instances).transpose(1, 2)

    def forward(
        self,
        features: Tensor,
        mask: Tensor,
        return_scores: bool = False,
        labels: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        """``features`` (B, N, D), ``mask`` (B, N) bool -> logits (B, C), attention (B, N)
        [, scores (B, N), ``-inf`` on padding] [, weighted instance loss () when ``labels``]."""
        instances, branch_scores = self._branch_scores(features)  # (B, N, H), (B, K, N)
        weights = masked_softmax(branch_scores, mask.unsqueeze(1))  # (B, K, N)
        pooled = torch.einsum("bkn,bnh->bkh", weights, instances)  # (B, K, H)
        logits = self._classify(pooled)
        outputs: tuple[Tensor, ...] = (logits, self._class_agnostic(logits, weights))
        if return_scores:
            scores = self._class_agnostic(logits, branch_scores)
            outputs += (scores.masked_fill(~mask, float("-inf")),)
        if labels is not None:
            loss = self.instance_clustering_loss(instances, branch_scores, mask, labels)
            outputs += (self.instance_loss_weight * loss,)
        return outputs

    def instance_clustering_loss(
        self, instances: Tensor, branch_scores: Tensor, mask: Tensor, labels: Tensor
    ) -> Tensor:
        """The unweighted instance loss (a scalar), averaged over bags: ``instances`` (B, N, H),
        ``branch_scores`` (B, branches, N) raw attention logits, ``mask`` (B, N) bool, ``labels``
        (B,) int64 class indices."""
        n_instances = mask.shape[1]
        k = min(self.k_sample, n_instances)
        n_valid = mask.sum(dim=1)
        pairs = torch.clamp(n_valid // 2, max=self.k_sample)  # per side, for the true class
        negatives = torch.clamp(n_valid, max=self.k_sample)  # for the other classes
        slots = torch.arange(k, device=mask.device).unsqueeze(0)
        pair_slots, negative_slots = slots < pairs.unsqueeze(1), slots < negatives.unsqueeze(1)
        per_element = smooth_top1_svm_loss if self.instance_loss_name == "svm" else _cross_entropy
        rankings = [ranked_instances(s, mask, k) for s in branch_scores.unbind(dim=1)]

        per_bag = torch.zeros(mask.shape[0], device=mask.device, dtype=torch.float32)
        has_term = torch.zeros_like(mask[:, 0])
        for c, classifier in enumerate(self.instance_classifiers):
            top, bottom = rankings[min(c, len(rankings) - 1)]
            top_logits = classifier(_gather_instances(instances, top)).float()  # (B, k, 2)
            bottom_logits = classifier(_gather_instances(instances, bottom)).float()
            ones = torch.ones_like(top)
            zeros = torch.zeros_like(top)
            own = _masked_mean(
                torch.cat([per_element(top_logits, ones), per_element(bottom_logits, zeros)], 1),
                torch.cat([pair_slots, pair_slots], 1),
                2 * pairs,
            )
            is_own = labels == c
            if self.subtyping:
                other = _masked_mean(per_element(top_logits, zeros), negative_slots, negatives)
                per_bag = per_bag + torch.where(is_own, own, other)
                has_term = has_term | torch.where(is_own, pairs > 0, negatives > 0)
            else:
                per_bag = per_bag + torch.where(is_own, own, torch.zeros_like(own))
                has_term = has_term | (is_own & (pairs > 0))
        if self.subtyping:
            per_bag = per_bag / self.n_classes
        return (per_bag * has_term).sum() / has_term.sum().clamp_min(1)


class CLAMMB(CLAMSB):
    """CLAM multi-branch: one attention branch and one Linear(H, 1) bag classifier per class.

    The class-agnostic ``attention`` (and ``scores``) is the branch of each bag's predicted
    class (highest logit): the instances that made the prediction, which is also what CLAM's own
    heat maps show. :meth:`class_scores` gives every branch.
    """

    @staticmethod
    def _n_branches(n_classes: int) -> int:
        return n_classes

    @staticmethod
    def _bag_classifier(hidden_dim: int, n_classes: int) -> nn.Module:
        return nn.ModuleList(nn.Linear(hidden_dim, 1) for _ in range(n_classes))

    def _classify(self, pooled: Tensor) -> Tensor:
        return torch.cat([head(pooled[:, c]) for c, head in enumerate(self.classifier)], dim=1)

    def _class_agnostic(self, logits: Tensor, branch_values: Tensor) -> Tensor:
        predicted = logits.argmax(dim=1)  # (B,)
        index = predicted.view(-1, 1, 1).expand(-1, 1, branch_values.shape[-1])
        return branch_values.gather(1, index).squeeze(1)

    def class_scores(self, features: Tensor, mask: Tensor) -> Tensor:
        """Each class branch's raw attention logits (B, C, N), ``-inf`` on padding."""
        _, branch_scores = self._branch_scores(features)
        return branch_scores.masked_fill(~mask.unsqueeze(1), float("-inf"))


def _clam_options(
    name: str, n_classes: int, k_sample: int, weight: float, subtyping: bool | str | None, loss: str
) -> dict:
    """Validated instance-loss options; ``subtyping`` None (or "auto") means "more than 2
    classes"."""
    if k_sample < 1:
        raise ConfigError(None, f"{name}: k_sample must be >= 1, not {k_sample}")
    if weight < 0:
        raise ConfigError(None, f"{name}: instance_loss_weight must be >= 0, not {weight}")
    if loss not in INSTANCE_LOSSES:
        raise ConfigError(
            None, f"{name}: instance_loss must be one of {', '.join(INSTANCE_LOSSES)}, not {loss!r}"
        )
    choices = {"auto": n_classes > 2, "true": True, "yes": True, "false": False, "no": False}
    choice = "auto" if subtyping is None else str(subtyping).strip().lower()
    if choice not in choices:
        raise ConfigError(None, f"{name}: subtyping must be true, false or auto, not {subtyping!r}")
    return {
        "k_sample": k_sample,
        "instance_loss_weight": weight,
        "subtyping": choices[choice],
        "instance_loss": loss,
    }


@register_model("clam-sb", "CLAM single-branch: gated attention + instance clustering (Lu 2021)")
def clam_sb(
    in_dim: int,
    n_classes: int,
    hidden_dim: int = 256,
    attention_dim: int = 128,
    dropout: float = 0.25,
    k_sample: int = 8,
    instance_loss_weight: float = PAPER_INSTANCE_LOSS_WEIGHT,
    subtyping: bool | None = None,
    instance_loss: str = "svm",
) -> CLAMSB:
    """CLAM-SB for D = ``in_dim`` features; ``k_sample`` instances per end of the attention
    ranking, ``instance_loss_weight`` on the instance loss (0.3 / 0.7: the paper's weighting),
    ``subtyping`` None = "more than 2 classes", ``instance_loss`` "svm" or "ce"."""
    options = _clam_options(
        "clam-sb", n_classes, k_sample, instance_loss_weight, subtyping, instance_loss
    )
    return CLAMSB(in_dim, n_classes, hidden_dim, attention_dim, dropout, **options)


@register_model("clam-mb", "CLAM multi-branch: per-class gated attention + clustering (Lu 2021)")
def clam_mb(
    in_dim: int,
    n_classes: int,
    hidden_dim: int = 256,
    attention_dim: int = 128,
    dropout: float = 0.25,
    k_sample: int = 8,
    instance_loss_weight: float = PAPER_INSTANCE_LOSS_WEIGHT,
    subtyping: bool | None = None,
    instance_loss: str = "svm",
) -> CLAMMB:
    """CLAM-MB for D = ``in_dim`` features; ``k_sample`` instances per end of the attention
    ranking, ``instance_loss_weight`` on the instance loss (0.3 / 0.7: the paper's weighting),
    ``subtyping`` None = "more than 2 classes", ``instance_loss`` "svm" or "ce"."""
    options = _clam_options(
        "clam-mb", n_classes, k_sample, instance_loss_weight, subtyping, instance_loss
    )
    return CLAMMB(in_dim, n_classes, hidden_dim, attention_dim, dropout, **options)
