"""Expert trajectories for MTT: E nets trained on the real training part, parameters saved after every epoch.

Expert j starts from the net's own initialisation seeded by derive_seed(seed, "mtt-expert", j) and trains by
plain SGD (momentum 0, no weight decay, as the MTT reference's buffer code) on minibatches of ``batch`` real
images, reshuffled every epoch with derive_seed(seed, "mtt-expert", j, "batches"); its trajectory is
theta*_0 (the initialisation) .. theta*_E (after epoch E), one tensor (E + 1, *shape) per parameter.

Cache: ``root/<key digest>/expert_<j>.pt``, one file per expert, written atomically and carrying a sha256
over its tensors (distill.io.tensor_digest) and the key: the data record (name, split, standardisation),
net, width, depth, dtype, seed, epochs, lr, batch, momentum and the augmentation's name. Other settings make
another folder, so a cache made with them is never reused, and several settings share one ``root``. A
missing expert is trained; a file that does not load, fails its digest, holds another key or the wrong
shapes is reported by a warning and trained again (never used).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch

from torchopt_ext._atomic import atomic_open
from torchopt_ext._distributed import gathered
from torchopt_ext.condense.config import derive_seed
from torchopt_ext.condense.nets import seeded_net
from torchopt_ext.condense.ranks import my_share
from torchopt_ext.condense.types import ImageData
from torchopt_ext.distill.io import DIGEST_KEY, tensor_digest

Trajectory = Dict[str, torch.Tensor]       # parameter name -> (epochs + 1, *shape)
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]   # (x, generator) -> x', a fresh draw
MOMENTUM = 0.0
FORMAT = 1


def expert_key(data: ImageData, config, epochs: int, lr: float, batch: int,
               augment_name: Optional[str] = None) -> dict:
    """Everything a trajectory depends on, as plain JSON values (the cache's identity)."""
    return {"format": FORMAT, "data": data.record(), "net": getattr(config, "net", "convnet"),
            "width": getattr(config, "width", 128), "depth": getattr(config, "depth", None),
            "dtype": str(data.x_train.dtype), "seed": getattr(config, "seed", 0), "epochs": int(epochs),
            "lr": float(lr), "batch": int(batch), "momentum": MOMENTUM, "augment": augment_name}


def key_text(key: dict) -> str:
    return json.dumps(key, sort_keys=True, allow_nan=False)


def key_folder(root: str, key: dict) -> str:
    """``root/<first 16 hex digits of sha256(key)>``: one folder per setting."""
    return os.path.join(root, hashlib.sha256(key_text(key).encode()).hexdigest()[:16])


def expert_path(root: str, key: dict, j: int) -> str:
    return os.path.join(key_folder(root, key), f"expert_{j:03d}.pt")


def key_net(key: dict, data: ImageData, seed: int = 0) -> torch.nn.Module:
    """The key's architecture, initialised from ``seed`` (the global random stream untouched), in its dtype."""
    return seeded_net(key["net"], data.shape, data.n_classes, seed, key["width"], key["depth"],
                      getattr(torch, key["dtype"].removeprefix("torch.")))


def train_expert(data: ImageData, key: dict, j: int, augment: Optional[Augment] = None,
                 tick: Optional[Callable[[], None]] = None) -> Tuple[Trajectory, float]:
    """Expert j's trajectory (module docstring) and its final test accuracy; ``tick()`` after each epoch.

    ``augment(x, generator)``, when given, transforms every real batch (a fresh draw each, from the
    expert's batch generator) before the step.
    """
    net = key_net(key, data, derive_seed(key["seed"], "mtt-expert", j))
    gen = torch.Generator().manual_seed(derive_seed(key["seed"], "mtt-expert", j, "batches"))
    opt = torch.optim.SGD(net.parameters(), lr=key["lr"], momentum=key["momentum"])
    names = [name for name, _ in net.named_parameters()]
    saved = [[p.detach().clone() for p in net.parameters()]]
    n = data.x_train.shape[0]
    net.train()
    for _ in range(key["epochs"]):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, key["batch"]):
            idx = perm[i:i + key["batch"]]
            x = data.x_train[idx] if augment is None else augment(data.x_train[idx], gen)
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(x), data.y_train[idx]).backward()
            opt.step()
        saved.append([p.detach().clone() for p in net.parameters()])
        if tick is not None:
            tick()
    from torchopt_ext.condense.evaluate import test_accuracy
    acc = test_accuracy(net, data.x_test, data.y_test)
    return {name: torch.stack([s[i] for s in saved]) for i, name in enumerate(names)}, acc


