"""Shared machinery for tasks whose site data are CSV tables: scaling, train and evaluate.

Each site's ``train.csv``, ``val.csv`` and ``test.csv`` are read and checked by
:func:`common.tasks.csv_split.read_split`.

Scaling. When the job ran the federated statistics phase, every train and evaluate task carries one
:class:`~common.tasks.standardize.FeatureScaling` for the whole federation, and :meth:`TabularTask.with_scaling`
applies it to all three splits: clip each feature to the federation's quantile bounds, then standardize with the
federation's mean and std (common/tasks/standardize.py). Without it (no statistics phase, or a task that declares no
``feature_ranges``), the fallback is the affine ``(x - offset) / scale`` of :meth:`TabularTask.fit_scaling`, which
sees only the site's own train split. The built-in tasks' fallbacks are fixed constants that need no statistics:
under label skew, standardizing with each site's own statistics maps the same measurement to different inputs at
different sites and ruins the federated model (see ``common.tasks.breast_cancer``).

Hooks a subclass may override: :meth:`~TabularTask.make_model` (required), :meth:`~TabularTask.make_optimizer`,
:meth:`~TabularTask.loss` (class weights, focal loss), :meth:`~TabularTask.penalty` (FedProx's proximal term, on when
``proximal_mu`` > 0), :meth:`~TabularTask.fit_scaling`; parameters a job may set (``params_schema``, read as
``self.params``); ``report_scores`` for the federated imbalance metrics of binary tasks (common/metrics.py).

Record-level differential privacy (``TrainSettings.record_dp``) trains with DP-SGD from Opacus instead of the plain
loop; see :meth:`TabularTask.train_dp`.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from common.errors import ConfigError, DataError
from common.metrics import score_histogram
from common.tasks.base import SPLITS, DataSchema, EvalResult, RecordDP, SiteData, TrainResult, TrainSettings
from common.tasks.csv_split import FloatArray, LabelArray, read_split
from common.tasks.entropy import entropy_generator
from common.tasks.params import Param, ParamValue, validate
from common.tasks.standardize import DEFAULT_BINS, F64Array, FeatureScaling, StatisticsSpec, site_statistics

Arrays = tuple[FloatArray, LabelArray]


@dataclass
class TabularSiteData(SiteData):
    """A site's splits, scaled, plus the raw arrays they came from (kept at the site, for re-scaling and for the
    federated statistics of the train split)."""

    raw: Mapping[str, Arrays] = field(default_factory=dict)


def dataset_tensors(dataset: Dataset[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """All of ``dataset`` as two tensors ``(x, y)``: free for a TensorDataset, stacked item by item otherwise.

    Cross-silo tabular data fit in memory, and indexing whole tensors is much faster than a DataLoader.
    """
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        x, y = dataset.tensors
        return x, y
    if not isinstance(dataset, Sized):
        raise DataError("the dataset has no length; a task dataset must be a map-style dataset")
    items = [dataset[i] for i in range(len(dataset))]
    if not items:
        return torch.empty(0), torch.empty(0, dtype=torch.int64)
    return torch.stack([x for x, _ in items]), torch.stack([torch.as_tensor(y) for _, y in items])


def check_settings(settings: TrainSettings) -> None:
    """Raise ConfigError for hyper-parameters no training loop can use."""
    if settings.local_epochs < 1:
        raise ConfigError("local_epochs: must be at least 1")
    if settings.batch_size < 1:
        raise ConfigError("batch_size: must be at least 1")
    if not 0 < settings.learning_rate < math.inf:
        raise ConfigError("learning_rate: must be a positive number")
    dp = settings.record_dp
    if dp is not None:
        # noise_multiplier 0 is allowed here (tests of clipping); the site's budget then refuses to train.
        if not 0 <= dp.noise_multiplier < math.inf:
            raise ConfigError("record_dp.noise_multiplier: must be a finite number >= 0")
        if not 0 < dp.max_grad_norm < math.inf:
            raise ConfigError("record_dp.max_grad_norm: must be a positive number")
        if not 0 < dp.delta < 1:
            raise ConfigError("record_dp.delta: must be between 0 and 1 (exclusive)")


class TabularTask:
    """Base of CSV-backed classification tasks: subclasses set ``name`` and ``schema`` and define the model.

    The task code digest covers the subclass's module, the modules of its package it imports, this module and the
    rest of the Cohort training code it uses (common/tasks/digest.py), plus ``version``.
    """

    name: str
    schema: DataSchema
    version: str = "1"
    # Hyper-parameters and round count that the task author measured to work; jobs may override them.
    default_settings: TrainSettings = TrainSettings()
    recommended_rounds: int = 10
    # Parameters a job may set in ``task_params``; the task reads the validated values as ``self.params``.
    params_schema: Mapping[str, Param] = {}
    # Federated feature standardization: a plausible (low, high) range per feature, over which the statistics
    # phase builds its quantile histograms (common/tasks/standardize.py). None: this task does not take part.
    feature_ranges: tuple[tuple[float, float], ...] | None = None
    histogram_bins: int = DEFAULT_BINS
    # FedProx (Li et al. 2020): mu > 0 adds (mu / 2) * ||w - w_global||^2 to every local step (plain training only).
    proximal_mu: float = 0.0
    # Binary tasks: report per-class score histograms, from which the coordinator derives AUC-PR and recall at 1 %
    # false-positive rate over the whole federation (common/metrics.py).
    report_scores: bool = False

    _params: Mapping[str, ParamValue] | None = None

    @property
    def params(self) -> Mapping[str, ParamValue]:
        """This task's parameters: the job's ``task_params`` over the schema's defaults."""
        return self._params if self._params is not None else validate(self.params_schema, {})

    def with_params(self, values: Mapping[str, object]) -> Self:
        """A copy of this task with ``values`` (checked against ``params_schema``); this object is unchanged."""
        configured = copy.copy(self)
        configured._params = validate(self.params_schema, values)
        return configured

    def make_model(self) -> torch.nn.Module:
        """The untrained network; called under a fixed seed by :meth:`build_model`."""
        raise NotImplementedError

    def make_optimizer(self, model: torch.nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
        """A fresh optimizer for each round of local training: Adam, so one learning rate suits all layers."""
        return torch.optim.Adam(model.parameters(), lr=settings.learning_rate)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training loss of one batch, a mean over its records: cross-entropy. Override for class weights or a
        focal loss; keep it a mean over the batch (DP-SGD's per-record gradients assume it). Evaluation always
        reports plain cross-entropy, so losses stay comparable between tasks and jobs."""
        return F.cross_entropy(logits, target)

    def penalty(self, model: torch.nn.Module, start: list[torch.Tensor]) -> torch.Tensor | None:
        """An extra term added to every step's loss; ``start`` is the model's parameters before local training.

        The default is FedProx's proximal term ``(proximal_mu / 2) * ||w - w_start||^2`` when ``proximal_mu`` > 0,
        which keeps a site with skewed data from drifting far from the global model. None: no term.
        """
        if self.proximal_mu <= 0:
            return None
        drift = torch.zeros(())
        for p, p0 in zip(model.parameters(), start, strict=True):
            drift = drift + ((p - p0) ** 2).sum()
        return self.proximal_mu / 2 * drift

    def fit_scaling(self, x_train: FloatArray) -> tuple[FloatArray, FloatArray]:
        """``(offset, scale)``, applied as ``(x - offset) / scale`` to every split of this site when the job sends no
        federated :class:`FeatureScaling` (the fallback).

        It may use this site's train split only. The default is the identity; the built-in tasks override it
        with fixed constants.
        """
        width = x_train.shape[1]
        return np.zeros(width, dtype=np.float32), np.ones(width, dtype=np.float32)

    def build_model(self, seed: int = 0) -> torch.nn.Module:
        """A fresh model whose initial weights depend only on ``seed``; the global RNG is left as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.make_model()
        for key, tensor in model.state_dict().items():
            # The coordinator aggregates every entry as float32: an integer buffer would be corrupted.
            if tensor.dtype != torch.float32:
                raise TypeError(f"task {self.name}: state-dict entry {key} is {tensor.dtype}, not float32")
        return model

    def load_data(self, data_dir: Path) -> SiteData:
        """Read and scale this site's ``train.csv``, ``val.csv`` and ``test.csv`` (val, test may be empty)."""
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise DataError(f"{data_dir}: data folder is missing")
        arrays = {split: read_split(data_dir / f"{split}.csv", self.schema) for split in SPLITS}
        if len(arrays["train"][1]) == 0:
            raise DataError(f"{data_dir / 'train.csv'}: has no records; a site needs training data")
        return self.site_data(arrays["train"], arrays["val"], arrays["test"])

    def site_data(
        self,
        train: tuple[FloatArray, LabelArray],
        val: tuple[FloatArray, LabelArray],
        test: tuple[FloatArray, LabelArray],
    ) -> SiteData:
        """Scale raw arrays with the fallback of :meth:`fallback_scaling` (train statistics only) and wrap them."""
        return self._scaled({"train": train, "val": val, "test": test}, self.fallback_scaling(train[0]))

    def fallback_scaling(self, x_train: FloatArray) -> FeatureScaling:
        """The scaling used when the job sends none: :meth:`fit_scaling`'s ``(x - offset) / scale``, no clipping."""
        offset, scale = self.fit_scaling(x_train)
        return FeatureScaling.of_constants(offset, scale)

    def _scaled(self, raw: Mapping[str, Arrays], scaling: FeatureScaling) -> TabularSiteData:
        if scaling.features != len(self.schema.features):
            raise DataError(
                f"feature scaling has {scaling.features} features; task {self.name} has {len(self.schema.features)}"
            )

        def wrap(split: Arrays) -> Dataset[tuple[torch.Tensor, torch.Tensor]]:
            x = np.ascontiguousarray(scaling.apply(split[0]), dtype=np.float32)
            y = np.ascontiguousarray(split[1], dtype=np.int64)
            return cast(
                Dataset[tuple[torch.Tensor, torch.Tensor]],
                TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
            )

        return TabularSiteData(train=wrap(raw["train"]), val=wrap(raw["val"]), test=wrap(raw["test"]), raw=dict(raw))

    def with_scaling(self, data: SiteData, scaling: FeatureScaling) -> SiteData:
        """``data`` re-scaled from its raw arrays with the federation's ``scaling`` (clip, then standardize)."""
        if not isinstance(data, TabularSiteData) or not data.raw:
            raise DataError(f"task {self.name}: these data were not loaded by a tabular task; cannot re-scale them")
        return self._scaled(data.raw, scaling)

    def statistics_spec(self) -> StatisticsSpec | None:
        """The lanes of this task's statistics vector, or None when it declares no ``feature_ranges``."""
        if self.feature_ranges is None:
            return None
        if len(self.feature_ranges) != len(self.schema.features):
            raise ConfigError(
                f"task {self.name}: feature_ranges has {len(self.feature_ranges)} entries for "
                f"{len(self.schema.features)} features"
            )
        return StatisticsSpec(tuple(self.feature_ranges), self.histogram_bins)

    def site_statistics(self, data: SiteData) -> F64Array:
        """This site's statistics vector, from its raw train split only (common/tasks/standardize.py)."""
        spec = self.statistics_spec()
        if spec is None:
            raise ConfigError(f"task {self.name} declares no feature_ranges; it cannot take part in a statistics phase")
        if not isinstance(data, TabularSiteData) or "train" not in data.raw:
            raise DataError(f"task {self.name}: these data were not loaded by a tabular task")
        return site_statistics(data.raw["train"][0], spec)

    def train(self, model: torch.nn.Module, data: SiteData, settings: TrainSettings) -> TrainResult:
        """Minibatch training in place; loss and accuracy reported are running means over the last epoch.

        Shuffling uses its own ``torch.Generator`` seeded from ``settings.seed``, so the result depends on the
        seed and the data only, whatever else uses the global RNG. With ``settings.record_dp`` set, trains with
        :meth:`train_dp` instead.
        """
        check_settings(settings)
        x, y = dataset_tensors(data.train)
        n = len(y)
        if n == 0:
            raise DataError("the train split has no records")
        if settings.record_dp is not None:
            return self.train_dp(model, x, y, settings, settings.record_dp)
        generator = torch.Generator().manual_seed(settings.seed)
        optimizer = self.make_optimizer(model, settings)
        initial = [p.detach().clone() for p in model.parameters()]  # the global model: FedProx's anchor
        model.train()
        steps = 0
        loss_sum = 0.0
        correct = 0
        for epoch in range(settings.local_epochs):
            last = epoch == settings.local_epochs - 1
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, settings.batch_size):
                idx = order[start : start + settings.batch_size]
                optimizer.zero_grad(set_to_none=True)
                logits = model(x[idx])
                loss = self.loss(logits, y[idx])
                extra = self.penalty(model, initial)
                (loss if extra is None else loss + extra).backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                steps += 1
                if last:
                    loss_sum += float(loss.detach()) * len(idx)
                    correct += int((logits.detach().argmax(dim=1) == y[idx]).sum())
        return TrainResult(num_samples=n, loss=loss_sum / n, accuracy=correct / n, extra={"steps": float(steps)})

    def train_dp(
        self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, settings: TrainSettings, dp: RecordDP
    ) -> TrainResult:
        """DP-SGD (Abadi et al. 2016) with Opacus: ``local_epochs`` passes of Poisson-sampled, per-record clipped,
        Gaussian-noised steps, the result written into ``model`` in place.

        Opacus sets the sampling rate to ``q = 1 / ceil(n / batch_size)`` (about ``batch_size / n``) and takes
        ``ceil(n / batch_size)`` steps per epoch; each step includes every record independently with probability
        ``q``. ``extra`` reports ``dp_steps``, ``dp_sample_rate`` (that exact ``q``) and ``dp_noise_multiplier``:
        what the site's accountant composes (``participant.record_dp``). Epsilon is not computed here.

        Randomness: the noise and the sampling each come from an :func:`entropy_generator`, whose whole state is
        drawn from OS entropy, so neither is reproducible from ``settings.seed`` nor known to the coordinator. That
        generator is still a non-cryptographic PRNG (Mersenne Twister), and the Gaussian is sampled in floating
        point (open to Mironov's 2012 floating-point attack in principle): known limitations. Opacus's
        ``secure_mode`` would use a CSPRNG but needs ``torchcsprng``, which is not installable for the torch
        version here.

        Loss and accuracy are means over the records sampled in the last epoch (0.0 when none was).
        """
        # Imported here: Opacus takes over a second to import, and only DP training needs it.
        from opacus import PrivacyEngine
        from opacus.validators import ModuleValidator

        if self.penalty(model, [p.detach() for p in model.parameters()]) is not None:
            # Opacus clips per-record gradients it computes itself; a parameter penalty would bypass it.
            raise ConfigError(f"task {self.name}: a penalty term (FedProx proximal_mu) cannot be used with DP-SGD")
        problems = ModuleValidator.validate(model, strict=False)
        if problems:
            raise ConfigError(f"record_dp: task {self.name}'s model cannot be trained with DP-SGD: {problems[0]}")
        # Train a copy: Opacus leaves hooks and per-sample attributes on the module it wraps (and prefixes its
        # state-dict keys with "_module."); the caller's model stays a plain module and gets the trained weights.
        trained = copy.deepcopy(model)
        trained.train()
        optimizer = self.make_optimizer(trained, settings)
        sampling = entropy_generator()
        noise = entropy_generator()
        loader = DataLoader(TensorDataset(x, y), batch_size=settings.batch_size, generator=sampling)
        steps = 0
        seen = 0
        loss_sum = 0.0
        correct = 0
        with warnings.catch_warnings():
            # Expected and harmless here: secure_mode is off (see above), and Opacus's per-layer backward hooks
            # fire although the inputs need no gradient. Only these two messages are silenced.
            warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            engine = PrivacyEngine(accountant="rdp", secure_mode=False)
            module, dp_optimizer, dp_loader = engine.make_private(
                module=trained,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=dp.noise_multiplier,
                max_grad_norm=dp.max_grad_norm,
                poisson_sampling=True,
                noise_generator=noise,
            )
            try:
                for epoch in range(settings.local_epochs):
                    last = epoch == settings.local_epochs - 1
                    for xb, yb in dp_loader:
                        dp_optimizer.zero_grad(set_to_none=True)
                        logits = module(xb)
                        # An empty Poisson batch gives a NaN mean loss but zero per-sample gradients: the step still
                        # adds noise and still counts, as the accountant assumes.
                        loss = self.loss(logits, yb)
                        loss.backward()  # type: ignore[no-untyped-call]
                        dp_optimizer.step()
                        steps += 1
                        if last and len(yb):
                            seen += len(yb)
                            loss_sum += float(loss.detach()) * len(yb)
                            correct += int((logits.detach().argmax(dim=1) == yb).sum())
            finally:
                module.remove_hooks()
        model.load_state_dict(trained.state_dict(), strict=True)
        return TrainResult(
            num_samples=len(y),
            loss=loss_sum / seen if seen else 0.0,
            accuracy=correct / seen if seen else 0.0,
            extra={
                "steps": float(steps),
                "dp_steps": float(steps),
                "dp_sample_rate": float(dp_loader.sample_rate),
                "dp_noise_multiplier": float(dp.noise_multiplier),
            },
        )

    def evaluate(
        self,
        model: torch.nn.Module,
        dataset: Dataset[tuple[torch.Tensor, torch.Tensor]],
        batch_size: int = 256,
    ) -> EvalResult:
        """Mean cross-entropy and accuracy on ``dataset``; an empty one gives ``EvalResult(0, 0.0, 0.0)``.

        With ``report_scores`` (binary tasks), also the per-class histogram of the scores ``logit_1 - logit_0``.
        """
        if batch_size < 1:
            raise ConfigError("batch_size: must be at least 1")
        x, y = dataset_tensors(dataset)
        n = len(y)
        if n == 0:
            return EvalResult(num_samples=0, loss=0.0, accuracy=0.0)
        was_training = model.training
        model.eval()
        loss_sum = 0.0
        correct = 0
        margins: list[torch.Tensor] = []
        scores = self.report_scores and self.schema.num_classes == 2
        try:
            with torch.no_grad():
                for start in range(0, n, batch_size):
                    logits = model(x[start : start + batch_size])
                    target = y[start : start + batch_size]
                    loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
                    correct += int((logits.argmax(dim=1) == target).sum())
                    if scores:
                        margins.append((logits[:, 1] - logits[:, 0]).double())
        finally:
            model.train(was_training)
        histogram = score_histogram(torch.cat(margins).numpy(), y.numpy()) if scores else None
        return EvalResult(num_samples=n, loss=loss_sum / n, accuracy=correct / n, scores=histogram)
