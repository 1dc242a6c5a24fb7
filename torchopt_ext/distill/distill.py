"""The outer loop: Adam on synthetic points, (soft) labels and per-step learning rates.

Restarts run in batches (``--batch-restarts``, default all): every learned tensor gains a leading
restart dimension and the internal models of all restarts in a batch go through one stacked unroll per
architecture; the outer step (Adam) updates each restart's rows on their own. Each restart keeps its
own generator, seeded as if it ran alone.
"""
import math
import os
from dataclasses import dataclass, field

import torch

from torchopt_ext._distributed import rank_world
from torchopt_ext.distill import hypergrad as hg
from torchopt_ext.distill import io, models
from torchopt_ext.distill.config import DistillError
from torchopt_ext.distill.data import load_split


@dataclass
class DistilledSet:
    points: torch.Tensor   # s x B x d (standardised feature space), B = per_class * C
    labels: torch.Tensor   # s x B x C target probabilities (one-hot unless soft labels)
    lrs: torch.Tensor      # n = s * epochs learned learning rates
    meta: dict = field(default_factory=dict)

    @property
    def steps(self):
        return self.points.shape[0]


def _dtype(config):
    return getattr(torch, config.dtype)


def restart_seed(config, r):
    """Seed of restart r's generator (its points, rates, batch order and model draws)."""
    return config.seed * 1000 + r


def _names(restarts):
    """'restart 3' or 'restarts 0-9', for messages."""
    if len(restarts) == 1:
        return f"restart {restarts[0]}"
    if list(restarts) == list(range(restarts[0], restarts[-1] + 1)):
        return f"restarts {restarts[0]}-{restarts[-1]}"
    return "restarts " + ", ".join(str(r) for r in restarts)


def batches(config):
    """The restarts of each batch: consecutive runs of --batch-restarts (default all) restarts."""
    size = config.batch_restarts or config.restarts
    return [list(range(a, min(a + size, config.restarts))) for a in range(0, config.restarts, size)]


