"""The built-in tasks: interface, models, CSV loading and its error messages, training, and FedAvg quality."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from common.datasets import centralized_baseline, load_source, simulate_fedavg, split_sites
from common.errors import ConfigError, DataError
from common.tasks import breast_cancer, digits, tabular
from common.tasks import digest as task_code
from common.tasks.base import SPLITS, EvalResult, RecordDP, SiteData, Task, TrainSettings, load_task, task_digest
from common.tasks.csv_split import read_split
from common.tasks.tabular import TabularTask, dataset_tensors

NAMES = ["breast_cancer", "digits"]
SECRET = "987654.321"  # a cell value that must never appear in an error message
COLUMNS = list(breast_cancer.SCHEMA.columns())

Arrays = tuple[np.ndarray, np.ndarray]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tabular(name: str) -> TabularTask:
    task = load_task(name)
    assert isinstance(task, TabularTask)
    return task


def _write(folder: Path, name: str, header: list[str], rows: list[list[str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")
    return path


def _site(folder: Path, task: Task, rows: int = 20, seed: int = 0) -> Path:
    """A site folder with random values: ``rows`` training records, 4 in val and 4 in test."""
    rng = np.random.default_rng(seed)
    columns = list(task.schema.columns())
    for split, n in zip(SPLITS, (rows, 4, 4), strict=True):
        data = [
            [f"{v:.6g}" for v in rng.uniform(0, 10, len(columns) - 1)] + [str(i % task.schema.num_classes)]
            for i in range(n)
        ]
        _write(folder, f"{split}.csv", columns, data)
    return folder


@pytest.mark.parametrize("name", NAMES)
def test_builtin_tasks_implement_the_interface(name: str) -> None:
    task = _tabular(name)
    assert isinstance(task, Task)
    assert task.name == name
    assert task_digest(task).startswith("sha256:")
    assert task.recommended_rounds >= 1
    assert task.default_settings.learning_rate > 0
    assert task.schema.columns()[-1] == task.schema.label
    assert len(set(task.schema.columns())) == len(task.schema.columns())


def test_digest_covers_the_shared_base_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A change to the shared training loop must change the code digest that sites declare (in its Cohort part)."""
    before = task_code.compute(breast_cancer.TASK)
    assert "common.tasks.tabular" in before.training_modules
    assert before.task_modules == ("common.tasks.breast_cancer",)
    assert task_digest(breast_cancer.TASK) == before.combined != task_digest(digits.TASK)
    edited = tmp_path / "tabular.py"
    edited.write_text(Path(tabular.__file__).read_text() + "\nSTEP_LIMIT = 1\n")
    original = task_code._source_path
    monkeypatch.setattr(
        task_code, "_source_path", lambda name: edited if name == "common.tasks.tabular" else original(name)
    )
    after = task_code.compute(breast_cancer.TASK)
    assert after.training_code != before.training_code
    assert after.task_code == before.task_code
    assert after.combined != before.combined


def test_module_defaults_match_the_task_objects() -> None:
    assert breast_cancer.TASK.default_settings == breast_cancer.DEFAULT_SETTINGS
    assert breast_cancer.TASK.recommended_rounds == breast_cancer.RECOMMENDED_ROUNDS
    assert digits.TASK.default_settings == digits.DEFAULT_SETTINGS
    assert digits.TASK.recommended_rounds == digits.RECOMMENDED_ROUNDS


@pytest.mark.parametrize("name", NAMES)
def test_models_are_float32_and_seeded(name: str) -> None:
    task = load_task(name)
    before = torch.random.get_rng_state()
    a, b, c = task.build_model(1), task.build_model(1), task.build_model(2)
    assert torch.equal(torch.random.get_rng_state(), before), "build_model must not move the global RNG"
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(t.dtype == torch.float32 for t in sa.values())
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a(torch.zeros(3, len(task.schema.features))).shape == (3, task.schema.num_classes)


