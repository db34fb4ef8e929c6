"""Record-level DP: DP-SGD in the tabular tasks (Opacus) and the site's own RDP budget (dp-accounting)."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp import rdp_privacy_accountant
from opacus.accountants import RDPAccountant

from common import config as loader
from common.datasets import load_source
from common.errors import ConfigError
from common.tasks import breast_cancer, digits
from common.tasks.base import RecordDP, SiteData, TrainSettings
from common.tasks.entropy import entropy_generator
from common.tasks.tabular import check_settings
from participant.config import ParticipantConfig, RecordPrivacyConfig
from participant.record_dp import LocalTraining, SiteBudget, epsilon_of, planned_training

DELTA = 1e-5


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cancer() -> SiteData:
    x, y, _ = load_source("breast_cancer")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    train, test = order[:455], order[455:]
    return breast_cancer.TASK.site_data((x[train], y[train]), (x[test], y[test]), (x[test], y[test]))


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().flatten() for t in model.state_dict().values()])


# --- DP-SGD in the task ------------------------------------------------------------------------------------------


def test_dp_sgd_trains_breast_cancer_and_keeps_a_plain_model(cancer: SiteData) -> None:
    task = breast_cancer.TASK
    model = task.build_model(seed=0)
    keys = list(model.state_dict())
    before = task.evaluate(model, cancer.train)
    settings = replace(
        task.default_settings, local_epochs=3, record_dp=RecordDP(noise_multiplier=1.0, max_grad_norm=1.0, delta=DELTA)
    )
    result = task.train(model, cancer, settings)
    after = task.evaluate(model, cancer.train)
    assert after.loss < 0.5 * before.loss  # the caller's model holds the trained weights
    assert task.evaluate(model, cancer.test).accuracy > 0.8
    state = model.state_dict()
    assert list(state) == keys  # no "_module." prefix
    assert all(t.dtype == torch.float32 for t in state.values())
    # Opacus's hooks and per-sample attributes stayed on its private copy.
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())
    assert result.num_samples == 455
    assert 0 < result.loss < before.loss
    assert 0 <= result.accuracy <= 1


def test_train_result_reports_what_the_accountant_needs(cancer: SiteData) -> None:
    task = breast_cancer.TASK
    dp = RecordDP(noise_multiplier=1.3, max_grad_norm=0.5, delta=DELTA)
    settings = TrainSettings(local_epochs=2, batch_size=16, learning_rate=0.5, record_dp=dp)
    result = task.train(task.build_model(), cancer, settings)
    plan = planned_training(455, 16, 2)
    assert plan.steps == 2 * 29
    assert result.extra["dp_steps"] == plan.steps
    assert result.extra["dp_sample_rate"] == plan.sample_rate == 1 / 29  # 1 / ceil(455 / 16), about 16 / 455
    assert result.extra["dp_noise_multiplier"] == 1.3
    assert result.extra["steps"] == plan.steps


def test_dp_training_is_not_reproducible_from_the_seed(cancer: SiteData) -> None:
    # The noise comes from OS entropy, not from settings.seed (which the coordinator chose and knows).
    task = breast_cancer.TASK
    settings = TrainSettings(batch_size=64, record_dp=RecordDP(noise_multiplier=1.0, max_grad_norm=1.0, delta=DELTA))
    a, b = task.build_model(), task.build_model()
    task.train(a, cancer, settings)
    task.train(b, cancer, settings)
    assert not torch.equal(_flat(a), _flat(b))


def test_per_sample_clipping_bounds_each_step(cancer: SiteData) -> None:
    # batch_size = n: sample rate 1, so one full-batch step; without noise the step is lr * mean of the clipped
    # per-record gradients, whose norm is at most lr * C. Unclipped, the same step is far larger.
    task = breast_cancer.TASK
    lr, clip = 100.0, 1e-3
    start = task.build_model(seed=3)
    dp_model, plain_model = task.build_model(seed=3), task.build_model(seed=3)
    dp = RecordDP(noise_multiplier=0.0, max_grad_norm=clip, delta=DELTA)
    settings = TrainSettings(local_epochs=1, batch_size=455, learning_rate=lr)
    result = task.train(dp_model, cancer, replace(settings, record_dp=dp))
    task.train(plain_model, cancer, settings)
    assert result.extra["dp_steps"] == 1
    assert result.extra["dp_sample_rate"] == 1.0
    dp_step = float((_flat(dp_model) - _flat(start)).norm())
    plain_step = float((_flat(plain_model) - _flat(start)).norm())
    assert 0 < dp_step <= lr * clip * (1 + 1e-5)
    assert plain_step > 100 * lr * clip


def test_dp_sgd_works_for_the_convolutional_digits_task() -> None:
    x, y, _ = load_source("digits")
    task = digits.TASK
    data = task.site_data((x[:300], y[:300]), (x[300:400], y[300:400]), (x[300:400], y[300:400]))
    model = task.build_model()
    keys = list(model.state_dict())
    before = task.evaluate(model, data.train).loss
    dp = RecordDP(noise_multiplier=0.8, max_grad_norm=1.0, delta=DELTA)
    result = task.train(model, data, replace(task.default_settings, local_epochs=3, learning_rate=0.02, record_dp=dp))
    assert list(model.state_dict()) == keys
    assert task.evaluate(model, data.train).loss < 0.9 * before
    assert result.extra["dp_steps"] == planned_training(300, 32, 3).steps


@pytest.mark.parametrize(
    ("dp", "named"),
    [
        (RecordDP(noise_multiplier=-1.0, max_grad_norm=1.0, delta=DELTA), "record_dp.noise_multiplier"),
        (RecordDP(noise_multiplier=math.inf, max_grad_norm=1.0, delta=DELTA), "record_dp.noise_multiplier"),
        (RecordDP(noise_multiplier=1.0, max_grad_norm=0.0, delta=DELTA), "record_dp.max_grad_norm"),
        (RecordDP(noise_multiplier=1.0, max_grad_norm=1.0, delta=1.0), "record_dp.delta"),
    ],
)
def test_bad_record_dp_settings_are_refused(dp: RecordDP, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        check_settings(TrainSettings(record_dp=dp))


def test_noise_generators_take_their_whole_state_from_os_entropy() -> None:
    # Why not manual_seed(secrets.randbits(64)): torch keeps only the low 32 bits of a seed.
    same = torch.Generator().manual_seed(12345), torch.Generator().manual_seed(12345 + (1 << 32))
    assert torch.equal(torch.randn(4, generator=same[0]), torch.randn(4, generator=same[1]))
    a, b = entropy_generator(), entropy_generator()
    assert not torch.equal(torch.randn(8, generator=a), torch.randn(8, generator=b))
    words = a.get_state().numpy()[24 : 24 + 8 * 624].view("<u8")
    assert len(set(words.tolist())) > 600  # 624 random words, not an init_genrand expansion of one seed


# --- the site's budget -------------------------------------------------------------------------------------------


def _library_epsilon(steps: int, q: float, sigma: float, delta: float = DELTA) -> float:
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), count=steps)
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize(
    ("steps", "q", "sigma", "expected"),
    [
        (1000, 0.01, 1.0, 2.101),  # the RDP oracle
        (1, 1.0, 1.0, None),
        (29, 1 / 29, 1.1, None),
        (580, 1 / 29, 1.0, None),
        (100, 0.1, 0.8, None),
        (400, 0.25, 2.0, None),
    ],
)
def test_epsilon_matches_an_independent_rdp_computation(
    steps: int, q: float, sigma: float, expected: float | None
) -> None:
    ours = epsilon_of([LocalTraining(steps, q, sigma)], DELTA)
    assert ours == pytest.approx(_library_epsilon(steps, q, sigma), rel=1e-12)
    if expected is not None:
        assert ours == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize(("steps", "q", "sigma"), [(1000, 0.01, 1.0), (29, 1 / 29, 1.1), (145, 1 / 29, 1.0)])
def test_epsilon_agrees_with_opacus_rdp_accountant(steps: int, q: float, sigma: float) -> None:
    # Same orders and same RDP-to-DP conversion; the two libraries evaluate the fractional-order series differently
    # (dp-accounting stops after 1000 terms), so they agree to a relative 1e-4, not to 1e-6, ours never the lower.
    opacus = RDPAccountant()
    opacus.history = [(sigma, q, steps)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order", category=UserWarning)
        theirs = opacus.get_epsilon(DELTA, alphas=list(rdp_privacy_accountant.DEFAULT_RDP_ORDERS))
    ours = epsilon_of([LocalTraining(steps, q, sigma)], DELTA)
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert ours >= theirs * (1 - 1e-12)


def test_budget_composes_rounds_as_one_run_of_steps() -> None:
    budget = SiteBudget(target_epsilon=100.0, delta=DELTA)
    assert budget.epsilon() == 0.0
    for _ in range(3):
        budget.record(29, 1 / 29, 1.0)
    assert budget.steps == 87
    assert budget.epsilon() == pytest.approx(_library_epsilon(87, 1 / 29, 1.0), rel=1e-12)
    # Rounds of different settings compose too.
    budget.record(10, 0.05, 2.0)
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(1 / 29, dp_accounting.GaussianDpEvent(1.0)), count=87)
    accountant.compose(dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(2.0)), count=10)
    assert budget.epsilon() == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-12)


def test_would_exceed_flips_at_the_round_that_would_pass_the_target() -> None:
    per_round = (29, 1 / 29, 1.0)
    eps = [_library_epsilon(29 * k, 1 / 29, 1.0) for k in (4, 5)]
    budget = SiteBudget(target_epsilon=(eps[0] + eps[1]) / 2, delta=DELTA)  # allows exactly 4 rounds
    rounds = 0
    while not budget.would_exceed(*per_round):
        budget.record(*per_round)
        rounds += 1
        assert rounds < 10
    assert rounds == 4
    assert budget.epsilon() == pytest.approx(eps[0], rel=1e-12)
    assert budget.epsilon() <= budget.target_epsilon < budget.epsilon_after(*per_round)
    # A smaller round still fits; no noise never does.
    assert not budget.would_exceed(1, 1 / 29, 1.0)
    assert budget.would_exceed(1, 1 / 29, 0.0)


def test_budget_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "privacy.json"
    budget = SiteBudget(target_epsilon=8.0, delta=DELTA, state_path=path)
    assert budget.epsilon() == 0.0
    assert not path.exists()
    budget.record(29, 1 / 29, 1.0)
    budget.record(58, 1 / 29, 1.2)
    restarted = SiteBudget(target_epsilon=8.0, delta=DELTA, state_path=path)
    assert restarted.events == budget.events
    assert restarted.epsilon() == budget.epsilon() > 0
    assert json.loads(path.read_text())["version"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["privacy.json"]  # no temp file left behind


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        '{"version": 2, "events": []}',
        '{"version": 1, "events": [{"steps": 1, "sample_rate": 2.0, "noise_multiplier": 1.0}]}',
        '{"version": 1, "events": [{"steps": 1.5, "sample_rate": 0.1, "noise_multiplier": 1.0}]}',
        '{"version": 1, "events": [{"steps": 1, "sample_rate": "0.1", "noise_multiplier": 1.0}]}',
    ],
)
def test_a_damaged_ledger_is_an_error_not_a_fresh_budget(tmp_path: Path, text: str) -> None:
    path = tmp_path / "privacy.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"privacy\.state_file"):
        SiteBudget(target_epsilon=8.0, delta=DELTA, state_path=path)


def test_budget_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="target_epsilon"):
        SiteBudget(target_epsilon=0.0, delta=DELTA)
    with pytest.raises(ValueError, match="delta"):
        SiteBudget(target_epsilon=1.0, delta=0.0)
    budget = SiteBudget(target_epsilon=1.0, delta=DELTA)
    with pytest.raises(ValueError, match="sample_rate"):
        budget.would_exceed(10, 0.0, 1.0)
    with pytest.raises(ValueError, match="steps"):
        budget.record(-1, 0.1, 1.0)


# --- configuration -----------------------------------------------------------------------------------------------

BASE = "task: breast_cancer\ndata_dir: d\ntls: {ca: a, cert: b, key: c}\n"


def test_privacy_section_defaults_and_loads(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(BASE)
    assert loader.load(ParticipantConfig, path).privacy == RecordPrivacyConfig()
    assert not RecordPrivacyConfig().enabled
    path.write_text(BASE + "privacy: {enabled: true, noise_multiplier: 1.1, target_epsilon: 3, state_file: s.json}\n")
    privacy = loader.load(ParticipantConfig, path).privacy
    assert privacy.enabled
    assert privacy.noise_multiplier == 1.1
    assert privacy.target_epsilon == 3.0
    assert privacy.state_file == Path("s.json")


@pytest.mark.parametrize(
    ("section", "named"),
    [
        ("{noise_multiplier: 0}", "privacy.noise_multiplier"),
        ("{max_grad_norm: -1}", "privacy.max_grad_norm"),
        ("{target_epsilon: .inf}", "privacy.target_epsilon"),
        ("{delta: 1.5}", "privacy.delta"),
        ("{enabled: yes please}", "privacy.enabled"),
        ("{epsilon: 3}", "privacy.epsilon: unknown key"),
    ],
)
def test_privacy_errors_name_the_key(tmp_path: Path, section: str, named: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(BASE + f"privacy: {section}\n")
    with pytest.raises(ConfigError, match=named):
        loader.load(ParticipantConfig, path)