class _State:
    """Learned tensors of a batch of R restarts (leading dimension R) plus the outer optimiser.

    The optimiser steps one leaf per restart and tensor, each a view into the batch's tensor, and the
    outer step's softplus and softmax run row by row: vectorised kernels round the elements of their
    scalar tail differently, and stacking restarts would move which elements fall there, so each
    restart's outer step sees exactly the tensors it sees when run alone."""

    def __init__(self, config, split, gens):
        dt = _dtype(config)
        C, d, k = split.n_classes, split.n_features, config.per_class
        s, n, R = config.steps, config.n_inner, len(gens)
        self.classes = torch.arange(C).repeat_interleave(k)            # B labels of every step
        onehot = models.one_hot(self.classes, C, dt).expand(R, s, -1, -1).contiguous()
        self.points = torch.stack([torch.randn(s, C * k, d, generator=g, dtype=torch.float64) for g in gens]).to(dt)
        self.label_logits = None
        self.onehot = onehot
        if config.soft_labels:
            # start near the hard labels (SLDD initialises y~ from the one-hot encoding)
            self.label_logits = torch.log(onehot * 0.9 + 0.1 / C)
        # eta = softplus(rho): rates stay positive and Adam's fixed step is relative for small rates
        eta0 = torch.tensor(config.lr_init, dtype=torch.float64)
        self.lr_raw = torch.full((R, n), float(eta0 + torch.log(-torch.expm1(-eta0))), dtype=dt)
        names = ["points"] + (["label_logits"] if config.soft_labels else []) + (["lr_raw"] if config.learn_lrs else [])
        # detach() shares the storage: the optimiser's in-place steps on a leaf land in the batch's tensor
        self.leaves = {key: [t.detach().requires_grad_() for t in getattr(self, key)] for key in names}
        self.opt = torch.optim.Adam([self.leaves[key][i] for i in range(R) for key in names], lr=config.outer_lr)

    @property
    def lrs(self):
        return torch.stack([torch.nn.functional.softplus(row) for row in self.lr_raw])

    def targets(self):
        if self.label_logits is None:
            return self.onehot
        return torch.stack([torch.softmax(row, -1) for row in self.label_logits])

    def set_grads(self, gx, gp, glr):
        """The learned leaves' gradients from dL/dpoints, dL/dlabels, dL/drates (each R x ...)."""
        for i in range(gx.shape[0]):
            self.leaves["points"][i].grad = gx[i].clone()
            with torch.enable_grad():
                if "label_logits" in self.leaves:
                    leaf = self.leaves["label_logits"][i]
                    leaf.grad, = torch.autograd.grad(torch.softmax(leaf, -1), leaf, gp[i])
                if "lr_raw" in self.leaves:
                    leaf = self.leaves["lr_raw"][i]
                    leaf.grad, = torch.autograd.grad(torch.nn.functional.softplus(leaf), leaf, glr[i])

    def state_dict(self):
        out = {"points": self.points.detach().clone(), "lr_raw": self.lr_raw.detach().clone(),
               "optimizer": self.opt.state_dict()}
        if self.label_logits is not None:
            out["label_logits"] = self.label_logits.detach().clone()
        return out

    def non_finite(self):
        """(batch index, names) of the first restart whose learned quantities hold inf or nan, else None
        (they must never be saved or returned)."""
        parts = {"points": self.points, "learning rates": self.lrs, "labels": self.targets()}
        bad = {k: ~torch.isfinite(t).flatten(1).all(1) for k, t in parts.items()}
        for i in range(self.points.shape[0]):
            names = [k for k, b in bad.items() if bool(b[i])]
            if names:
                return i, names
        return None

    def load_state_dict(self, saved, restarts, where="the checkpoint"):
        """Loads a checkpoint's tensors; one that does not fit this configuration is refused first."""
        fix = (f"it does not fit the configuration; delete {where} to run {_names(restarts)} from the start, or "
               "start a new --out")
        expected = {"points": self.points, "lr_raw": self.lr_raw}
        if self.label_logits is not None:
            expected["label_logits"] = self.label_logits
        elif "label_logits" in saved:
            raise DistillError(f"--resume: {where} holds learned labels but the run has no --soft-labels; {fix}")
        for key, t in expected.items():
            got = saved.get(key)
            if not isinstance(got, torch.Tensor) or got.shape != t.shape or got.dtype != t.dtype:
                desc = f"{tuple(got.shape)} {got.dtype}" if isinstance(got, torch.Tensor) else "absent"
                raise DistillError(f"--resume: {where}: {key} is {desc}, expected {tuple(t.shape)} {t.dtype}; {fix}")
        try:
            self.opt.load_state_dict(saved["optimizer"])
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise DistillError(f"--resume: {where}: its optimizer state does not fit ({exc}); {fix}") from None
        with torch.no_grad():
            for key, t in expected.items():
                t.copy_(saved[key])

    def result(self, metas):
        """One DistilledSet per restart of the batch."""
        labels = self.targets().detach()
        return [DistilledSet(self.points[i].detach().clone(), labels[i].clone(), self.lrs[i].clone(), meta)
                for i, meta in enumerate(metas)]


def _draw_models(config, split, gen, dt):
    """theta_0 of one restart's m models, identical on every rank (drawn from the restart's generator)."""
    return [models.init_params(models.layer_sizes(config.arch[j % len(config.arch)], split.n_features,
                                                  split.n_classes, config.hidden), 1, gen, dt)
            for j in range(config.models)]


