"""Synthetic card transactions for the banks' fraud use case: four banks, different customers, different fraud.

Nothing is downloaded: :func:`generate_bank` draws every transaction from the documented model below, from a seed.
The point is not realism in every detail but the two properties that make federating worth it and hard:

* **Fraud is rare** (0.2-1.5 % of transactions, per bank) and comes in a few *schemes* that every bank sees some of,
  in different proportions. A small bank has a few dozen fraud cases to learn from; the federation has hundreds.
* **Banks differ in their customers** (feature shift, not only label skew): a national retail bank, a digital-only
  neobank with young customers who shop online, a business-card issuer with large travel amounts and many foreign
  transactions, and a regional savings bank with older customers who pay in person. The same value (a 300-unit
  foreign purchase) is ordinary at one bank and suspicious at another.

**One transaction** (the columns of :data:`FEATURES`, all numbers):

* ``amount``: the customer's usual amount for the merchant category times ``amount_vs_usual``; usual amounts are
  log-normal around the bank's median times a category factor (travel 6x, electronics 5x, digital goods 0.4x ...).
* ``amount_vs_usual``: this amount over the customer's usual one (legitimate: log-normal around 1, sigma 0.5).
* ``hour_sin``, ``hour_cos``: the hour of day as a point on the clock face (legitimate: around 14:00, plus the bank's
  share of night-time activity).
* ``mcc_<category>``: the merchant category, one-hot over :data:`MERCHANTS` (each bank has its own mix).
* ``velocity_1h``, ``velocity_24h``: the card's transactions in the hour and the day before (Poisson).
* ``new_device``, ``new_merchant``, ``card_present``, ``foreign``: 0/1 flags (bank-specific legitimate rates).
* ``distance_km``: from the customer's home (log-normal; large when foreign).
* ``account_age_days``, ``customer_age``: the customer (bank-specific populations).

**Fraud schemes** (each fraud transaction follows one, drawn from the bank's mix; every signal is probabilistic, and
legitimate transactions show each signal too, so no single column gives fraud away):

* ``card_testing``: small amounts (0.15x usual), bursts (``velocity_1h`` about 5), digital goods or retail, online,
  new merchants;
* ``account_takeover``: a new device (75 %), 4x usual amounts, electronics and digital goods, often at night;
* ``stolen_card``: in person, cash withdrawals and electronics, 2.5x usual, some way from home;
* ``cnp_foreign``: card not present, foreign (85 %), travel, digital goods and electronics, far from home.

Splits: each bank's records are split into train/val/test, stratified by label
(:func:`common.datasets.stratified_split`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from common.errors import ConfigError
from common.tasks.csv_split import FloatArray, LabelArray

MERCHANTS = (
    "grocery",
    "fuel",
    "restaurant",
    "retail",
    "travel",
    "electronics",
    "digital_goods",
    "cash_withdrawal",
)
# Usual amount of a category relative to the bank's median.
AMOUNT_FACTOR = (1.0, 1.2, 0.8, 1.5, 6.0, 5.0, 0.4, 2.0)
FEATURES: tuple[str, ...] = (
    "amount",
    "amount_vs_usual",
    "hour_sin",
    "hour_cos",
    *(f"mcc_{m}" for m in MERCHANTS),
    "velocity_1h",
    "velocity_24h",
    "new_device",
    "new_merchant",
    "card_present",
    "foreign",
    "distance_km",
    "account_age_days",
    "customer_age",
)
LABEL = "fraud"
SCHEMES = ("card_testing", "account_takeover", "stolen_card", "cnp_foreign")


@dataclass(frozen=True)
class BankProfile:
    """One bank's customers and fraud: what makes its data different from the others'."""

    name: str
    transactions: int
    fraud_rate: float
    customer_age: tuple[float, float]  # mean, standard deviation (years)
    account_years: float  # mean account age (exponential)
    amount_median: float
    merchant_mix: tuple[float, ...]  # legitimate transactions per category, in MERCHANTS order
    card_present: float
    foreign: float
    new_device: float
    night_share: float
    scheme_mix: tuple[float, ...]  # fraud per scheme, in SCHEMES order

    def __post_init__(self) -> None:
        if len(self.merchant_mix) != len(MERCHANTS) or len(self.scheme_mix) != len(SCHEMES):
            raise ConfigError(f"bank {self.name}: one merchant share per category and one scheme share per scheme")
        if not 0 < self.fraud_rate < 0.5 or self.transactions < 100:
            raise ConfigError(f"bank {self.name}: fraud_rate in (0, 0.5) and at least 100 transactions")


BANKS: tuple[BankProfile, ...] = (
    BankProfile(
        name="bank-1",  # a national retail bank: many customers of every age, mostly in-person spending
        transactions=40_000,
        fraud_rate=0.003,
        customer_age=(45, 15),
        account_years=8,
        amount_median=45,
        merchant_mix=(0.28, 0.1, 0.16, 0.2, 0.03, 0.05, 0.08, 0.1),
        card_present=0.7,
        foreign=0.05,
        new_device=0.02,
        night_share=0.05,
        scheme_mix=(0.15, 0.2, 0.35, 0.3),
    ),
    BankProfile(
        name="bank-2",  # a digital-only neobank: young customers, online, new phones are common
        transactions=15_000,
        fraud_rate=0.015,
        customer_age=(28, 7),
        account_years=1.5,
        amount_median=25,
        merchant_mix=(0.15, 0.04, 0.2, 0.17, 0.04, 0.07, 0.3, 0.03),
        card_present=0.25,
        foreign=0.08,
        new_device=0.08,
        night_share=0.15,
        scheme_mix=(0.4, 0.4, 0.0, 0.2),
    ),
    BankProfile(
        name="bank-3",  # a business-card issuer: large amounts, travel, many foreign transactions
        transactions=20_000,
        fraud_rate=0.002,
        customer_age=(44, 10),
        account_years=10,
        amount_median=180,
        merchant_mix=(0.04, 0.12, 0.22, 0.12, 0.3, 0.1, 0.08, 0.02),
        card_present=0.5,
        foreign=0.3,
        new_device=0.03,
        night_share=0.08,
        scheme_mix=(0.0, 0.3, 0.1, 0.6),
    ),
    BankProfile(
        name="bank-4",  # a regional savings bank: older customers, groceries and cash, paid in person
        transactions=10_000,
        fraud_rate=0.008,
        customer_age=(61, 12),
        account_years=20,
        amount_median=35,
        merchant_mix=(0.42, 0.12, 0.1, 0.14, 0.02, 0.03, 0.02, 0.15),
        card_present=0.88,
        foreign=0.02,
        new_device=0.01,
        night_share=0.02,
        scheme_mix=(0.15, 0.25, 0.6, 0.0),
    ),
)


def _one_hot(categories: npt.NDArray[np.int64]) -> FloatArray:
    out = np.zeros((len(categories), len(MERCHANTS)), dtype=np.float32)
    out[np.arange(len(categories)), categories] = 1.0
    return out


def _hours(rng: np.random.Generator, n: int, night_share: float) -> npt.NDArray[np.float64]:
    day = np.mod(rng.normal(14.0, 4.0, n), 24.0)
    night = rng.uniform(0.0, 6.0, n)
    return np.where(rng.random(n) < night_share, night, day)


def _legit(rng: np.random.Generator, bank: BankProfile, n: int) -> dict[str, npt.NDArray[np.float64]]:
    """Columns of ``n`` legitimate transactions (before the customer columns)."""
    mcc = rng.choice(len(MERCHANTS), size=n, p=np.asarray(bank.merchant_mix) / sum(bank.merchant_mix))
    online_only = mcc == MERCHANTS.index("digital_goods")
    in_person_only = mcc == MERCHANTS.index("cash_withdrawal")
    present = np.where(online_only, 0.0, np.where(in_person_only, 1.0, rng.random(n) < bank.card_present))
    foreign = (rng.random(n) < bank.foreign + 0.3 * (mcc == MERCHANTS.index("travel"))).astype(np.float64)
    velocity_1h = rng.poisson(0.3, n).astype(np.float64)
    return {
        "mcc": mcc.astype(np.float64),
        "ratio": rng.lognormal(0.0, 0.5, n),
        "hour": _hours(rng, n, bank.night_share),
        "velocity_1h": velocity_1h,
        "velocity_24h": velocity_1h + rng.poisson(2.5, n),
        "new_device": (rng.random(n) < bank.new_device).astype(np.float64),
        "new_merchant": (rng.random(n) < 0.25).astype(np.float64),
        "card_present": present.astype(np.float64),
        "foreign": foreign,
    }


# Per scheme: merchant mix, log of the amount ratio, P(card present), P(foreign), P(new device), P(new merchant),
# night share, extra transactions in the hour before.
_SCHEME: dict[str, tuple[tuple[float, ...], float, float, float, float, float, float, float]] = {
    "card_testing": ((0, 0, 0, 0.4, 0, 0, 0.6, 0), math.log(0.15), 0.0, 0.1, 0.1, 0.8, 0.2, 4.0),
    "account_takeover": ((0, 0, 0, 0.3, 0, 0.4, 0.3, 0), math.log(4.0), 0.05, 0.1, 0.75, 0.7, 0.5, 1.5),
    "stolen_card": ((0, 0.1, 0, 0.25, 0, 0.3, 0, 0.35), math.log(2.5), 0.9, 0.05, 0.05, 0.6, 0.15, 2.0),
    "cnp_foreign": ((0, 0, 0, 0, 0.4, 0.3, 0.3, 0), math.log(3.0), 0.02, 0.85, 0.2, 0.9, 0.3, 1.0),
}


def _fraud(rng: np.random.Generator, bank: BankProfile, n: int) -> dict[str, npt.NDArray[np.float64]]:
    """Columns of ``n`` fraudulent transactions, each following one scheme of the bank's mix."""
    schemes = rng.choice(len(SCHEMES), size=n, p=np.asarray(bank.scheme_mix) / sum(bank.scheme_mix))
    cols: dict[str, npt.NDArray[np.float64]] = {
        k: np.zeros(n) for k in ("mcc", "ratio", "hour", "velocity_1h", "velocity_24h")
    }
    cols |= {k: np.zeros(n) for k in ("new_device", "new_merchant", "card_present", "foreign")}
    for s, name in enumerate(SCHEMES):
        idx = np.flatnonzero(schemes == s)
        if not len(idx):
            continue
        k = len(idx)
        mix, log_ratio, present, foreign, device, merchant, night, burst = _SCHEME[name]
        cols["mcc"][idx] = rng.choice(len(MERCHANTS), size=k, p=np.asarray(mix) / sum(mix))
        cols["ratio"][idx] = rng.lognormal(log_ratio, 0.6, k)
        cols["hour"][idx] = _hours(rng, k, night)
        cols["velocity_1h"][idx] = rng.poisson(0.3 + burst, k)
        cols["velocity_24h"][idx] = cols["velocity_1h"][idx] + rng.poisson(2.5 + burst, k)
        cols["card_present"][idx] = rng.random(k) < present
        cols["foreign"][idx] = rng.random(k) < foreign
        cols["new_device"][idx] = rng.random(k) < device
        cols["new_merchant"][idx] = rng.random(k) < merchant
    return cols


