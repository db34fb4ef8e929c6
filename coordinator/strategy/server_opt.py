"""Server optimizers: how a round's aggregated update moves the global model.

All work on the flat update ``delta`` (the concatenation of the model's tensors in spec order, float64), after
unmasking and after any DP noise: an optimizer is post-processing of a released aggregate, so it changes no privacy
guarantee. With ``Delta`` the round's aggregated update and ``eta`` the server learning rate:

- fedavg:     ``x += eta * Delta``
- fedavgm:    ``m = beta * m + Delta; x += eta * m`` (Hsu et al. 2019, server momentum)
- fedadagrad: ``m = b1 m + (1 - b1) Delta; v = v + Delta^2``
- fedyogi:    ``m`` as above; ``v = v - (1 - b2) Delta^2 sign(v - Delta^2)``
- fedadam:    ``m`` as above; ``v = b2 v + (1 - b2) Delta^2``
- adaptive:   ``x += eta * m / (sqrt(v) + tau)``, with ``m`` starting at 0 and ``v`` at ``tau^2`` and no bias
  correction (Reddi et al. 2021, Algorithm 2).

The moments are the optimizer's state: kept as float32 arrays of the model's size, written with each committed round
(``state_dir/strategy/<digest>.safetensors``, named in the round's record) so a resumed job continues with exactly
the moments of the round it resumes from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from coordinator.strategy.config import StrategyConfig


@dataclass
class OptimizerState:
    """The server optimizer's moments (flat float32; absent until the first step) and its step count."""

    step: int = 0
    moments: dict[str, np.ndarray] = field(default_factory=dict)


def server_step(cfg: StrategyConfig, delta: np.ndarray, state: OptimizerState) -> tuple[np.ndarray, OptimizerState]:
    """The change to apply to the global model for aggregated update ``delta``, and the optimizer's next state.

    ``state`` is not modified: the caller keeps the old one until the round is committed.
    """
    eta = cfg.learning_rate
    delta = np.asarray(delta, dtype=np.float64)
    name = cfg.name
    if name == "fedavg":
        return (delta if eta == 1.0 else eta * delta), OptimizerState(state.step + 1)
    if name == "fedavgm":
        m = _moment(state, "m", delta, 0.0)
        m = cfg.server_momentum * m + delta
        return eta * m, OptimizerState(state.step + 1, {"m": m.astype(np.float32)})
    m = _moment(state, "m", delta, 0.0)
    v = _moment(state, "v", delta, cfg.tau**2)
    m = cfg.beta1 * m + (1 - cfg.beta1) * delta
    square = delta * delta
    if name == "fedadagrad":
        v = v + square
    elif name == "fedyogi":
        v = v - (1 - cfg.beta2) * square * np.sign(v - square)
    elif name == "fedadam":
        v = cfg.beta2 * v + (1 - cfg.beta2) * square
    else:  # pragma: no cover - the config's Literal keeps other names out
        raise ValueError(f"unknown server optimizer {name!r}")
    step = eta * m / (np.sqrt(v) + cfg.tau)
    return step, OptimizerState(state.step + 1, {"m": m.astype(np.float32), "v": v.astype(np.float32)})


def _moment(state: OptimizerState, key: str, delta: np.ndarray, initial: float) -> np.ndarray:
    found = state.moments.get(key)
    if found is None:
        return np.full(delta.shape, initial, dtype=np.float64)
    if found.shape != delta.shape:
        raise ValueError(f"server optimizer moment {key!r} has {found.size} values, the model {delta.size}")
    return found.astype(np.float64)
