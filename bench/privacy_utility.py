"""Privacy against utility: federated test accuracy against epsilon for both privacy units, beside the non-private
accuracy. Not a test: the table and plot go into the docs (issue 4).

Everything runs in this process, without a network, on the project's own pieces: ``common.datasets`` splits the
scikit-learn data into site folders (written to a temporary directory and read back with the task's loader), the
built-in tasks train and evaluate, and ``common.privacy`` / ``participant.record_dp`` clip, noise and account.
Accuracy is the final global model's test accuracy pooled over every site's test split (``pooled_evaluation``).

**Site-level DP** (one site's whole data set in or out; DP-FedAvg with central Gaussian noise, McMahan et al. 2018):
task ``digits`` over 50 IID sites (site-level DP needs many sites: the noise on the mean shrinks as 1/sites), its
``DEFAULT_SETTINGS``, 15 rounds with every site in every round. Each round every site trains from the global model;
its update (local - global, flattened in state-dict order) is clipped to L2 norm C with ``clip_l2``; the clipped
updates are summed, ``add_gaussian_noise`` adds N(0, (sigma C)^2) per coordinate, and the global model moves by the
sum over the number of sites. Epsilon: ``epsilon_for(sigma, delta, rounds, sampling="full")`` (PLD, add/remove).
The non-private baseline is ``simulate_fedavg`` on the same sites for the same rounds (no clipping, no noise).

**Record-level DP** (one record of one site in or out; DP-SGD at every site with Opacus): task ``breast_cancer``
over 5 sites with Dirichlet label skew alpha 0.5 and split seed 42 (as in ``cohort demo``), its ``DEFAULT_SETTINGS``
and ``RECOMMENDED_ROUNDS``, ``TrainSettings.record_dp`` with max_grad_norm 1.0; the coordinator takes the
sample-weighted mean of the site models, as in plain FedAvg. A site's epsilon is the RDP composition of all its
noisy steps (``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`` per step, ``participant.record_dp.epsilon_of``),
using the steps and sampling rate each round of training reports; the table gives the largest site's epsilon, which
is the federation's record-level guarantee.

Data splits and initial models are seeded; the DP noise (and DP-SGD's sampling) comes from OS entropy as in the
library, so private accuracies vary from run to run (``--repeats`` averages several runs).

    .venv/bin/python bench/privacy_utility.py [--out bench/results] [--repeats 2]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from common.datasets import load_source, pooled_evaluation, simulate_fedavg, split_sites, write_site_folders
from common.privacy.accounting import epsilon_for
from common.privacy.central import add_gaussian_noise
from common.privacy.clipping import clip_l2
from common.tasks import breast_cancer, digits
from common.tasks.base import RecordDP, SiteData, Task, TrainSettings, load_task, round_seed
from participant.record_dp import LocalTraining, epsilon_of

DELTA = 1e-5

# Site level: digits, many IID sites. C = 0.5 is about a fifth of a site's typical update norm in the first round
# (2.4 to 2.6 with these settings); a larger C keeps more signal but the noise, sigma * C, grows with it.
SITE_TASK = "digits"
SITE_COUNT = 50
SITE_SPLIT_SEED = 0
SITE_ROUNDS = 15
SITE_CLIP = 0.5
SITE_SIGMAS = (1.0, 2.0, 4.0, 8.0)

# Record level: breast_cancer over the demo's 5 non-IID hospitals.
RECORD_TASK = "breast_cancer"
RECORD_SITES = tuple(f"hospital-{i}" for i in range(1, 6))
RECORD_ALPHA = 0.5
RECORD_SPLIT_SEED = 42
RECORD_MAX_GRAD_NORM = 1.0
RECORD_SIGMAS = (0.6, 1.0, 1.5, 3.0)

Vector = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Row:
    """One line of the table: a private run (or the mean of several) and the non-private accuracy beside it."""

    unit: str
    task: str
    sites: int
    rounds: int
    sigma: float
    epsilon: float
    accuracy: float
    nonprivate_accuracy: float


def load_sites(task_name: str, names: Sequence[str], alpha: float | None, seed: int, root: Path) -> dict[str, SiteData]:
    """Split the source data over ``names``, write each site's folder under ``root`` and load it as the site would."""
    x, y, schema = load_source(task_name)
    splits = split_sites(x, y, names, alpha=alpha, seed=seed)
    folders = write_site_folders(root / task_name, splits, schema, dataset=task_name)
    task = load_task(task_name)
    return {site: task.load_data(folder) for site, folder in folders.items()}


def flatten(model: torch.nn.Module) -> Vector:
    """Every state-dict entry, in state-dict order, as one float64 vector."""
    return np.concatenate([v.detach().double().flatten().numpy() for v in model.state_dict().values()])