def test_integer_buffers_are_refused() -> None:
    class WithBatchNorm(TabularTask):
        name = "bn"

        def make_model(self) -> torch.nn.Module:
            return torch.nn.BatchNorm1d(3)

    with pytest.raises(TypeError, match="num_batches_tracked"):
        WithBatchNorm().build_model()


@pytest.mark.parametrize("name", NAMES)
def test_train_is_deterministic_and_reduces_loss(name: str) -> None:
    task = _tabular(name)
    x, y, _ = load_source(name)
    data = task.site_data((x[:300], y[:300]), (x[:0], y[:0]), (x[300:400], y[300:400]))
    settings = replace(task.default_settings, local_epochs=2, seed=3)
    model = task.build_model(0)
    start = task.evaluate(model, data.train)
    result = task.train(model, data, settings)
    again = task.build_model(0)
    task.train(again, data, settings)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    after = task.evaluate(model, data.train)
    assert result.num_samples == 300
    assert result.extra["steps"] == 2 * math.ceil(300 / settings.batch_size)
    assert after.loss < start.loss * 0.7
    assert after.accuracy > start.accuracy
    # Well above chance (1/2 and 1/10) after two epochs on 300 records.
    assert task.evaluate(model, data.test).accuracy > {"breast_cancer": 0.85, "digits": 0.4}[name]
    assert task.evaluate(model, data.val) == EvalResult(num_samples=0, loss=0.0, accuracy=0.0)
    assert model.training, "evaluate restores the model's mode"
    other = task.build_model(0)
    task.train(other, data, replace(settings, seed=4))
    assert not all(torch.equal(v, other.state_dict()[k]) for k, v in model.state_dict().items())


def test_evaluate_accepts_any_map_style_dataset() -> None:
    task = load_task("breast_cancer")
    model = task.build_model(0)
    x, y = torch.randn(10, 30), torch.randint(0, 2, (10,))
    items = [(x[i], y[i]) for i in range(10)]
    listed = task.evaluate(model, items, batch_size=3)  # type: ignore[arg-type]
    tensors = task.evaluate(model, TensorDataset(x, y))  # type: ignore[arg-type]
    assert listed.num_samples == tensors.num_samples == 10
    assert listed.accuracy == tensors.accuracy
    assert listed.loss == pytest.approx(tensors.loss, rel=1e-5)
    with pytest.raises(ConfigError, match="batch_size"):
        task.evaluate(model, TensorDataset(x, y), batch_size=0)  # type: ignore[arg-type]


def test_load_data_applies_the_fixed_transforms(tmp_path: Path) -> None:
    task = load_task("digits")
    data = task.load_data(_site(tmp_path / "digits", task))
    x, y = dataset_tensors(data.train)
    assert x.dtype == torch.float32
    assert x.shape == (20, 64)
    assert y.dtype == torch.int64
    raw, _ = read_split(tmp_path / "digits" / "train.csv", task.schema)
    assert torch.allclose(x, torch.from_numpy(raw) / 16)
    with pytest.raises(ValueError, match="unknown split"):
        data.split("holdout")

    bc = load_task("breast_cancer")
    data = bc.load_data(_site(tmp_path / "bc", bc))
    raw, _ = read_split(tmp_path / "bc" / "test.csv", bc.schema)
    centre = np.array([c for _, c, _ in breast_cancer.FEATURES], dtype=np.float32)
    scale = np.array([s for _, _, s in breast_cancer.FEATURES], dtype=np.float32)
    assert torch.allclose(dataset_tensors(data.test)[0], torch.from_numpy((raw - centre) / scale))


