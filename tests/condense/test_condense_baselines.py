"""The baselines: random and herding real images per class, whole; herding against a plain-loop reference."""
import pytest
import torch

from torchopt_ext.condense.config import CondenseConfig, CondenseError
from torchopt_ext.condense.data import load_images
from torchopt_ext.condense.methods import load_methods
from torchopt_ext.condense.methods.baselines import herding_select

CFG = CondenseConfig(width=8)


@pytest.fixture(scope="module")
def digits():
    return load_images("digits")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def herding_reference(phi, k):
    """Greedy herding written out: try every unchosen row, keep the one whose running mean is nearest mu."""
    phi = phi.double()
    mu = phi.mean(0)
    chosen = []
    for t in range(1, k + 1):
        best, best_d = None, None
        for i in range(phi.shape[0]):
            if i in chosen:
                continue
            d = float(torch.linalg.vector_norm(mu - (phi[chosen].sum(0) + phi[i]) / t))
            if best_d is None or d < best_d:
                best, best_d = i, d
        chosen.append(best)
    return chosen


def test_methods_are_registered():
    assert {"random", "herding", "whole"} <= set(load_methods())


def test_herding_matches_the_reference_and_the_closed_form_first_pick():
    phi = torch.randn(40, 5, generator=gen(1))
    fast = herding_select(phi, 12).tolist()
    assert fast == herding_reference(phi, 12)
    assert fast[0] == int(torch.linalg.vector_norm(phi - phi.mean(0), dim=1).argmin())   # nearest the mean
    assert sorted(herding_select(phi, 40).tolist()) == list(range(40))


def test_herding_tracks_the_class_mean_better_than_random(digits):
    methods = load_methods()
    cfg = CondenseConfig(herding_space="pixels")
    h = methods["herding"](digits, 5, cfg, gen())
    errors = []
    for seed in range(5):
        r = methods["random"](digits, 5, cfg, gen(seed))
        errors.append(sum(float(torch.linalg.vector_norm(r.images[r.hard_labels == c].mean(0)
                                                         - digits.class_part(c).mean(0))) for c in range(10)))
    herd = sum(float(torch.linalg.vector_norm(h.images[h.hard_labels == c].mean(0) - digits.class_part(c).mean(0)))
               for c in range(10))
    assert herd < 0.7 * min(errors)


@pytest.mark.parametrize("name", ["random", "herding"])
def test_real_images_per_class_one_hot_and_seeded(digits, name):
    fn = load_methods()[name]
    s = fn(digits, 3, CFG, gen(0))
    assert s.images.shape == (30, 1, 8, 8) and s.labels.shape == (30, 10) and s.lrs is None
    assert s.hard_labels.tolist() == [c for c in range(10) for _ in range(3)]
    torch.testing.assert_close(s.labels.sum(1), torch.ones(30))
    idx = torch.tensor(s.meta["train_index"])
    assert len(set(idx.tolist())) == 30
    torch.testing.assert_close(s.images, digits.x_train[idx])
    assert torch.equal(digits.y_train[idx], s.hard_labels)
    assert s.meta["method"] == name and s.meta["ipc"] == 3
    assert torch.equal(fn(digits, 3, CFG, gen(0)).images, s.images)
    if name == "random":
        assert not torch.equal(fn(digits, 3, CFG, gen(1)).images, s.images)


def test_herding_feature_space_follows_the_option(digits):
    fn = load_methods()["herding"]
    pix = fn(digits, 4, CondenseConfig(herding_space="pixels"), gen(0))
    feat = fn(digits, 4, CondenseConfig(width=8), gen(0))
    assert pix.meta["space"] == "pixels" and feat.meta["space"] == "features"
    assert pix.meta["train_index"] != feat.meta["train_index"]
    assert pix.meta["train_index"] == fn(digits, 4, CondenseConfig(herding_space="pixels"), gen(7)).meta["train_index"]
    first = torch.tensor(pix.meta["train_index"][:1])
    x0 = digits.class_part(0).flatten(1)
    assert torch.equal(digits.x_train[first].flatten(1)[0], x0[torch.linalg.vector_norm(x0 - x0.mean(0), dim=1).argmin()])


def test_whole_is_the_training_part(digits):
    s = load_methods()["whole"](digits, None, CFG, gen())
    assert s.images is digits.x_train and torch.equal(s.hard_labels, digits.y_train) and s.meta["whole"]


@pytest.mark.parametrize("name", ["random", "herding"])
def test_ipc_larger_than_a_class(digits, name):
    with pytest.raises(CondenseError, match="--ipc: expected images per class between 1 and 116"):
        load_methods()[name](digits, 117, CFG, gen())