def unflatten(model: torch.nn.Module, vector: Vector) -> None:
    """Load ``vector`` (in :func:`flatten`'s layout) into ``model`` as float32 entries."""
    state: dict[str, torch.Tensor] = {}
    offset = 0
    for key, value in model.state_dict().items():
        n = value.numel()
        chunk = vector[offset : offset + n].astype(np.float32).reshape(tuple(value.shape))
        state[key] = torch.from_numpy(chunk)
        offset += n
    if offset != len(vector):
        raise ValueError(f"vector has {len(vector)} entries; the model has {offset}")
    model.load_state_dict(state, strict=True)


def test_accuracy(task: Task, model: torch.nn.Module, sites: Mapping[str, SiteData]) -> float:
    return pooled_evaluation(task, model, [d.test for d in sites.values()]).accuracy


def dp_fedavg(
    task: Task, sites: Mapping[str, SiteData], settings: TrainSettings, rounds: int, sigma: float, clip: float
) -> float:
    """Site-level DP-FedAvg (full participation, central Gaussian noise); the final model's pooled test accuracy."""
    model = task.build_model(settings.seed)
    global_vec = flatten(model)
    for number in range(1, rounds + 1):
        round_settings = replace(settings, seed=round_seed(settings.seed, number))
        clipped_sum = np.zeros_like(global_vec)
        for data in sites.values():
            unflatten(model, global_vec)
            task.train(model, data, round_settings)
            clipped, _ = clip_l2(flatten(model) - global_vec, clip)
            clipped_sum += clipped
        noised = add_gaussian_noise(clipped_sum, sigma, clip)
        global_vec = global_vec + noised / len(sites)
    unflatten(model, global_vec)
    return test_accuracy(task, model, sites)


def dp_sgd_fedavg(
    task: Task, sites: Mapping[str, SiteData], settings: TrainSettings, rounds: int
) -> tuple[float, dict[str, float]]:
    """FedAvg with DP-SGD at every site (``settings.record_dp``): the final model's pooled test accuracy and each
    site's record-level epsilon over all rounds."""
    dp = settings.record_dp
    if dp is None:
        raise ValueError("dp_sgd_fedavg needs settings.record_dp")
    model = task.build_model(settings.seed)
    global_state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    spent: dict[str, list[LocalTraining]] = {site: [] for site in sites}
    for number in range(1, rounds + 1):
        round_settings = replace(settings, seed=round_seed(settings.seed, number))
        summed = {k: torch.zeros_like(v) for k, v in global_state.items()}
        total = 0
        for site, data in sites.items():
            model.load_state_dict(global_state)
            result = task.train(model, data, round_settings)
            spent[site].append(
                LocalTraining(
                    steps=int(result.extra["dp_steps"]),
                    sample_rate=result.extra["dp_sample_rate"],
                    noise_multiplier=result.extra["dp_noise_multiplier"],
                )
            )
            for k, v in model.state_dict().items():
                summed[k] += v.float() * result.num_samples
            total += result.num_samples
        global_state = {k: v / total for k, v in summed.items()}
    model.load_state_dict(global_state)
    return test_accuracy(task, model, sites), {site: epsilon_of(events, dp.delta) for site, events in spent.items()}


def site_level_rows(root: Path, sigmas: Sequence[float], repeats: int) -> list[Row]:
    task = load_task(SITE_TASK)
    names = [f"site-{i:02d}" for i in range(1, SITE_COUNT + 1)]
    sites = load_sites(SITE_TASK, names, None, SITE_SPLIT_SEED, root)
    settings = digits.DEFAULT_SETTINGS
    baseline = simulate_fedavg(task, sites, settings, SITE_ROUNDS)[-1].accuracy
    rows = []
    for sigma in sigmas:
        accuracy = statistics.fmean(
            dp_fedavg(task, sites, settings, SITE_ROUNDS, sigma, SITE_CLIP) for _ in range(repeats)
        )
        epsilon = epsilon_for(sigma, DELTA, SITE_ROUNDS, sampling="full")
        rows.append(Row("site", SITE_TASK, len(sites), SITE_ROUNDS, sigma, epsilon, accuracy, baseline))
        print(f"  site   sigma {sigma:<5g} epsilon {epsilon:8.2f} accuracy {accuracy:.3f}", flush=True)
    return rows