def test_a_tiny_one_class_site_still_trains(tmp_path: Path) -> None:
    """Scaling must not depend on a site having many records or several classes."""
    task = load_task("breast_cancer")
    _site(tmp_path, task)
    _write(tmp_path, "train.csv", COLUMNS, [["1.5"] * 30 + ["1"]])
    _write(tmp_path, "val.csv", COLUMNS, [])
    data = task.load_data(tmp_path)
    model = task.build_model(0)
    result = task.train(model, data, TrainSettings(batch_size=16))
    assert result.num_samples == 1
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def _error(tmp_path: Path, split: str, header: list[str] | None, rows: list[list[str]]) -> DataError:
    task = load_task("breast_cancer")
    _site(tmp_path, task)
    if header is not None:
        _write(tmp_path, f"{split}.csv", header, rows)
    with pytest.raises(DataError) as info:
        task.load_data(tmp_path)
    error = info.value
    # Neither the message nor any chained exception may carry a record's content.
    assert error.__cause__ is None
    assert error.__context__ is None
    assert SECRET not in str(error)
    return error


def _row(value: str = "1.0", label: str = "1") -> list[str]:
    return [value] * 30 + [label]


def test_missing_file_is_named(tmp_path: Path) -> None:
    _site(tmp_path, load_task("breast_cancer"))
    (tmp_path / "val.csv").unlink()
    with pytest.raises(DataError, match=r"val\.csv: file is missing"):
        load_task("breast_cancer").load_data(tmp_path)


def test_header_mismatch_names_file_and_column(tmp_path: Path) -> None:
    header = [*COLUMNS]
    header[2] = "perimeter"
    error = str(_error(tmp_path, "test", header, [_row()]))
    assert "test.csv" in error
    assert "column 3 should be 'mean_perimeter'" in error
    # A file without a header: its first row is a record and is not quoted back.
    error = str(_error(tmp_path, "train", [SECRET] * 31, [_row()]))
    assert "train.csv" in error
    assert "column 1 should be 'mean_radius'" in error
    assert "column 31 should be 'diagnosis'" in str(_error(tmp_path, "train", COLUMNS[:-1], []))
    assert "has 32 columns" in str(_error(tmp_path, "train", [*COLUMNS, "extra"], []))


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (_row(SECRET[:-1] + "x"), "line 3: column 'mean_radius' is not a finite number"),
        (_row("nan"), "line 3: column 'mean_radius' is not a finite number"),
        (["1"] * 29 + ["-1e39", "1"], "line 3: column 'worst_fractal_dimension' is too large for float32"),
        (_row(label=SECRET), "line 3: label column 'diagnosis' must be an integer class index from 0 to 1"),
        (_row(label="0.5"), "line 3: label column 'diagnosis'"),
        ([SECRET, "1"], "line 3: expected 31 fields, found 2"),
    ],
)
def test_bad_values_name_file_and_line_only(tmp_path: Path, row: list[str], expected: str) -> None:
    error = str(_error(tmp_path, "val", COLUMNS, [_row(), row]))
    assert "val.csv" in error
    assert expected in error
    assert SECRET[:-1] not in error


def test_empty_and_unreadable_files(tmp_path: Path) -> None:
    task = load_task("breast_cancer")
    _site(tmp_path, task)
    (tmp_path / "test.csv").write_bytes(b"")
    with pytest.raises(DataError, match=r"test\.csv: file is empty"):
        task.load_data(tmp_path)
    (tmp_path / "test.csv").write_bytes(",".join(COLUMNS).encode() + b"\n\xff\xfe1,2\n")
    with pytest.raises(DataError, match=r"test\.csv: is not UTF-8 text") as info:
        task.load_data(tmp_path)
    assert info.value.__context__ is None
    # A byte-order mark and blank lines are tolerated.
    (tmp_path / "test.csv").write_bytes(b"\xef\xbb\xbf" + ",".join(COLUMNS).encode() + b"\n\n" + b"1," * 30 + b"0\n\n")
    assert len(task.load_data(tmp_path).test) == 1  # type: ignore[arg-type]
    _write(tmp_path, "test.csv", COLUMNS, [])
    _write(tmp_path, "val.csv", COLUMNS, [])
    data = task.load_data(tmp_path)  # empty val and test are allowed
    assert len(data.test) == 0  # type: ignore[arg-type]
    _write(tmp_path, "train.csv", COLUMNS, [])
    with pytest.raises(DataError, match=r"train\.csv: has no records"):
        task.load_data(tmp_path)
    with pytest.raises(DataError, match="data folder is missing"):
        task.load_data(tmp_path / "nowhere")


