"""MTT's expert trajectories: the SGD they record, and their cache (reuse, other keys, damaged and killed files).

Killed writers are forked processes that die by a real SIGKILL in the middle of a file (the atomic_open
test hook), as in test_distill_faults.py."""
import multiprocessing
import os
import signal
import sys
import types

import pytest
import torch

from tests.helpers import condense_fixtures as F
from torchopt_ext.condense import experts as E
from torchopt_ext.condense.config import derive_seed
from torchopt_ext.distill.io import tensor_digest
from torchopt_ext.distill.models import one_thread

EPOCHS, LR, BATCH = 2, 0.05, 64

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny():
    """12 training images per class: a few batches per epoch."""
    return F.tiny_digits(12)


def config(**kw):
    return types.SimpleNamespace(**{"net": "convnet", "width": 4, "depth": None, "seed": 0, **kw})


@pytest.fixture
def counted(monkeypatch):
    """Calls of train_expert, by expert index."""
    calls = []
    real = E.train_expert

    def train(data, key, j, *args, **kw):
        calls.append(j)
        return real(data, key, j, *args, **kw)
    monkeypatch.setattr(E, "train_expert", train)
    return calls


def trajectories(data, root, n=2, cfg=None, **kw):
    args = dict(epochs=EPOCHS, lr=LR, batch=BATCH)
    args.update(kw)
    return E.expert_trajectories(data, cfg or config(), n, args["epochs"], args["lr"], args["batch"], root)


def equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_trajectory_is_plain_sgd_saved_every_epoch(tiny):
    """Reference: the same seeded init and batches, theta <- theta - lr grad by hand, in float64."""
    data = F.digits(torch.float64)
    keep = torch.cat([torch.nonzero(data.y_train == c).flatten()[:6] for c in range(10)])
    data.x_train, data.y_train = data.x_train[keep], data.y_train[keep]
    key = E.expert_key(data, config(), EPOCHS, LR, 16)
    traj, acc = E.train_expert(data, key, 1)
    net = E.key_net(key, data, derive_seed(0, "mtt-expert", 1))
    gen = torch.Generator().manual_seed(derive_seed(0, "mtt-expert", 1, "batches"))
    want = [{k: p.detach().clone() for k, p in net.named_parameters()}]
    n = data.x_train.shape[0]
    for _ in range(EPOCHS):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, 16):
            idx = perm[i:i + 16]
            net.zero_grad()
            torch.nn.functional.cross_entropy(net(data.x_train[idx]), data.y_train[idx]).backward()
            with torch.no_grad():
                for p in net.parameters():
                    p -= LR * p.grad
        want.append({k: p.detach().clone() for k, p in net.named_parameters()})
    assert set(traj) == set(want[0])
    for t in range(EPOCHS + 1):
        for k in traj:
            assert traj[k].shape == (EPOCHS + 1,) + want[0][k].shape
            torch.testing.assert_close(traj[k][t], want[t][k], rtol=1e-12, atol=1e-12)
    assert not torch.equal(traj["head.weight"][0], traj["head.weight"][-1])
    assert 0.0 <= acc <= 1.0


def test_experts_differ_and_augment_hook_sees_every_batch(tiny):
    key = E.expert_key(tiny, config(), 1, LR, BATCH, "flip")
    a, _ = E.train_expert(tiny, key, 0)
    b, _ = E.train_expert(tiny, key, 1)
    assert not torch.equal(a["head.weight"][0], b["head.weight"][0])   # each expert its own init
    seen = []

    def augment(x, gen):
        seen.append(x.shape[0])
        return torch.flip(x, dims=(-1,))
    c, _ = E.train_expert(tiny, key, 0, augment)
    assert sum(seen) == tiny.x_train.shape[0] and len(seen) == 2       # 120 images in batches of 64
    assert torch.equal(a["head.weight"][0], c["head.weight"][0])
    assert not torch.equal(a["head.weight"][1], c["head.weight"][1])


def test_reuse_trains_nothing_and_more_experts_train_only_the_new(tiny, tmp_path, counted):
    root = str(tmp_path / "experts")
    first, rec = trajectories(tiny, root)
    assert counted == [0, 1] and rec["trained"] == 2 and rec["reused"] == 0
    files = sorted(os.listdir(rec["folder"]))
    assert files == ["expert_000.pt", "expert_001.pt", "key.json"]
    again, rec2 = trajectories(tiny, root)
    assert counted == [0, 1] and rec2["reused"] == 2 and rec2["test_acc"] == rec["test_acc"]
    assert all(equal(x, y) for x, y in zip(first, again))
    more, _ = trajectories(tiny, root, n=3)
    assert counted == [0, 1, 2] and equal(more[1], first[1])


@pytest.mark.parametrize("change", [
    dict(lr=0.1), dict(epochs=3), dict(batch=32), dict(cfg=config(width=5)), dict(cfg=config(seed=1)),
    dict(cfg=config(net="mlp")), dict(cfg=config(depth=1)),
])
def test_a_changed_key_is_not_reused(tiny, tmp_path, counted, change):
    root = str(tmp_path / "experts")
    _, rec = trajectories(tiny, root)
    stamp = {n: os.stat(os.path.join(rec["folder"], n)).st_mtime_ns for n in os.listdir(rec["folder"])}
    _, other = trajectories(tiny, root, **change)
    assert counted == [0, 1, 0, 1] and other["folder"] != rec["folder"] and other["reused"] == 0
    assert {n: os.stat(os.path.join(rec["folder"], n)).st_mtime_ns for n in os.listdir(rec["folder"])} == stamp


