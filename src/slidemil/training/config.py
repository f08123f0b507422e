"""``TrainConfig``: every option of ``slidemil train`` (the ``train`` section of a YAML config)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from slidemil.config import Device, StageConfig

Monitor = Literal["balanced_accuracy", "macro_auc", "macro_f1", "accuracy", "loss"]
Schedule = Literal["cosine", "warmup-cosine", "plateau", "none"]
Sampler = Literal["shuffle", "balanced"]
Views = Literal["none", "random"]

# Options that may change between a killed run and its resumption without changing the result
# (device and amp only change it by floating-point rounding).
RUNTIME_OPTIONS = frozenset(
    {"fold", "quiet", "workers", "cache", "cache_limit_gb", "epoch_budget", "device", "amp"}
)
# Model options that are fields of their own (and flags of slidemil train).
SHARED_MODEL_OPTIONS = ("hidden_dim", "attention_dim", "dropout")
# Options where 0 means "off" as well as null, so a command-line flag can switch them off.
ZERO_MEANS_NONE = ("max_patches", "patience", "grad_clip")


class TrainConfig(StageConfig):
    """Options of ``slidemil train`` (the ``train:`` section of a config file)."""

    # what to train
    model: str = Field("abmil-gated", description="MIL model name (see slidemil.list_models())")
    encoder: str | None = Field(
        None,
        description="feature folder under WORK/features/ (optional when there is only one)",
    )
    hidden_dim: int = Field(256, ge=1, description="hidden size of the model (projection + head)")
    attention_dim: int = Field(128, ge=1, description="attention size (attention models)")
    dropout: float = Field(0.25, ge=0.0, lt=1.0, description="dropout in projection and head")
    model_options: dict[str, Any] = Field(
        default_factory=dict,
        description="the model's own options (its builder's keyword arguments, e.g. CLAM's k), "
        "each coerced to the type of its default; unknown keys are refused",
    )
    # splits
    folds: int = Field(1, ge=1, description="1: one train/val/test split; K>1: K-fold CV")
    fold: int | None = Field(None, ge=0, description="train only this fold (0-based; SLURM arrays)")
    split_fractions: tuple[float, float, float] = Field(
        (0.7, 0.15, 0.15), description="train, val, test fractions of patients when folds=1"
    )
    val_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="with folds>1: share of each fold's training patients "
        "held out for validation",
    )  # fmt: skip
    site_holdout: bool = Field(
        False,
        description="site-preserved splits: each fold's test part is one or more whole sites "
        "(the cohort's site column), never seen in that fold's training or validation",
    )
    # optimisation
    epochs: int = Field(50, ge=1, description="maximum number of epochs")
    batch_size: int = Field(
        1, ge=1, description="bags per step and process (effective: × processes under torchrun)"
    )
    max_patches: int | None = Field(
        512, ge=1, description="instances sampled per bag in training (all in val/test); "
        "0 or null: all",
    )  # fmt: skip
    lr: float = Field(2e-4, gt=0.0, description="AdamW learning rate")
    weight_decay: float = Field(1e-4, ge=0.0, description="AdamW weight decay")
    schedule: Schedule = Field(
        "cosine", description="learning-rate schedule: cosine, warmup-cosine, plateau or none"
    )
    warmup_epochs: int = Field(2, ge=0, description="linear warmup epochs for warmup-cosine")
    grad_clip: float | None = Field(
        1.0, gt=0.0, description="clip the gradient norm to this; 0 or null: no clipping"
    )
    class_weights: bool | None = Field(
        None,
        description="weight each bag's loss by total / (n_classes × count) of its class in the "
        "training split; null: on with --sampler shuffle, off with --sampler balanced",
    )
    sampler: Sampler = Field(
        "shuffle",
        description="training bag order per epoch: shuffle (each bag once) or balanced (bags drawn "
        "with replacement, each class equally often)",
    )
    standardize: bool = Field(
        True, description="standardise features with mean/std of the training split"
    )
    # training-time augmentation (training part only; validation and test see plain features)
    views: Views = Field(
        "none",
        description="random: each training instance, each epoch, gets its plain features or one "
        "of the K augmented views stored at extraction (slidemil extract --views K); none: plain",
    )
    instance_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="drop each instance of a training bag with this "
        "probability after max_patches sampling (at least one is kept); 0: off",
    )  # fmt: skip
    feature_noise: float = Field(
        0.0, ge=0.0, description="add Gaussian noise of this many training stds to every "
        "standardised training feature; 0: off",
    )  # fmt: skip
    monitor: Monitor = Field(
        "balanced_accuracy",
        description="validation metric that picks the best epoch and drives early stopping: "
        "balanced_accuracy, macro_auc, macro_f1, accuracy or loss",
    )
    patience: int | None = Field(
        20,
        ge=1,
        description="stop after this many epochs without improvement (from min_epochs on); "
        "0 or null: never",
    )
    min_epochs: int = Field(
        30,
        ge=0,
        description="no early stop before this epoch, and the best epoch is chosen from this "
        "epoch on (earlier ones only when the run ends before it)",
    )
    smoothing: int = Field(
        5,
        ge=1,
        description="epochs averaged (trailing mean) into the monitored value that picks the best "
        "epoch; 1: the raw value",
    )
    seed: int = Field(0, ge=0, description="random seed (splits, initial weights, sampling)")
    # runtime
    device: Device = Field(
        "auto", description="auto, cpu, cuda or cuda:N (under torchrun: cuda = cuda:LOCAL_RANK)"
    )
    amp: bool = Field(True, description="float16 mixed precision on CUDA (ignored on CPU)")
    cache: bool | None = Field(
        None, description="hold bags in RAM; null: when they fit in cache_limit_gb"
    )
    cache_limit_gb: float = Field(8.0, ge=0.0, description="RAM for cached bags, GiB per process")
    workers: int = Field(0, ge=0, description="DataLoader worker processes reading uncached bags")
    epoch_budget: int | None = Field(
        None, ge=1, description="stop after this many epochs in this invocation (resume later)"
    )
    quiet: bool = Field(False, description="no per-epoch progress")

    @field_validator(*ZERO_MEANS_NONE, mode="before")
    @classmethod
    def _zero_is_off(cls, value: Any) -> Any:
        is_zero = isinstance(value, int | float) and not isinstance(value, bool) and value == 0
        return None if is_zero else value

    @model_validator(mode="before")
    @classmethod
    def _shared_model_options_are_fields(cls, data: Any) -> Any:
        # hidden_dim, attention_dim and dropout are fields: one given in model_options moves to
        # its field (and must agree with the field when both are given), so config.yaml names
        # each option once and reads back the same.
        if isinstance(data, dict) and "model_options" in data and data["model_options"] is None:
            data = {**data, "model_options": {}}  # an empty "model_options:" in YAML
        if not isinstance(data, dict) or not isinstance(data.get("model_options"), dict):
            return data
        options = dict(data["model_options"])
        data = {**data, "model_options": options}
        for key in SHARED_MODEL_OPTIONS:
            if key not in options:
                continue
            value = options.pop(key)
            given = data.get(key)
            if given is not None and not _same_value(given, value):
                raise ValueError(
                    f"{key} is given twice with different values: {key}={given!r} and "
                    f"model_options.{key}={value!r}"
                )
            data[key] = value
        return data

    @field_validator("split_fractions")
    @classmethod
    def _fractions(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(v < 0 for v in value) or abs(sum(value) - 1.0) > 1e-6:
            raise ValueError("train, val and test fractions must be >= 0 and sum to 1")
        if value[0] <= 0 or value[1] <= 0:
            raise ValueError("the train and val fractions must be positive")
        return value

    @model_validator(mode="before")
    @classmethod
    def _class_weights_follow_the_sampler(cls, data: Any) -> Any:
        # Resolved here, so config.yaml records what the run did.
        if isinstance(data, dict) and data.get("class_weights") is None:
            data = {**data, "class_weights": data.get("sampler", "shuffle") != "balanced"}
        return data

    @model_validator(mode="after")
    def _one_imbalance_correction(self) -> TrainConfig:
        if self.class_weights and self.sampler == "balanced":
            raise ValueError(
                "class_weights and sampler=balanced both correct for class imbalance, and together "
                "they over-correct it (the rare classes weigh count-ratio² times more): choose "
                "one, --no-class-weights or --sampler shuffle"
            )
        return self

    @model_validator(mode="after")
    def _noise_in_training_stds(self) -> TrainConfig:
        if self.feature_noise > 0 and not self.standardize:
            raise ValueError(
                "feature_noise is in units of the training std, which needs standardize: "
                "use --standardize or --feature-noise 0"
            )
        return self

    @model_validator(mode="after")
    def _fold_in_range(self) -> TrainConfig:
        if self.fold is not None and self.fold >= self.folds:
            raise ValueError(f"fold {self.fold} does not exist with folds={self.folds}")
        return self

    def model_kwargs(self, model_defaults: dict) -> dict:
        """The keyword arguments the chosen model is built with: those of hidden_dim,
        attention_dim and dropout it accepts, then ``model_options`` (already coerced by
        :meth:`slidemil.models.ModelEntry.resolve_options`)."""
        shared = {key: getattr(self, key) for key in SHARED_MODEL_OPTIONS}
        return {
            **{k: v for k, v in shared.items() if k in model_defaults},
            **self.model_options,
        }

    def result_options(self) -> dict[str, Any]:
        """The options that change the trained models (compared when a run is resumed)."""
        return self.model_dump(mode="json", exclude=set(RUNTIME_OPTIONS))


def _same_value(a: Any, b: Any) -> bool:
    """``a == b``, numbers compared as numbers (``"32"`` from a command line equals 32)."""
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False
