"""Data loading, the recorded split, bad CSV input, config round trip."""
import pytest
import torch

from torchopt_ext.distill.config import DistillConfig, DistillError
from torchopt_ext.distill.data import load_split


def write(tmp_path, text, name="t.csv"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def csv_cfg(path, target="y", **kw):
    kw.setdefault("steps", 2)
    kw.setdefault("per_class", 1)
    return DistillConfig(csv=path, target=target, **kw)


def good_csv(rows=30):
    lines = ["a,b,y"] + [f"{i},{(i * 7) % 5 + 100},{'cat' if i % 2 else 'dog'}" for i in range(rows)]
    return "\n".join(lines) + "\n"


def test_moons_default_is_the_papers_problem():
    split = load_split(DistillConfig())
    assert split.x_train.shape == (1000, 2) and split.x_test.shape == (500, 2)
    assert split.n_classes == 2
    assert sorted(split.train_index + split.test_index) == list(range(1500))


def test_split_is_seeded_and_recorded():
    a, b = load_split(DistillConfig(seed=3)), load_split(DistillConfig(seed=3))
    c = load_split(DistillConfig(seed=4))
    assert a.train_index == b.train_index and a.train_index != c.train_index
    rec = a.record()
    assert set(rec) >= {"train_index", "test_index", "mean", "std", "classes"}


@pytest.mark.parametrize("name", ["circles", "blobs", "iris", "wine", "breast_cancer", "digits"])
def test_builtin_datasets_load(name):
    split = load_split(DistillConfig(dataset=name, steps=2, per_class=1))
    assert split.n_classes >= 2 and split.x_train.shape[0] > split.x_test.shape[0]


def test_csv_standardised_with_string_labels(tmp_path):
    split = load_split(csv_cfg(write(tmp_path, good_csv())), dtype=torch.float64)
    assert split.classes == ["cat", "dog"]
    torch.testing.assert_close(split.x_train.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(split.x_train.std(0, unbiased=False), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("text,match", [
    ("a,b,y\n1,,0\n2,3,1\n", "missing value in column 'b' at line 2"),
    ("a,b,y\n1,NaN,0\n2,3,1\n", "missing value in column 'b'"),
    ("a,b,y\n1,2,0\n2,red,1\n", "non-numeric value 'red' in column 'b' at line 3"),
    ("a,b,y\n1,2,0\n2,3,0\n4,5,0\n", "single class"),
    ("a,b,y\n1,2,0\n2,3\n", "line 3 has 2 fields"),
    ("", "empty"),
])
def test_bad_csv_gives_clear_errors(tmp_path, text, match):
    with pytest.raises(DistillError, match=match):
        load_split(csv_cfg(write(tmp_path, text)))


def test_unknown_target_column(tmp_path):
    with pytest.raises(DistillError, match=r"--target: column 'label' not in .*columns are \['a', 'b', 'y'\]"):
        load_split(csv_cfg(write(tmp_path, good_csv()), target="label"))


def test_fewer_rows_than_synthetic_points(tmp_path):
    with pytest.raises(DistillError, match="fewer than the 80 synthetic points"):
        load_split(csv_cfg(write(tmp_path, good_csv(30)), steps=10, per_class=4))


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(DistillError, match="--csv: cannot read"):
        load_split(csv_cfg(str(tmp_path / "nope.csv")))


def test_config_json_round_trip_and_validation():
    c = DistillConfig(arch=[1, 2, 4], soft_labels=True, checkpoint_every=5, strategies=[0, 3])
    assert DistillConfig.from_json(c.to_json()) == c
    with pytest.raises(DistillError, match="--arch"):
        DistillConfig(arch=[3]).validate()
    with pytest.raises(DistillError, match="--hypergrad"):
        DistillConfig(hypergrad="magic").validate()
    with pytest.raises(DistillError, match="--target"):
        DistillConfig(csv="x.csv").validate()