def hypergradient(config, state, thetas, x_real, p_real, rank=0, world=1):
    """Sum of this rank's models' contributions, all-reduced; returns (loss, dx, dp, dlr), each with the
    batch's leading restart dimension R.

    thetas[i][j]: model j of the batch's restart i; x_real, p_real: R x b x . (each restart's real batch).
    """
    p_syn = state.targets()
    R = state.points.shape[0]
    mine = [j for j in range(config.models) if j % world == rank]
    groups = {}
    for j in mine:  # same-architecture models of all restarts: one stacked unroll per architecture
        groups.setdefault(config.arch[j % len(config.arch)], []).append(j)
    loss = torch.zeros(R, dtype=state.points.dtype)
    gx = torch.zeros_like(state.points)
    gp = torch.zeros_like(p_syn)
    glr = torch.zeros_like(state.lrs)
    for members in groups.values():
        # restart-major: restart i's models at rows i*m .. i*m + m - 1, as hypergrad expects
        params0 = [torch.cat(ts, 0) for ts in zip(*[thetas[i][j] for i in range(R) for j in members])]
        if config.hypergrad == "unroll":
            h = hg.unrolled_hypergrad(params0, state.points, p_syn, state.lrs, x_real, p_real,
                                      m_total=config.models, checkpoint_every=config.checkpoint_every)
        else:
            h = hg.implicit_distill_hypergrad(params0, state.points, p_syn, state.lrs, x_real, p_real,
                                              m_total=config.models, terms=config.neumann_terms,
                                              alpha=config.neumann_alpha)
        loss += h.loss
        gx += h.points
        gp += h.labels
        glr += h.lrs
    if world > 1:
        import torch.distributed as dist
        flat = torch.cat([loss, gx.reshape(-1), gp.reshape(-1), glr.reshape(-1)])
        dist.all_reduce(flat)
        loss, i = flat[:R], R
        gx = flat[i:i + gx.numel()].view_as(gx)
        i += gx.numel()
        gp = flat[i:i + gp.numel()].view_as(gp)
        i += gp.numel()
        glr = flat[i:].view_as(glr)
    return loss, gx, gp, glr


def _apply(config, state, gx, gp, glr):
    state.opt.zero_grad(set_to_none=True)
    state.set_grads(gx, gp, glr)
    state.opt.step()


def _first_non_finite(loss, gx, gp, glr):
    """Batch index of the first restart with a non-finite loss or hypergradient, else None."""
    ok = torch.isfinite(loss)
    for t in (gx, gp, glr):
        ok &= torch.isfinite(t).flatten(1).all(1)
    bad = (~ok).nonzero()
    return int(bad[0, 0]) if bad.numel() else None


def distill(config, out_dir=None, restart=0, progress=True, split=None, _resume_state=None):
    """Distil one restart alone; returns DistilledSet(points, labels, lrs).

    out_dir: where the per-epoch checkpoint ``checkpoint.pt`` goes (None: no checkpoints).
    """
    return distill_batch(config, [restart], out_dir, progress, split, _resume_state)[0]


def distill_batch(config, restarts, out_dir=None, progress=True, split=None, _resume_state=None):
    """Distil the given restarts together (one batched outer loop); returns one DistilledSet per restart.

    Restart r's set equals the one ``distill(config, restart=r)`` returns up to floating-point rounding.
    """
    with models.one_thread():
        return _distill(config, out_dir, list(restarts), progress, split, _resume_state)


