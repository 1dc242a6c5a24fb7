"""The outer loop: Adam on synthetic points, (soft) labels and per-step learning rates."""
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


class _State:
    """Learned tensors of one restart plus the outer optimiser."""

    def __init__(self, config, split, gen):
        dt = _dtype(config)
        C, d, k = split.n_classes, split.n_features, config.per_class
        s, n = config.steps, config.n_inner
        self.classes = torch.arange(C).repeat_interleave(k)            # B labels of every step
        onehot = models.one_hot(self.classes, C, dt).expand(s, -1, -1).contiguous()
        self.points = torch.randn(s, C * k, d, generator=gen, dtype=torch.float64).to(dt).requires_grad_()
        self.label_logits = None
        self.onehot = onehot
        if config.soft_labels:
            # start near the hard labels (SLDD initialises y~ from the one-hot encoding)
            self.label_logits = torch.log(onehot * 0.9 + 0.1 / C).requires_grad_()
        # eta = softplus(rho): rates stay positive and Adam's fixed step is relative for small rates
        eta0 = torch.tensor(config.lr_init, dtype=torch.float64)
        self.lr_raw = torch.full((n,), float(eta0 + torch.log(-torch.expm1(-eta0))), dtype=dt).requires_grad_()
        learned = [self.points] + ([self.label_logits] if config.soft_labels else []) + \
            ([self.lr_raw] if config.learn_lrs else [])
        self.opt = torch.optim.Adam(learned, lr=config.outer_lr)

    @property
    def lrs(self):
        return torch.nn.functional.softplus(self.lr_raw).detach()

    def targets(self):
        return torch.softmax(self.label_logits, -1) if self.label_logits is not None else self.onehot

    def state_dict(self):
        out = {"points": self.points.detach().clone(), "lr_raw": self.lr_raw.detach().clone(),
               "optimizer": self.opt.state_dict()}
        if self.label_logits is not None:
            out["label_logits"] = self.label_logits.detach().clone()
        return out

    def non_finite(self):
        """Names of the learned quantities holding inf or nan (they must never be saved or returned)."""
        parts = {"points": self.points, "learning rates": self.lrs, "labels": self.targets()}
        return [k for k, t in parts.items() if not bool(torch.isfinite(t).all())]

    def load_state_dict(self, saved, where="the checkpoint"):
        """Loads a checkpoint's tensors; one that does not fit this configuration is refused first."""
        fix = (f"it does not fit the configuration; delete {where} to run this restart from its start, or start a "
               "new --out")
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

    def result(self, meta):
        return DistilledSet(self.points.detach().clone(), self.targets().detach().clone(),
                            self.lrs.detach().clone(), meta)


def _draw_models(config, split, gen, dt):
    """theta_0 of all m models, identical on every rank (drawn from the shared generator)."""
    return [models.init_params(models.layer_sizes(config.arch[j % len(config.arch)], split.n_features,
                                                  split.n_classes, config.hidden), 1, gen, dt)
            for j in range(config.models)]


def hypergradient(config, state, thetas, x_real, p_real, rank=0, world=1):
    """Sum of this rank's models' contributions, all-reduced; returns (loss, dx, dp, dlr)."""
    p_syn = state.targets()
    mine = [j for j in range(config.models) if j % world == rank]
    groups = {}
    for j in mine:  # stack same-architecture models: one batched unroll per architecture
        groups.setdefault(config.arch[j % len(config.arch)], []).append(thetas[j])
    loss = torch.zeros((), dtype=state.points.dtype)
    gx = torch.zeros_like(state.points)
    gp = torch.zeros_like(p_syn)
    glr = torch.zeros_like(state.lrs)
    for members in groups.values():
        params0 = [torch.cat(ts, 0) for ts in zip(*members)]
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
        flat = torch.cat([loss.reshape(1), gx.reshape(-1), gp.reshape(-1), glr.reshape(-1)])
        dist.all_reduce(flat)
        loss = flat[0]
        i = 1
        gx = flat[i:i + gx.numel()].view_as(gx); i += gx.numel()
        gp = flat[i:i + gp.numel()].view_as(gp); i += gp.numel()
        glr = flat[i:].view_as(glr)
    return float(loss), gx, gp, glr