def test_other_data_is_not_reused(tiny, tmp_path, counted):
    root = str(tmp_path / "experts")
    trajectories(tiny, root)
    shifted = F.digits(seed=1)   # another split: another data record
    shifted.x_train, shifted.y_train = shifted.x_train[:120], shifted.y_train[:120]
    _, rec = trajectories(shifted, root)
    assert counted == [0, 1, 0, 1] and rec["reused"] == 0


def _rewrite(path, mutate):
    state = torch.load(path, weights_only=True)
    mutate(state)
    torch.save(state, path)


@pytest.mark.parametrize("damage, why", [
    ("truncate", "unreadable or truncated"),
    ("garbage", "unreadable or truncated"),
    ("tensor", "do not match the sha256"),
    ("key", "made with other settings"),
    ("shape", "other parameters or shapes"),
])
def test_a_damaged_file_is_reported_and_trained_again(tiny, tmp_path, counted, damage, why):
    root = str(tmp_path / "experts")
    good, rec = trajectories(tiny, root)
    path = os.path.join(rec["folder"], "expert_001.pt")
    if damage == "truncate":
        with open(path, "r+b") as fh:
            fh.truncate(os.path.getsize(path) // 2)
    elif damage == "garbage":
        with open(path, "wb") as fh:
            fh.write(b"not a torch file")
    elif damage == "tensor":   # a changed number, the old digest kept
        _rewrite(path, lambda s: s["trajectory"]["head.bias"].add_(1e-3))
    elif damage == "key":      # a valid file of other settings, moved in by hand
        def other_key(s):
            s["key"] = s["key"].replace('"lr": 0.05', '"lr": 0.5')
            s["sha256"] = tensor_digest(s)
        _rewrite(path, other_key)
    else:
        def short(s):
            s["trajectory"]["head.bias"] = s["trajectory"]["head.bias"][:-1]
            s["sha256"] = tensor_digest(s)
        _rewrite(path, short)
    with pytest.warns(UserWarning, match=f"expert_001.pt cannot be used \\(.*{why}.*\\); training expert 1 again"):
        again, rec2 = trajectories(tiny, root)
    assert counted == [0, 1, 1] and rec2["trained"] == 1
    assert all(equal(x, y) for x, y in zip(good, again))
    E.load_expert(path, E.expert_key(tiny, config(), EPOCHS, LR, BATCH), 1,
                  {k: tuple(v.shape[1:]) for k, v in good[1].items()})   # repaired on disk


def _killed_child(data, root, log):
    os.environ["TORCHOPT_EXT_TEST_KILL_AT"] = "expert_001.pt"
    torch.set_num_threads(1)
    sys.stdout = sys.stderr = open(log, "w")
    trajectories(data, root, n=3)
    sys.exit(0)


def test_sigkill_mid_expert_file_then_rerun_trains_only_what_is_missing(tiny, tmp_path, counted):
    root = str(tmp_path / "experts")
    p = multiprocessing.get_context("fork").Process(target=_killed_child, args=(tiny, root, str(tmp_path / "log")))
    p.start()
    p.join(120)
    assert p.exitcode == -signal.SIGKILL
    folder = E.key_folder(root, E.expert_key(tiny, config(), EPOCHS, LR, BATCH))
    names = os.listdir(folder)
    assert "expert_000.pt" in names and "expert_001.pt" not in names and "expert_002.pt" not in names
    assert len([n for n in names if n.startswith(".expert_001.pt.") and n.endswith(".tmp")]) == 1
    got, rec = trajectories(tiny, root, n=3)
    assert counted == [1, 2] and rec["reused"] == 1
    fresh, _ = trajectories(tiny, str(tmp_path / "fresh"), n=3)
    assert all(equal(x, y) for x, y in zip(got, fresh))


def _spread_rank(rank, port, data, root, log):
    """One of two gloo ranks calling expert_trajectories(spread=True); logs the experts it trained."""
    import torch.distributed as dist
    from tests.helpers.dist_helpers import close_gloo, init_gloo
    init_gloo(rank, 2, port)
    trained = []
    real = E.train_expert

    def train(d, key, j, *a, **k):
        trained.append(j)
        return real(d, key, j, *a, **k)
    E.train_expert = train
    with one_thread():
        trajs, record = E.expert_trajectories(data, config(), 3, EPOCHS, LR, BATCH, root, spread=True)
    torch.save({"trained": trained, "trajs": trajs, "record": record}, f"{log}{rank}.pt")
    assert dist.get_world_size() == 2
    close_gloo()
    return 0


def test_spread_over_two_ranks_trains_each_expert_once_and_gives_one_process_trajectories(tiny, tmp_path):
    from tests.helpers.dist_helpers import free_port
    from tests.distill.test_distill_faults import fork, join
    alone, _ = trajectories(tiny, str(tmp_path / "alone"), n=3)
    port, log = free_port(), str(tmp_path / "rank")
    codes = join([fork(_spread_rank, r, port, tiny, str(tmp_path / "spread"), log) for r in range(2)], 120)
    assert codes == [0, 0]
    got = [torch.load(f"{log}{r}.pt", weights_only=False) for r in range(2)]
    assert [g["trained"] for g in got] == [[0, 2], [1]]   # the missing experts round-robin
    for g in got:
        assert len(g["trajs"]) == 3 and all(equal(a, b) for a, b in zip(g["trajs"], alone))
        assert g["record"]["trained"] == 3 and g["record"]["reused"] == 0