def _distill(config, out_dir, restarts, progress, split, _resume_state):
    config.validate()
    dt = _dtype(config)
    split = load_split(config, dt) if split is None else split
    rank, world = rank_world()
    gens = [torch.Generator().manual_seed(restart_seed(config, r)) for r in restarts]
    state = _State(config, split, gens)
    fixed = [_draw_models(config, split, g, dt) for g in gens] if config.fixed_init else None
    N = split.x_train.shape[0]
    iters = math.ceil(N / config.batch_size)
    epoch, start_iter, perm = 0, 0, None   # perm: R x N, each restart's batch order of this epoch
    losses = [[] for _ in restarts]
    ckpt = os.path.join(out_dir, "checkpoint.pt") if out_dir and rank == 0 else None
    saved = None  # (epoch, iteration) of this batch's checkpoint on disk
    if _resume_state is not None:
        where = os.path.join(out_dir, "checkpoint.pt") if out_dir else "the checkpoint"
        state.load_state_dict(_resume_state, restarts, where)
        epoch, start_iter, perm, fixed, gen_states, losses = _resume_position(
            config, _resume_state, where, restarts, iters, N, fixed, dt)
        for g, st in zip(gens, gen_states):
            g.set_state(st)
        saved = (epoch, start_iter)

    def gen_states():
        return [g.get_state() for g in gens]

    def save(ep, it, pm, states):
        if ckpt is None:
            return
        st = state.state_dict()
        st.update(restarts=list(restarts), epoch=ep, iteration=it, generator=states,
                  losses=[list(l) for l in losses])
        if pm is not None:
            st["perm"] = pm
        if fixed is not None:
            st["fixed_init"] = fixed
        io.save_checkpoint(st, ckpt)
        nonlocal saved
        saved = (ep, it)

    def stop(i, what, detail=""):
        where = f"restart {restarts[i]}, outer epoch {epoch}, iteration {it}"
        raise DistillError(f"{what} at {where}{detail}{_kept(ckpt, restarts[i], saved)}; nothing was written from "
                           "the diverged state. Try a lower --outer-lr or --lr-init, or fewer --steps/--epochs, "
                           "in a new --out")

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        name = f"r{restarts[0]}" + (f"-{restarts[-1]}" if len(restarts) > 1 else "")
        bar = tqdm(total=config.outer_epochs * iters, initial=epoch * iters + start_iter,
                   desc=f"distill {name}", unit="it", leave=False)
    p_real_all = models.one_hot(split.y_train, split.n_classes, dt)
    # where a resumed run continues from the current tensors: updated whenever they change, so Ctrl-C
    # at any moment saves a consistent state (an interrupted iteration is simply rerun)
    resume_point = (epoch, start_iter, perm, gen_states())
    try:
        while epoch < config.outer_epochs:
            if perm is None:
                perm = torch.stack([torch.randperm(N, generator=g) for g in gens])
            for it in range(start_iter, iters):
                resume_point = (epoch, it, perm, gen_states())
                idx = perm[:, it * config.batch_size:(it + 1) * config.batch_size]
                thetas = fixed if fixed is not None else [_draw_models(config, split, g, dt) for g in gens]
                loss, gx, gp, glr = hypergradient(config, state, thetas, split.x_train[idx], p_real_all[idx],
                                                  rank, world)
                bad = _first_non_finite(loss, gx, gp, glr)
                if bad is not None:
                    stop(bad, "non-finite hypergradient", f" (outer loss {float(loss[bad])})")
                _apply(config, state, gx, gp, glr)
                bad = state.non_finite()
                if bad:  # a huge outer step overflows the state while the gradient was still finite
                    stop(bad[0], f"non-finite {', '.join(bad[1])} after the outer step")
                for l, v in zip(losses, loss.tolist()):
                    l.append(v)
                resume_point = (epoch, it + 1, perm, gen_states())
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{sum(loss.tolist()) / len(restarts):.4f}", epoch=epoch)
            epoch, start_iter, perm = epoch + 1, 0, None
            save(epoch, 0, None, gen_states())
            resume_point = (epoch, 0, None, gen_states())
    except KeyboardInterrupt:
        if ckpt:
            save(*resume_point)
            print(f"\ninterrupted: state saved to {ckpt}; continue with --resume")
        raise
    finally:
        if bar is not None:
            bar.close()
    metas = [{"restart": r, "steps": config.steps, "epochs": config.epochs, "per_class": config.per_class,
              "n_classes": split.n_classes, "n_features": split.n_features, "arch": list(config.arch),
              "hidden": config.hidden, "seed": config.seed, "losses": l,
              "classes": [str(c) for c in split.classes]} for r, l in zip(restarts, losses)]
    return state.result(metas)


def _kept(ckpt, restart, saved):
    """Which checkpoint holds the last finite state of ``restart``, for an error message."""
    if ckpt is None:
        return ""
    if saved is None:
        return f"; no checkpoint of restart {restart} was written yet"
    epoch, it = saved
    at = f"after {epoch} outer epoch(s)" + (f" and {it} iteration(s)" if it else "")
    return f"; the last good checkpoint, {ckpt}, holds restart {restart} {at}"