def save_expert(path: str, key: dict, j: int, trajectory: Trajectory, test_acc: float, seconds: float):
    """One expert's file: key, index, trajectory, test accuracy, training time and the digest, atomically."""
    state = {"key": key_text(key), "index": j, "trajectory": dict(trajectory), "test_acc": float(test_acc),
             "seconds": float(seconds)}
    state[DIGEST_KEY] = tensor_digest(state)
    with atomic_open(path, "wb") as fh:
        torch.save(state, fh)


def load_expert(path: str, key: dict, j: int, shapes: Dict[str, tuple]) -> dict:
    """The saved state of expert j; raises ValueError saying why a file cannot be used.

    shapes: parameter name -> shape of the key's net; each trajectory tensor must be (epochs + 1, *shape).
    """
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:
        raise ValueError(f"unreadable or truncated ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not {"key", "index", "trajectory", "test_acc", DIGEST_KEY} <= set(state):
        raise ValueError("not an expert file (missing keys)")
    if state[DIGEST_KEY] != tensor_digest(state):
        raise ValueError("its tensors do not match the sha256 stored in it")
    if state["key"] != key_text(key) or state["index"] != j:
        raise ValueError("it was made with other settings")
    traj = state["trajectory"]
    want = {name: (key["epochs"] + 1,) + tuple(s) for name, s in shapes.items()}
    got = {name: tuple(t.shape) for name, t in traj.items()} if isinstance(traj, dict) else None
    if got != want:
        raise ValueError("its trajectory has other parameters or shapes than the net")
    return state


def expert_trajectories(data: ImageData, config, n_experts: int, epochs: int, lr: float, batch: int, root: str,
                        augment: Optional[Augment] = None, augment_name: Optional[str] = None,
                        progress: bool = False, spread: bool = False) -> Tuple[List[Trajectory], dict]:
    """E = ``n_experts`` trajectories from the cache in ``root``, training (and saving) those missing or bad.

    Returns the trajectories (expert j's at index j) and a record: the key, folder, test accuracies, how many
    were trained here and reused, and the seconds spent training. With ``spread`` (every rank of a torchrun
    calls it together) each rank trains its round-robin share of the missing experts, then all read the
    others' files; the trajectories do not depend on which rank trained them (each expert has its own seed).
    """
    key = expert_key(data, config, epochs, lr, batch, augment_name)
    folder = key_folder(root, key)
    os.makedirs(folder, exist_ok=True)
    key_file = os.path.join(folder, "key.json")
    if not os.path.isfile(key_file):
        with atomic_open(key_file) as fh:   # for people reading the cache; loading checks each file's own key
            fh.write(json.dumps(key, indent=1, sort_keys=True))
    shapes = {name: tuple(p.shape) for name, p in key_net(key, data).named_parameters()}
    states = {}
    for j in range(n_experts):
        path = expert_path(root, key, j)
        if os.path.exists(path):
            try:
                states[j] = load_expert(path, key, j, shapes)
            except ValueError as why:
                warnings.warn(f"mtt: expert file {path} cannot be used ({why}); training expert {j} again",
                              stacklevel=2)
    missing = [j for j in range(n_experts) if j not in states]
    mine = my_share(missing) if spread else missing

    def train(js) -> float:
        bar, seconds = None, 0.0
        if progress and js:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(js) * epochs, desc="mtt experts", unit="epoch", leave=False)
        try:
            for j in js:
                t0 = time.perf_counter()
                traj, acc = train_expert(data, key, j, augment, tick=None if bar is None else bar.update)
                spent = time.perf_counter() - t0
                save_expert(expert_path(root, key, j), key, j, traj, acc, spent)
                states[j] = {"trajectory": traj, "test_acc": acc}
                seconds += spent
        finally:
            if bar is not None:
                bar.close()
        return seconds

    if spread:   # a failure on one rank is raised on all; after it every share is on disk
        seconds = sum(gathered(lambda: train(mine)))
        for j in sorted(set(missing) - set(mine)):
            states[j] = load_expert(expert_path(root, key, j), key, j, shapes)
    else:
        seconds = train(missing)
    return [states[j]["trajectory"] for j in range(n_experts)], {
        "key": key, "folder": folder, "test_acc": [float(states[j]["test_acc"]) for j in range(n_experts)],
        "trained": len(missing), "reused": n_experts - len(missing), "train_seconds": seconds}