def _apply(config, state, gx, gp, glr):
    state.opt.zero_grad(set_to_none=True)
    state.points.grad = gx.clone()
    if state.label_logits is not None:
        p = torch.softmax(state.label_logits, -1)
        state.label_logits.grad, = torch.autograd.grad(p, state.label_logits, gp)
    if config.learn_lrs:
        with torch.enable_grad():
            eta = torch.nn.functional.softplus(state.lr_raw)
            state.lr_raw.grad, = torch.autograd.grad(eta, state.lr_raw, glr)
    state.opt.step()


def distill(config, out_dir=None, restart=0, progress=True, split=None, _resume_state=None):
    """Distil one restart; returns DistilledSet(points, labels, lrs).

    out_dir: where the per-epoch checkpoint ``checkpoint.pt`` goes (None: no checkpoints).
    """
    with models.one_thread():
        return _distill(config, out_dir, restart, progress, split, _resume_state)


def _distill(config, out_dir, restart, progress, split, _resume_state):
    config.validate()
    dt = _dtype(config)
    split = load_split(config, dt) if split is None else split
    rank, world = rank_world()
    gen = torch.Generator().manual_seed(config.seed * 1000 + restart)
    state = _State(config, split, gen)
    fixed = _draw_models(config, split, gen, dt) if config.fixed_init else None
    N = split.x_train.shape[0]
    iters = math.ceil(N / config.batch_size)
    epoch, start_iter, perm = 0, 0, None
    losses = []
    ckpt = os.path.join(out_dir, "checkpoint.pt") if out_dir and rank == 0 else None
    saved = None  # (epoch, iteration) of this restart's checkpoint on disk
    if _resume_state is not None:
        where = os.path.join(out_dir, "checkpoint.pt") if out_dir else "the checkpoint"
        state.load_state_dict(_resume_state, where)
        epoch, start_iter, perm, fixed = _resume_position(config, _resume_state, where, iters, N, fixed, dt)
        gen.set_state(_resume_state["generator"])
        losses = list(_resume_state.get("losses", []))
        saved = (epoch, start_iter)

    def save(ep, it, pm, gen_state):
        if ckpt is None:
            return
        st = state.state_dict()
        st.update(restart=restart, epoch=ep, iteration=it, generator=gen_state, losses=list(losses))
        if pm is not None:
            st["perm"] = pm
        if fixed is not None:
            st["fixed_init"] = fixed
        io.save_checkpoint(st, ckpt)
        nonlocal saved
        saved = (ep, it)

    def stop(what, detail=""):
        where = f"restart {restart}, outer epoch {epoch}, iteration {it}"
        raise DistillError(f"{what} at {where}{detail}{_kept(ckpt, restart, saved)}; nothing was written from the "
                           "diverged state. Try a lower --outer-lr or --lr-init, or fewer --steps/--epochs, "
                           "in a new --out")

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=config.outer_epochs * iters, initial=epoch * iters + start_iter,
                   desc=f"distill r{restart}", unit="it", leave=False)
    p_real_all = models.one_hot(split.y_train, split.n_classes, dt)
    # where a resumed run continues from the current tensors: updated whenever they change, so Ctrl-C
    # at any moment saves a consistent state (an interrupted iteration is simply rerun)
    resume_point = (epoch, start_iter, perm, gen.get_state())
    try:
        while epoch < config.outer_epochs:
            if perm is None:
                perm = torch.randperm(N, generator=gen)
            for it in range(start_iter, iters):
                resume_point = (epoch, it, perm, gen.get_state())
                idx = perm[it * config.batch_size:(it + 1) * config.batch_size]
                thetas = fixed if fixed is not None else _draw_models(config, split, gen, dt)
                loss, gx, gp, glr = hypergradient(config, state, thetas, split.x_train[idx], p_real_all[idx],
                                                  rank, world)
                finite = math.isfinite(loss) and bool(torch.isfinite(gx).all() and torch.isfinite(gp).all()
                                                      and torch.isfinite(glr).all())
                if not finite:
                    stop("non-finite hypergradient", f" (outer loss {loss})")
                _apply(config, state, gx, gp, glr)
                bad = state.non_finite()
                if bad:  # a huge outer step overflows the state while the gradient was still finite
                    stop(f"non-finite {', '.join(bad)} after the outer step")
                losses.append(loss)
                resume_point = (epoch, it + 1, perm, gen.get_state())
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", epoch=epoch)
            epoch, start_iter, perm = epoch + 1, 0, None
            save(epoch, 0, None, gen.get_state())
            resume_point = (epoch, 0, None, gen.get_state())
    except KeyboardInterrupt:
        if ckpt:
            save(*resume_point)
            print(f"\ninterrupted: state saved to {ckpt}; continue with --resume")
        raise
    finally:
        if bar is not None:
            bar.close()
    meta = {"restart": restart, "steps": config.steps, "epochs": config.epochs, "per_class": config.per_class,
            "n_classes": split.n_classes, "n_features": split.n_features, "arch": list(config.arch),
            "hidden": config.hidden, "seed": config.seed, "losses": losses,
            "classes": [str(c) for c in split.classes]}
    return state.result(meta)


