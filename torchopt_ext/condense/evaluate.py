"""The evaluation protocol, the same for every method: fresh nets trained on S only, then tested on T's test part.

Protocol (the DC/DSA/DM/MTT papers' ConvNet evaluation, by default without augmentation): ``n_models`` nets, each
freshly initialised from its own seed, trained on the synthetic set by SGD (lr 0.01, momentum 0.9, weight
decay 5e-4, batch 256, reshuffled every epoch) for ``epochs`` epochs, the lr x0.1 from epoch
ceil(epochs / 2) on, with cross-entropy against the set's label rows (soft labels as target probabilities).
With ``augment`` (``--eval-augment``) every training batch goes through the DSA augmentation first
(condense/augment.py: the data set's default families, one drawn per batch, parameters per image), as the
DSA and DM papers evaluate; its draws come from a generator seeded per net.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from torchopt_ext.condense.augment import augment as augment_batch
from torchopt_ext.condense.augment import default_strategy
from torchopt_ext.condense.config import CondenseError, derive_seed
from torchopt_ext.condense.nets import seeded_net
from torchopt_ext.condense.types import ImageData, SyntheticSet

LR, MOMENTUM, WEIGHT_DECAY, BATCH, LR_DECAY = 0.01, 0.9, 5e-4, 256, 0.1
TEST_BATCH = 1024
OPTIMIZERS = ("sgd", "implicit", "adaptive")
AUGMENT_TEXT = ("one family per batch, drawn from color, crop, cutout, flip, scale and rotate with flip left out on "
                "digit data sets, its parameters drawn per image from a generator seeded per net")


@contextlib.contextmanager
def compute_threads(n: Optional[int] = None):
    """The one place the pipeline sets torch's intra-op threads: ``n``, or when None torch's own default
    (all cores: a ConvNet's convolutions are large enough to share), restored on exit."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def mean_std(values: List[float]):
    """(mean, sample standard deviation); the std of one value is 0."""
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def protocol_text(n_models: int, epochs: int, optimizer: str = "sgd", use_learned_lrs: bool = False,
                  augment: bool = False) -> str:
    """The protocol in words, for results.md."""
    if optimizer == "sgd":
        opt = (f"SGD (lr {LR}, momentum {MOMENTUM}, weight decay {WEIGHT_DECAY}, batch {BATCH}, lr x{LR_DECAY} "
               f"from epoch {(epochs + 1) // 2 + 1} of {epochs})")
    elif optimizer == "implicit":
        opt = (f"ImplicitSGD on the net's Linear layers made implicit (torchopt_ext.nn.implicit, identity=True; "
               f"convolutions and norms stay explicit) with the SGD settings: lr {LR}, momentum {MOMENTUM}, weight "
               f"decay {WEIGHT_DECAY}, batch {BATCH}, lr x{LR_DECAY} from epoch {(epochs + 1) // 2 + 1} of {epochs}")
    else:
        opt = (f"AdaptiveLRSGD (five-probe lr from {LR}, momentum {MOMENTUM}, weight decay {WEIGHT_DECAY}, "
               f"batch {BATCH}, no schedule: the optimizer sets its own lr) for {epochs} epochs")
    aug = (f"each batch augmented by DSA ({AUGMENT_TEXT})" if augment else "no augmentation")
    text = (f"{n_models} freshly initialised nets per cell, trained on the synthetic set only by {opt}, with "
            f"cross-entropy against its label rows; {aug}; test accuracy on the whole test part, "
            "mean ± sample std over the nets.")
    if use_learned_lrs:
        text += (" Sets with learned step sizes are instead trained by replaying the distilled steps "
                 "(plain SGD, each step's batch and learned lr, no momentum or weight decay).")
    return text


def _loss(net, x, y):
    return F.cross_entropy(net(x), y)


def test_accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of x (N, C, H, W) whose argmax logit is y (N,), in eval mode, batches of TEST_BATCH."""
    was = net.training
    net.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], TEST_BATCH):
            correct += int((net(x[i:i + TEST_BATCH]).argmax(-1) == y[i:i + TEST_BATCH]).sum())
    net.train(was)
    return correct / x.shape[0]


def train_protocol(net, images, labels, epochs, generator, optimizer="sgd", tick=None, augment=None):
    """Train ``net`` in place on (images (M, C, H, W), labels (M, K)) by the module's protocol; returns net.

    ``optimizer``: "sgd"; "implicit" (the net's Linear layers converted by ``torchopt_ext.nn.implicit`` with
    ``identity=True``, trained by ImplicitSGD with the same settings); "adaptive" (AdaptiveLRSGD from lr
    0.01, no schedule). ``tick()`` is called after each epoch. ``augment``: None, or (families, generator):
    each batch is augmented by ``condense.augment.augment`` with those families, draws from that generator.
    """
    if optimizer == "implicit":
        import warnings
        from torchopt_ext.nn import implicit
        from torchopt_ext.optim import ImplicitSGD
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the report lists convolutions that stay explicit, as expected
            net, _ = implicit(net, inplace=True, identity=True)
        opt = ImplicitSGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    elif optimizer == "adaptive":
        from torchopt_ext.optim import AdaptiveLRSGD
        opt = AdaptiveLRSGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, model=net)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    net.train()
    m = images.shape[0]
    for epoch in range(epochs):
        if epoch == (epochs + 1) // 2 and optimizer != "adaptive":
            for group in opt.param_groups:
                group["lr"] = LR * LR_DECAY
        perm = torch.randperm(m, generator=generator)
        for i in range(0, m, BATCH):
            xb, yb = images[perm[i:i + BATCH]], labels[perm[i:i + BATCH]]
            if augment is not None:
                xb = augment_batch(xb, *augment)
            opt.zero_grad()
            _loss(net, xb, yb).backward()
            if optimizer == "adaptive":
                opt.step(lambda: _loss(net, xb, yb))
            else:
                opt.step()
        if tick is not None:
            tick()
    return net


def replay_steps(net, syn: SyntheticSet):
    """Train ``net`` in place by the distilled procedure: the images are ``meta["steps"]`` (default 1) equal
    consecutive batches; inner step t (one per entry of ``syn.lrs``) is a plain SGD step (no momentum, no weight
    decay) on batch ``t mod steps`` with rate ``lrs[t]``, as the unroll took it."""
    s = int(syn.meta.get("steps", 1))
    m = syn.images.shape[0]
    if s < 1 or m % s:
        raise CondenseError(f"synthetic set: {m} images do not split into meta['steps'] = {s} equal batches")
    b = m // s
    net.train()
    for t, lr in enumerate(syn.lrs.detach().flatten().tolist()):
        k = t % s
        net.zero_grad()
        _loss(net, syn.images[k * b:(k + 1) * b], syn.labels[k * b:(k + 1) * b]).backward()
        with torch.no_grad():
            for p in net.parameters():
                if p.grad is not None:
                    p.sub_(p.grad, alpha=lr)
    return net


def evaluate_detailed(syn: SyntheticSet, data: ImageData, net: str = "convnet", n_models: int = 5,
                      epochs: int = 300, seed: int = 0, optimizer: str = "sgd", use_learned_lrs: bool = False,
                      progress: bool = False, width: int = 128, depth: Optional[int] = None,
                      models: Optional[Sequence[int]] = None, augment: bool = False) -> dict:
    """:func:`evaluate_set` with everything measured: {"accuracies", "mean", "std", "wall_s" (per net),
    "training": "protocol" or "replay", ...}. Net j starts from seed derive_seed(seed, net, j) and shuffles
    with derive_seed(seed, net, j, "batches"): every cell of a grid sees the same initialisations, and a net
    does not depend on the others. ``models``: train only these of the ``n_models`` nets (default all), for
    a caller that spreads them over processes and joins the records with :func:`merge_evaluations`. With
    ``augment`` its batches are augmented (module docstring) with draws seeded by derive_seed(seed, net, j,
    "augment"); a replayed set (``use_learned_lrs``) is never augmented."""
    if optimizer not in OPTIMIZERS:
        raise CondenseError(f"--eval-optimizer: expected {'|'.join(OPTIMIZERS)}, got {optimizer!r}")
    replay = use_learned_lrs and syn.lrs is not None
    images, labels = syn.images.detach(), syn.labels.detach().to(syn.images.dtype)
    accs, walls = [], []
    models = range(n_models) if models is None else list(models)
    bar = tqdm(total=len(models) * (1 if replay else epochs), disable=not progress, leave=False,
               desc=f"eval {net}")
    for j in models:
        t0 = time.perf_counter()
        model = seeded_net(net, data.shape, data.n_classes, derive_seed(seed, net, j), width, depth, images.dtype)
        if replay:
            replay_steps(model, SyntheticSet(images, labels, syn.lrs, syn.meta))
            bar.update()
        else:
            gen = torch.Generator().manual_seed(derive_seed(seed, net, j, "batches"))
            aug = ((default_strategy(data.name), torch.Generator().manual_seed(derive_seed(seed, net, j, "augment")))
                   if augment else None)
            model = train_protocol(model, images, labels, epochs, gen, optimizer, tick=bar.update, augment=aug)
        accs.append(test_accuracy(model, data.x_test, data.y_test))
        walls.append(time.perf_counter() - t0)
        bar.set_postfix(acc=f"{100 * statistics.fmean(accs):.1f}%")
    bar.close()
    mean, std = mean_std(accs)
    return {"net": net, "accuracies": accs, "mean": mean, "std": std, "wall_s": walls, "n_models": n_models,
            "epochs": epochs, "optimizer": optimizer, "training": "replay" if replay else "protocol", "seed": seed,
            "augment": list(default_strategy(data.name)) if augment and not replay else []}


def merge_evaluations(parts: List[dict]) -> dict:
    """One :func:`evaluate_detailed` record from records of the same evaluation's nets, given in net order."""
    accs = [a for p in parts for a in p["accuracies"]]
    mean, std = mean_std(accs)
    return dict(parts[0], accuracies=accs, mean=mean, std=std, wall_s=[w for p in parts for w in p["wall_s"]])


def evaluate_set(syn: SyntheticSet, data: ImageData, net: str = "convnet", n_models: int = 5, epochs: int = 300,
                 seed: int = 0, optimizer: str = "sgd", use_learned_lrs: bool = False, progress: bool = False,
                 width: int = 128, depth: Optional[int] = None, augment: bool = False) -> List[float]:
    """Test accuracies (in [0, 1]) of ``n_models`` fresh ``net``s trained on ``syn`` only (the module's protocol).

    syn.images (M, C, H, W) in data's standardised space, syn.labels (M, K) probabilities. With
    ``use_learned_lrs`` and ``syn.lrs`` set, each net is trained by :func:`replay_steps` instead (exactly the
    distilled steps and rates; ``epochs`` and ``optimizer`` unused).
    """
    return evaluate_detailed(syn, data, net, n_models, epochs, seed, optimizer, use_learned_lrs, progress,
                             width, depth, augment=augment)["accuracies"]
