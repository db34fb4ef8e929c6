"""``cohort privacy``: plan the noise a privacy budget needs, and compute epsilon for given noise.

Site level (default): thin wrappers over :mod:`common.privacy.accounting`. Record level (``--record-level``): the
DP-SGD noise multiplier for one site with ``--rows`` training records, ``--batch`` and ``--local-epochs`` over
``--rounds`` rounds, accounted exactly as the site's own budget accounts its training (:mod:`participant.record_dp`:
Opacus's sampling rate ``1 / ceil(rows / batch)``, Poisson-subsampled Gaussian steps, RDP). Errors are
:class:`~common.errors.ConfigError`.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Callable
from typing import cast

from common.errors import ConfigError
from common.privacy.accounting import Method, Sampling, epsilon_for, plan_noise_multiplier, smallest_noise_multiplier
from participant.record_dp import LocalTraining, epsilon_of, planned_training

Handler = Callable[[argparse.Namespace], int]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``privacy`` command and its sub-commands to a ``cohort`` argument parser."""
    parser = subparsers.add_parser(
        "privacy",
        help="plan differential-privacy noise and compute epsilon",
        description="Site-level DP accounting with dp-accounting: the noise multiplier sigma (noise std over the "
        "L2 clip) a budget needs, or the epsilon a sigma spends. Fixed cohorts are accounted as sampling without "
        "replacement (RDP, replace-one adjacency), never as Poisson.",
    )
    commands = parser.add_subparsers(dest="privacy_command", required=True, metavar="COMMAND")

    plan = commands.add_parser("plan", help="the smallest noise multiplier for a target epsilon")
    plan.add_argument("--epsilon", type=float, required=True, help="target epsilon")
    _add_common(plan)
    plan.set_defaults(func=_cmd_plan)

    eps = commands.add_parser("epsilon", help="epsilon spent by a noise multiplier over some rounds")
    eps.add_argument("--noise-multiplier", type=float, required=True, help="sigma: noise std / L2 clip")
    _add_common(eps)
    eps.set_defaults(func=_cmd_epsilon)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--delta", type=float, required=True, help="target delta")
    p.add_argument("--rounds", type=int, required=True, help="number of rounds T")
    record = p.add_argument_group("record level (DP-SGD at one site)")
    record.add_argument(
        "--record-level", action="store_true", help="plan one site's DP-SGD, as its own budget accounts it"
    )
    record.add_argument("--rows", type=int, help="the site's training records")
    record.add_argument("--batch", type=int, help="the job's batch_size")
    record.add_argument("--local-epochs", type=int, default=1, help="the job's local_epochs (default: 1)")
    p.add_argument("--sampling", choices=["poisson", "full", "fixed"], default="full", help="default: %(default)s")
    p.add_argument("--rate", type=float, default=None, help="sampling rate q (poisson) or m/N (fixed)")
    p.add_argument("--population", type=int, default=None, help="N, the number of sites (fixed cohorts)")
    p.add_argument("--method", choices=["pld", "rdp"], default=None, help="default: pld, or rdp for fixed cohorts")


def _settings(args: argparse.Namespace) -> tuple[Sampling, float, Method, int | None]:
    sampling = cast(Sampling, args.sampling)
    if sampling == "full":
        if args.rate not in (None, 1.0):
            raise ConfigError("--rate is only for --sampling poisson or fixed")
        rate = 1.0
    elif args.rate is None:
        raise ConfigError(f"--sampling {sampling} needs --rate")
    else:
        rate = float(args.rate)
    if sampling == "fixed" and args.population is None:
        raise ConfigError("--sampling fixed needs --population N (the cohort is rate * N sites)")
    method = cast(Method, args.method or ("rdp" if sampling == "fixed" else "pld"))
    return sampling, rate, method, args.population


def _describe(args: argparse.Namespace, sampling: str, rate: float, method: str) -> str:
    adjacency = "replace-one" if sampling == "fixed" else "add/remove"
    return f"(delta={args.delta:g}, T={args.rounds}, sampling={sampling}, q={rate:g}, {method.upper()}, {adjacency})"


def _record_training(args: argparse.Namespace) -> LocalTraining:
    """One round of the site's DP-SGD (steps and sampling rate), from --rows, --batch, --local-epochs."""
    if args.sampling != "full" or args.rate is not None or args.population is not None or args.method is not None:
        raise ConfigError("--record-level: the sampling is DP-SGD's own; leave out --sampling, --rate, --population")
    if args.rows is None or args.batch is None:
        raise ConfigError("--record-level needs --rows N (the site's training records) and --batch B")
    if args.rounds < 1:
        raise ConfigError("--rounds: must be at least 1")
    try:
        return planned_training(args.rows, args.batch, args.local_epochs)
    except ValueError as exc:
        raise ConfigError(f"--rows, --batch, --local-epochs: {exc}") from None


def _record_epsilon(one_round: LocalTraining, sigma: float, args: argparse.Namespace) -> float:
    steps = one_round.steps * args.rounds
    return epsilon_of([LocalTraining(steps, one_round.sample_rate, sigma)], args.delta)


def _describe_record(args: argparse.Namespace, one_round: LocalTraining) -> str:
    return (
        f"(record level, one site: {args.rows} rows, batch {args.batch}, sample rate q={one_round.sample_rate:.6g}, "
        f"{one_round.steps} steps per round x {args.rounds} rounds, delta={args.delta:g}, RDP, Poisson, add/remove)"
    )


def _quiet_accountant() -> None:
    # dp-accounting logs (through absl) every RDP order it drops while searching; the result says what it used.
    logging.getLogger("absl").setLevel(logging.ERROR)


def _cmd_plan(args: argparse.Namespace) -> int:
    _quiet_accountant()
    if args.record_level:
        one_round = _record_training(args)
        sigma = smallest_noise_multiplier(lambda s: _record_epsilon(one_round, s, args), args.epsilon)
        sigma = math.ceil(sigma * 1e4) / 1e4  # what is printed (and put in a config) keeps epsilon within the target
        eps = _record_epsilon(one_round, sigma, args)
        print(f"noise multiplier {sigma:.4f} gives epsilon {eps:.4f} {_describe_record(args, one_round)}")
        return 0
    sampling, rate, method, population = _settings(args)
    sigma = plan_noise_multiplier(args.epsilon, args.delta, args.rounds, sampling, rate, method, population)
    eps = epsilon_for(sigma, args.delta, args.rounds, sampling, rate, method, population)
    print(f"noise multiplier {sigma:.4f} gives epsilon {eps:.4f} {_describe(args, sampling, rate, method)}")
    return 0


def _cmd_epsilon(args: argparse.Namespace) -> int:
    _quiet_accountant()
    if args.record_level:
        one_round = _record_training(args)
        eps = _record_epsilon(one_round, args.noise_multiplier, args)
        print(f"epsilon {eps:.4f} {_describe_record(args, one_round)}")
        return 0
    sampling, rate, method, population = _settings(args)
    eps = epsilon_for(args.noise_multiplier, args.delta, args.rounds, sampling, rate, method, population)
    print(f"epsilon {eps:.4f} {_describe(args, sampling, rate, method)}")
    return 0