def _kept(ckpt, restart, saved):
    """Which checkpoint holds the last finite state of ``restart``, for an error message."""
    if ckpt is None:
        return ""
    if saved is None:
        return f"; no checkpoint of restart {restart} was written yet"
    epoch, it = saved
    at = f"after {epoch} outer epoch(s)" + (f" and {it} iteration(s)" if it else "")
    return f"; the last good checkpoint, {ckpt}, holds restart {restart} {at}"


def _resume_position(config, saved, where, iters, n_train, fixed, dt):
    """(epoch, iteration, permutation, fixed initialisations) of a checkpoint, checked against the run."""
    fix = f"delete {where} to run this restart from its start, or start a new --out"
    epoch, it, perm = saved["epoch"], saved["iteration"], saved.get("perm")
    if not (isinstance(epoch, int) and isinstance(it, int) and 0 <= epoch <= config.outer_epochs
            and 0 <= it <= iters):
        raise DistillError(f"--resume: {where}: position (outer epoch {epoch!r}, iteration {it!r}) is outside the "
                           f"run's {config.outer_epochs} epochs x {iters} iterations; {fix}")
    if perm is not None and not (isinstance(perm, torch.Tensor) and perm.shape == (n_train,)):
        raise DistillError(f"--resume: {where}: its batch order does not fit the {n_train} training rows; {fix}")
    if config.fixed_init:
        shapes = [[tuple(t.shape) for t in th] for th in fixed]
        got = saved.get("fixed_init")
        if not isinstance(got, list) or [[tuple(t.shape) for t in th] for th in got] != shapes:
            raise DistillError(f"--resume: {where}: its fixed initialisations do not fit --fixed-init; {fix}")
        fixed = [[t.to(dt) for t in th] for th in got]
    return epoch, it, perm, fixed


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
    """All --restarts; each finished restart is written to out_dir/distilled_r{r}.pt immediately.

    resume: reuse the finished restarts' files and continue from ``checkpoint.pt``.
    on_restart(r): called (on rank 0) after restart r was computed and written.
    """
    config.validate()
    split = load_split(config, _dtype(config)) if split is None else split
    rank, _ = rank_world()
    results = []
    ckpt_path = os.path.join(out_dir, "checkpoint.pt") if out_dir else None
    ckpt_state = None
    for r in range(config.restarts):
        done = os.path.join(out_dir, f"distilled_r{r}.pt") if out_dir else None
        if resume and done and os.path.exists(done):
            ds = io.load_distilled(done)
            _check_set(ds, config, split, done)
            results.append(ds)
            continue
        if resume and ckpt_state is None and os.path.exists(ckpt_path):
            # read once: rerunning an earlier restart overwrites the file, not this copy
            ckpt_state = io.load_checkpoint(ckpt_path)
        state = ckpt_state if ckpt_state is not None and ckpt_state["restart"] == r else None
        ds = distill(config, out_dir, restart=r, progress=progress, split=split, _resume_state=state)
        if done and rank == 0:
            io.save_distilled(ds, done)
            if on_restart is not None:
                on_restart(r)
        results.append(ds)
    return results