def record_level_rows(root: Path, sigmas: Sequence[float], repeats: int) -> list[Row]:
    task = load_task(RECORD_TASK)
    sites = load_sites(RECORD_TASK, RECORD_SITES, RECORD_ALPHA, RECORD_SPLIT_SEED, root)
    settings = breast_cancer.DEFAULT_SETTINGS
    rounds = breast_cancer.RECOMMENDED_ROUNDS
    baseline = simulate_fedavg(task, sites, settings, rounds)[-1].accuracy
    rows = []
    for sigma in sigmas:
        dp_settings = replace(settings, record_dp=RecordDP(sigma, RECORD_MAX_GRAD_NORM, DELTA))
        accuracies: list[float] = []
        epsilons: list[float] = []
        for _ in range(repeats):
            accuracy, site_epsilon = dp_sgd_fedavg(task, sites, dp_settings, rounds)
            accuracies.append(accuracy)
            epsilons.append(max(site_epsilon.values()))
        # Steps and sampling rates are the same in every run, so so is epsilon; max() guards against surprises.
        row = Row(
            "record", RECORD_TASK, len(sites), rounds, sigma, max(epsilons), statistics.fmean(accuracies), baseline
        )
        rows.append(row)
        print(f"  record sigma {sigma:<5g} epsilon {row.epsilon:8.2f} accuracy {row.accuracy:.3f}", flush=True)
    return rows


def markdown_table(rows: Sequence[Row], repeats: int) -> str:
    lines = [
        f"| unit | task | sites | rounds | sigma | epsilon (delta = {DELTA:g}) | accuracy | non-private accuracy |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.unit} | {r.task} | {r.sites} | {r.rounds} | {r.sigma:g} | {r.epsilon:.2f} | "
            f"{r.accuracy:.3f} | {r.nonprivate_accuracy:.3f} |"
        )
    runs = f"mean of {repeats} runs" if repeats > 1 else "one run"
    notes = [
        "",
        f"Site level: DP-FedAvg, full participation, update clip C = {SITE_CLIP}, central Gaussian noise "
        f"sigma * C on the sum; epsilon by PLD over {SITE_ROUNDS} rounds. Record level: DP-SGD (Opacus) at every "
        f"site, max_grad_norm {RECORD_MAX_GRAD_NORM}, Dirichlet alpha = {RECORD_ALPHA} split (seed "
        f"{RECORD_SPLIT_SEED}); epsilon is the largest site's, by RDP over all its steps. Accuracy: final global "
        f"model, pooled over all sites' test splits; private accuracy is the {runs} (DP noise comes from OS entropy "
        "and varies by run).",
    ]
    return "\n".join(lines + notes) + "\n"


def plot(rows: Sequence[Row], path: Path) -> bool:
    """Accuracy against epsilon (log scale), one line per unit, dashed non-private lines; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for unit, color in (("site", "tab:blue"), ("record", "tab:orange")):
        unit_rows = sorted((r for r in rows if r.unit == unit), key=lambda r: r.epsilon)
        if not unit_rows:
            continue
        first = unit_rows[0]
        ax.plot(
            [r.epsilon for r in unit_rows],
            [r.accuracy for r in unit_rows],
            marker="o",
            color=color,
            label=f"{unit} level: {first.task}, {first.sites} sites",
        )
        for r in unit_rows:
            ax.annotate(
                rf"$\sigma$={r.sigma:g}",
                (r.epsilon, r.accuracy),
                textcoords="offset points",
                xytext=(4, -12),
                fontsize=8,
            )
        ax.axhline(first.nonprivate_accuracy, color=color, linestyle="--", label=f"{unit} level, non-private")
    ax.set_xscale("log")
    # Plain numbers on the epsilon axis (1, 2, 5, 10, ...), no crowded minor labels.
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(rf"$\varepsilon$ at $\delta$ = {DELTA:g}")
    ax.set_ylabel("federated test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("Privacy against utility")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--repeats", type=int, default=2, help="private runs averaged per noise multiplier")
    parser.add_argument("--site-sigmas", type=float, nargs="+", default=list(SITE_SIGMAS))
    parser.add_argument("--record-sigmas", type=float, nargs="+", default=list(RECORD_SIGMAS))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the models are tiny)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    torch.set_num_threads(args.threads)
    # dp-accounting (through absl) warns for every RDP order whose series fails to converge (small orders at q = 0.5,
    # a site with at most two batches) and leaves that order out; epsilon, a minimum over the other orders, is still
    # a valid bound. Hundreds of those lines would bury the table.
    logging.getLogger("absl").setLevel(logging.ERROR)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = site_level_rows(Path(tmp), args.site_sigmas, args.repeats)
        rows += record_level_rows(Path(tmp), args.record_sigmas, args.repeats)
    table = markdown_table(rows, args.repeats)
    print()
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    table_path = args.out / "privacy_utility.md"
    table_path.write_text(table, encoding="utf-8")
    print(f"wrote {table_path}")
    plot_path = args.out / "privacy_utility.png"
    if plot(rows, plot_path):
        print(f"wrote {plot_path}")
    else:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