def test_bad_settings_are_config_errors(tmp_path: Path) -> None:
    task = load_task("breast_cancer")
    data = task.load_data(_site(tmp_path, task))
    for bad in [TrainSettings(local_epochs=0), TrainSettings(batch_size=0), TrainSettings(learning_rate=0.0)]:
        with pytest.raises(ConfigError):
            task.train(task.build_model(), data, bad)


def _federation(name: str, seed: int) -> tuple[TabularTask, dict[str, SiteData], Arrays, Arrays]:
    """5 sites with Dirichlet(0.5) label skew; returns the site data and the pooled train and test arrays."""
    task = _tabular(name)
    x, y, _ = load_source(name)
    splits = split_sites(x, y, [f"site-{i}" for i in range(5)], alpha=0.5, seed=seed)
    data = {s: task.site_data(p["train"], p["val"], p["test"]) for s, p in splits.items()}

    def pooled(split: str) -> Arrays:
        return np.concatenate([p[split][0] for p in splits.values()]), np.concatenate(
            [p[split][1] for p in splits.values()]
        )

    return task, data, pooled("train"), pooled("test")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fedavg_matches_centralized_on_breast_cancer(seed: int) -> None:
    """The project's acceptance bar, without a network: non-IID FedAvg within 2 points of pooled training."""
    task, data, train, test = _federation("breast_cancer", seed)
    settings = replace(task.default_settings, seed=seed)
    rounds = task.recommended_rounds
    federated = simulate_fedavg(task, data, settings, rounds)
    central = centralized_baseline(task, *train, *test, settings, epochs=rounds * settings.local_epochs)
    assert federated[-1].num_samples == central.num_samples == len(test[1])
    assert federated[-1].accuracy >= central.accuracy - 0.02
    assert federated[-1].accuracy > 0.93
    assert federated[-1].loss < federated[0].loss


def test_fedavg_learns_digits() -> None:
    task, data, _, test = _federation("digits", 0)
    history = simulate_fedavg(task, data, task.default_settings, 3)
    assert history[-1].num_samples == len(test[1])
    assert history[-1].accuracy > 0.85


def test_simulation_rejects_zero_rounds() -> None:
    task, data, _, _ = _federation("breast_cancer", 0)
    with pytest.raises(ConfigError, match="rounds"):
        simulate_fedavg(task, data, task.default_settings, 0)


def test_fedprox_penalty_keeps_a_site_near_the_global_model() -> None:
    """The FedProx hook: with proximal_mu > 0 local training drifts less from where it started; DP-SGD refuses it."""

    class Prox(breast_cancer.BreastCancerTask):
        proximal_mu = 1.0

    x, y, _ = load_source("breast_cancer")
    empty = (x[:0], y[:0])
    drift = {}
    for task in (breast_cancer.TASK, Prox()):
        data = task.site_data((x[:200], y[:200]), empty, empty)
        model = task.build_model(1)
        start = [p.detach().clone() for p in model.parameters()]
        task.train(model, data, replace(task.default_settings, local_epochs=3))
        drift[type(task).__name__] = sum(
            float(((p.detach() - s) ** 2).sum()) for p, s in zip(model.parameters(), start, strict=True)
        )
    assert drift["Prox"] < 0.5 * drift["BreastCancerTask"]
    prox = Prox()
    settings = replace(prox.default_settings, record_dp=RecordDP(1.0, 1.0, 1e-5))
    with pytest.raises(ConfigError, match="FedProx"):
        prox.train(prox.build_model(0), prox.site_data((x[:50], y[:50]), empty, empty), settings)