def _resume_position(config, saved, where, restarts, iters, n_train, fixed, dt):
    """(epoch, iteration, permutations, fixed initialisations, generator states, losses) of a checkpoint,
    checked against the run."""
    fix = f"delete {where} to run {_names(restarts)} from the start, or start a new --out"
    R = len(restarts)
    epoch, it, perm = saved["epoch"], saved["iteration"], saved.get("perm")
    if not (isinstance(epoch, int) and isinstance(it, int) and 0 <= epoch <= config.outer_epochs
            and 0 <= it <= iters):
        raise DistillError(f"--resume: {where}: position (outer epoch {epoch!r}, iteration {it!r}) is outside the "
                           f"run's {config.outer_epochs} epochs x {iters} iterations; {fix}")
    if perm is not None and not (isinstance(perm, torch.Tensor) and perm.shape == (R, n_train)):
        raise DistillError(f"--resume: {where}: its batch order does not fit the {n_train} training rows; {fix}")
    gen_states, losses = saved["generator"], saved.get("losses", [[] for _ in restarts])
    if not (isinstance(gen_states, list) and len(gen_states) == R and isinstance(losses, list)
            and len(losses) == R):
        raise DistillError(f"--resume: {where}: its random streams do not fit the {R} restart(s) of the batch; "
                           f"{fix}")
    if config.fixed_init:
        shapes = [[[tuple(t.shape) for t in th] for th in f] for f in fixed]
        got = saved.get("fixed_init")
        if not isinstance(got, list) or [[[tuple(t.shape) for t in th] for th in f] for f in got] != shapes:
            raise DistillError(f"--resume: {where}: its fixed initialisations do not fit --fixed-init; {fix}")
        fixed = [[[t.to(dt) for t in th] for th in f] for f in got]
    return epoch, it, perm, fixed, gen_states, [list(l) for l in losses]


def _check_set(ds, config, split, path):
    """A finished restart read back for --resume must fit the configuration and be finite."""
    B, C = config.per_class * split.n_classes, split.n_classes
    want = {"points": (config.steps, B, split.n_features), "labels": (config.steps, B, C), "lrs": (config.n_inner,)}
    for key, shape in want.items():
        t = getattr(ds, key)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != _dtype(config):
            raise DistillError(f"--resume: {path}: {key} does not fit the configuration (expected {shape} "
                               f"{config.dtype}); delete it to run that restart again, or start a new --out")
        if not bool(torch.isfinite(t).all()):
            raise DistillError(f"--resume: {path}: {key} holds non-finite values; delete it to run that "
                               "restart again, or start a new --out")


def distill_restarts(config, out_dir=None, progress=True, resume=False, split=None, on_restart=None):
    """All --restarts, in the batches of ``batches(config)``; each finished restart is written to
    out_dir/distilled_r{r}.pt as soon as its batch is done.

    resume: reuse the finished restarts' files and continue from ``checkpoint.pt``. A batch with a
    restart left to distil runs whole (its finished restarts come out with the same bits; their files
    are kept), so that every restart is computed in the batch it belongs to.
    on_restart(r): called (on rank 0) after restart r was computed and written.
    """
    config.validate()
    split = load_split(config, _dtype(config)) if split is None else split
    rank, _ = rank_world()
    results = [None] * config.restarts
    ckpt_path = os.path.join(out_dir, "checkpoint.pt") if out_dir else None
    ckpt_state = None
    for batch in batches(config):
        done = {r: os.path.join(out_dir, f"distilled_r{r}.pt") if out_dir else None for r in batch}
        for r in batch:
            if resume and done[r] and os.path.exists(done[r]):
                ds = io.load_distilled(done[r])
                _check_set(ds, config, split, done[r])
                results[r] = ds
        todo = [r for r in batch if results[r] is None]
        if not todo:
            continue
        if resume and ckpt_state is None and os.path.exists(ckpt_path):
            # read once: rerunning an earlier batch overwrites the file, not this copy
            ckpt_state = io.load_checkpoint(ckpt_path)
        state = ckpt_state if ckpt_state is not None and list(ckpt_state["restarts"]) == batch else None
        sets = distill_batch(config, batch, out_dir, progress=progress, split=split, _resume_state=state)
        for r, ds in zip(batch, sets):
            if r not in todo:
                continue
            if done[r] and rank == 0:
                io.save_distilled(ds, done[r])
                if on_restart is not None:
                    on_restart(r)
            results[r] = ds
    return results
