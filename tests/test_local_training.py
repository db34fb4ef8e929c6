"""The job's local-training options in the shared training loop: the optimizer (SGD with momentum, Adam), FedProx's
proximal term (matching a reference objective on a fixed batch; with DP-SGD as a decoupled step), and a site's
optimizer state kept from one round to the next."""

from __future__ import annotations

import dataclasses
from typing import cast

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from common.proto.cohort.v1 import cohort_pb2 as pb
from common.serde import state_dict_float32
from common.tasks.base import RecordDP, SiteData, TrainSettings, load_task
from participant.site import Site


def fixed_batch(n: int = 16) -> SiteData:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 30, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    data = cast(Dataset[tuple[torch.Tensor, torch.Tensor]], TensorDataset(x, y))
    return SiteData(train=data, val=data, test=data)


def test_fedprox_follows_the_proximal_objective_on_a_fixed_batch() -> None:
    task = load_task("breast_cancer")
    data = fixed_batch()
    x, y = data.train.tensors  # type: ignore[attr-defined]
    start = state_dict_float32(task.build_model(seed=1))
    lr, mu, steps = 0.3, 2.0, 3
    settings = TrainSettings(local_epochs=steps, batch_size=len(y), learning_rate=lr, optimizer="sgd", proximal_mu=mu)
    model = task.build_model(seed=0)
    model.load_state_dict(start)
    task.train(model, data, settings)

    # Reference: gradient descent on CE(w) + mu/2 * ||w - w_start||^2 over the whole batch, written out here.
    ref = task.build_model(seed=0)
    ref.load_state_dict(start)
    anchor = [p.detach().clone() for p in ref.parameters()]
    for _ in range(steps):
        ref.zero_grad()
        objective = F.cross_entropy(ref(x), y)
        objective = objective + mu / 2 * sum(
            ((p - a) ** 2).sum() for p, a in zip(ref.parameters(), anchor, strict=True)
        )
        objective.backward()  # type: ignore[no-untyped-call]
        with torch.no_grad():
            for p in ref.parameters():
                assert p.grad is not None
                p.sub_(lr * p.grad)
    got, want = state_dict_float32(model), state_dict_float32(ref)
    assert max(float((got[k] - want[k]).abs().max()) for k in want) <= 1e-6

    plain = task.build_model(seed=0)
    plain.load_state_dict(start)
    task.train(plain, data, dataclasses.replace(settings, proximal_mu=0.0))

    def drift(m: torch.nn.Module) -> float:
        return sum(float(((v - start[k]) ** 2).sum()) for k, v in state_dict_float32(m).items())

    assert drift(model) < drift(plain)  # the proximal term holds the site nearer the global model


def test_fedprox_with_dp_sgd_is_a_decoupled_pull_toward_the_global_model() -> None:
    task = load_task("breast_cancer")
    data = fixed_batch(64)
    start = state_dict_float32(task.build_model(seed=2))
    dp = RecordDP(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    # lr * mu = 1: every private step is followed by a full pull back, so the model ends where it started.
    settings = TrainSettings(batch_size=16, learning_rate=0.5, optimizer="sgd", proximal_mu=2.0, record_dp=dp)
    model = task.build_model(seed=0)
    model.load_state_dict(start)
    result = task.train(model, data, settings)
    assert result.extra["dp_steps"] > 0
    after = state_dict_float32(model)
    assert max(float((after[k] - start[k]).abs().max()) for k in start) <= 1e-6


def test_a_site_keeps_its_optimizer_state_between_rounds_when_the_job_says_so() -> None:
    task = load_task("breast_cancer")
    data = fixed_batch(32)
    global_model = state_dict_float32(task.build_model(seed=3))
    params = pb.TrainParams(
        local_epochs=1,
        batch_size=8,
        learning_rate=0.1,
        seed=4,
        optimizer="sgd",
        momentum=0.9,
        keep_optimizer_state=True,
    )
    kept = Site(task, data)
    kept.train(global_model, params)
    assert kept.optimizer_state["state"]  # the momentum buffers, one per parameter
    second_kept = kept.train(global_model, params)

    fresh = Site(task, data)
    fresh.train(global_model, dataclasses_replace(params, keep_optimizer_state=False))
    assert fresh.optimizer_state == {}
    second_fresh = fresh.train(global_model, dataclasses_replace(params, keep_optimizer_state=False))
    # The same data, seed and starting model: only the carried momentum makes the second rounds differ.
    assert second_kept.update.sha256 != second_fresh.update.sha256
    first_again = Site(task, data).train(global_model, params)
    assert first_again.update.sha256 == second_fresh.update.sha256


def dataclasses_replace(params: pb.TrainParams, **changes: object) -> pb.TrainParams:
    copy = pb.TrainParams()
    copy.CopyFrom(params)
    for key, value in changes.items():
        setattr(copy, key, value)
    return copy


def test_adam_and_sgd_with_momentum_are_the_optimizers_the_job_names() -> None:
    task = load_task("breast_cancer")
    model = task.build_model(seed=0)
    sgd = task.optimizer_for(model, TrainSettings(optimizer="sgd", momentum=0.8, weight_decay=0.01))  # type: ignore[attr-defined]
    assert isinstance(sgd, torch.optim.SGD)
    assert (sgd.param_groups[0]["momentum"], sgd.param_groups[0]["weight_decay"]) == (0.8, 0.01)
    adam = task.optimizer_for(model, TrainSettings(optimizer="adam", learning_rate=0.02))  # type: ignore[attr-defined]
    assert isinstance(adam, torch.optim.Adam)
    assert adam.param_groups[0]["lr"] == 0.02
    own = task.optimizer_for(model, TrainSettings())  # type: ignore[attr-defined]
    assert isinstance(own, torch.optim.SGD)  # breast_cancer's own choice
    assert own.param_groups[0]["momentum"] == 0