def generate_bank(bank: BankProfile, seed: int, scale: float = 1.0) -> tuple[FloatArray, LabelArray]:
    """``(features [n, len(FEATURES)] float32, labels int64)`` for one bank, shuffled; deterministic in ``seed``.

    ``scale`` multiplies the number of transactions (tests use small data); the fraud count is the bank's rate
    times that, at least 5.
    """
    if not 0 < scale <= 100:
        raise ConfigError("scale: must be in (0, 100]")
    rng = np.random.default_rng([seed, BANKS.index(bank) if bank in BANKS else 99, 20_240_612])
    n = max(100, int(bank.transactions * scale))
    n_fraud = max(5, round(n * bank.fraud_rate))
    parts = [_legit(rng, bank, n - n_fraud), _fraud(rng, bank, n_fraud)]
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    mcc = cols["mcc"].astype(np.int64)
    factor = np.asarray(AMOUNT_FACTOR)[mcc]
    usual = rng.lognormal(math.log(bank.amount_median), 0.3, n) * factor
    amount = np.round(usual * cols["ratio"], 2)
    distance = np.where(
        cols["foreign"] > 0,
        rng.lognormal(math.log(1500.0), 0.8, n),
        np.where(cols["card_present"] > 0, rng.lognormal(math.log(8.0), 1.0, n), rng.lognormal(math.log(30.0), 1.2, n)),
    )
    age = np.clip(rng.normal(*bank.customer_age, n), 18, 95)
    account = np.minimum(rng.exponential(bank.account_years * 365.0, n), (age - 18) * 365.0) + 1.0
    angle = 2 * math.pi * cols["hour"] / 24.0
    x = np.column_stack(
        [
            amount,
            amount / usual,
            np.sin(angle),
            np.cos(angle),
            _one_hot(mcc),
            cols["velocity_1h"],
            cols["velocity_24h"],
            cols["new_device"],
            cols["new_merchant"],
            cols["card_present"],
            cols["foreign"],
            np.round(distance, 1),
            np.round(account),
            np.round(age),
        ]
    ).astype(np.float32)
    y = np.concatenate([np.zeros(n - n_fraud, dtype=np.int64), np.ones(n_fraud, dtype=np.int64)])
    order = rng.permutation(n)
    return x[order], y[order]


def write_bank_folders(
    out_dir: Path,
    seed: int,
    *,
    scale: float = 1.0,
    banks: tuple[BankProfile, ...] = BANKS,
    val_fraction: float = 0.15,
    test_fraction: float = 0.25,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Generate every bank and write ``out_dir/<bank>/{train,val,test}.csv`` (common.datasets' layout)."""
    from common.datasets import stratified_split, write_site_folders
    from common.tasks.fraud import SCHEMA

    splits = {}
    for i, bank in enumerate(banks):
        x, y = generate_bank(bank, seed, scale)
        parts = stratified_split(y, seed * 1000 + i, val_fraction, test_fraction)
        splits[bank.name] = {split: (x[idx], y[idx]) for split, idx in parts.items()}
    return write_site_folders(out_dir, splits, SCHEMA, dataset="fraud", overwrite=overwrite)
