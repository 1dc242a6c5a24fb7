"""The three tasks of the comparison: data and the EB / IB version of each model.

Each task is a ``Task`` with training tensors, a loss and ``build(method)`` returning a model whose
hidden layers are explicit (``"eb"``) or implicit (``"ib"``); the output layer is a plain nn.Linear
in both (as a linear softmax / linear read-out, IB equals EB up to the decay there).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from torchopt_ext.nn import Arctan, ImplicitLinear, ImplicitRNN


@dataclass
class Task:
    """A training problem: inputs x, targets y, a loss and a model factory per method.

    ``lengths`` (variable-length sequences padded to a common length) lets training cut each
    minibatch to its longest sequence; ``clip``, when set, adds the method "eb-clip" (EB with the
    gradient norm clipped at ``clip``); ``held_out`` maps a name to (x, y) scored after training;
    ``info`` is recorded in the results as it is."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    build: Callable[[str], nn.Module]
    batch: int = 100
    lengths: Optional[torch.Tensor] = None
    clip: Optional[float] = None
    held_out: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def _digits(limit=None):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    if limit:
        x, y = x[:limit], y[:limit]
    return x, y


def digits_classifier(limit=None) -> Task:
    """The paper's UCI architecture on digits: 3 arctan layers as wide as the input (64), then a
    linear softmax layer; features standardised; cross-entropy."""
    x, y = _digits(limit)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    n = x.shape[1]

    def build(method):
        if method == "ib":
            hidden = [ImplicitLinear(n, n, "arctan") for _ in range(3)]
        else:
            hidden = [m for _ in range(3) for m in (nn.Linear(n, n), Arctan())]
        return nn.Sequential(*hidden, nn.Linear(n, 10))

    return Task("digits-mlp", x, y, nn.functional.cross_entropy, build)


def digits_autoencoder(limit=None) -> Task:
    """A relu autoencoder 64-32-16-32-64 on digits scaled to [0, 1]; mean squared error."""
    x, _ = _digits(limit)
    x = x / 16.0
    sizes = [64, 32, 16, 32]

    def build(method):
        layers = []
        for a, b in zip(sizes, sizes[1:]):
            layers += [ImplicitLinear(a, b, "relu")] if method == "ib" else [nn.Linear(a, b), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(sizes[-1], 64))

    return Task("digits-autoencoder", x, x, nn.functional.mse_loss, build)


class _ArctanRNN(nn.Module):
    """Elman RNN with arctan, explicit backprop (torch.nn.RNN only offers tanh and relu)."""

    def __init__(self, n_in, hidden):
        super().__init__()
        self.cell_in = nn.Linear(n_in, hidden)
        self.cell_h = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x):
        h = x.new_zeros(x.shape[1], self.cell_h.in_features)
        for t in range(x.shape[0]):
            h = torch.atan(self.cell_in(x[t]) + self.cell_h(h))
        return h


class _Readout(nn.Module):
    def __init__(self, rnn, hidden):
        super().__init__()
        self.rnn, self.out = rnn, nn.Linear(hidden, 1)

    def forward(self, x):  # x: (B, T, 2) -> (B,)
        h = self.rnn(x.transpose(0, 1))
        if isinstance(h, tuple):
            h = h[1][-1]
        return self.out(h).squeeze(-1)


def adding_problem(n_seq=1000, steps=10, hidden=16, seed=1234) -> Task:
    """The adding problem: each step carries (value ~ U(0,1), marker); the target is the sum of the
    two marked values. An arctan RNN (hidden 16) reads the last state linearly; mean squared error."""
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(n_seq, steps, generator=g)
    marks = torch.zeros(n_seq, steps)
    for i in range(n_seq):
        marks[i, torch.randperm(steps, generator=g)[:2]] = 1.0
    x = torch.stack([values, marks], -1)
    y = (values * marks).sum(1)

    def build(method):
        rnn = ImplicitRNN(2, hidden, "arctan") if method == "ib" else _ArctanRNN(2, hidden)
        return _Readout(rnn, hidden)

    return Task("adding-rnn", x, y, nn.functional.mse_loss, build)


class ExplicitArctanRNN(nn.Module):
    """One-layer Elman RNN with arctan trained by explicit backprop: what torch.nn.RNN would be with
    an arctan nonlinearity. Parameters, their order, initialisation and the (output, h_n) return
    match ImplicitRNN(n_in, hidden, "arctan"), so both start from the same weights under one seed."""

    def __init__(self, n_in, hidden):
        super().__init__()
        self.hidden_size = hidden
        self.weight_ih_l0 = nn.Parameter(torch.empty(hidden, n_in))
        self.weight_hh_l0 = nn.Parameter(torch.empty(hidden, hidden))
        self.bias_l0 = nn.Parameter(torch.empty(hidden))
        bound = 1.0 / hidden ** 0.5
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x):  # x: (T, B, n_in)
        h = x.new_zeros(x.shape[1], self.hidden_size)
        pre = torch.nn.functional.linear(x, self.weight_ih_l0, self.bias_l0)
        outs = []
        for t in range(x.shape[0]):
            h = torch.atan(torch.addmm(pre[t], h, self.weight_hh_l0.t()))
            outs.append(h)
        return torch.stack(outs), h.unsqueeze(0)


class _NextFrame(nn.Module):
    """RNN over the frames, then a linear layer giving each key's logit for the next frame."""

    def __init__(self, rnn, hidden, keys):
        super().__init__()
        self.rnn, self.out = rnn, nn.Linear(hidden, keys)

    def forward(self, x):  # x: (B, T, keys) -> logits (B, T, keys)
        h, _ = self.rnn(x.transpose(0, 1))
        return self.out(h).transpose(0, 1)


def _glorot_zero_bias(model: nn.Module) -> None:
    """The paper's initialisation: weights U(+-sqrt(6/(fan_in+fan_out))), biases 0."""
    for p in model.parameters():
        if p.dim() == 2:
            nn.init.xavier_uniform_(p)
        else:
            nn.init.zeros_(p)


def jsb_chorales(hidden=300, limit=None, data_root=None, clip: Optional[float] = 8.0,
                 split_seed=0, progress=True) -> Task:
    """Next-frame prediction on the music21 Bach chorales (compare.music): an arctan RNN
    (ImplicitRNN for IB, ExplicitArctanRNN otherwise) and a linear layer give 88 key logits for
    frame t+1 from frames <= t; loss compare.music.frame_nll; batch 1 (one chorale per step);
    training on the train part of the 229/76/77 split, valid and test scored after training.
    ``limit`` keeps the first ``limit`` score files (in name order) for quick runs."""
    from torchopt_ext.compare import music

    paths = music.corpus_paths()
    if limit:
        paths = paths[:limit]
    names, rolls = music.load_rolls(paths, data_root=data_root, progress=progress)
    parts = music.split(names, seed=split_seed)
    data = {k: music.next_frame_tensors([rolls[i] for i in idx]) for k, idx in parts.items() if idx}
    x, y, lengths = data["train"]

    def build(method):
        rnn = ImplicitRNN(music.KEYS, hidden, "arctan") if method == "ib" else ExplicitArctanRNN(music.KEYS, hidden)
        model = _NextFrame(rnn, hidden, music.KEYS)
        _glorot_zero_bias(model)
        return model

    info = {"chorales": len(names), "split_seed": split_seed, "hidden": hidden,
            "split": {k: len(v) for k, v in parts.items()},
            "frames": {k: int(v[2].sum()) for k, v in data.items()}}
    return Task("jsb-chorales", x, y, music.frame_nll, build, batch=1, lengths=lengths, clip=clip,
                held_out={k: data[k][:2] for k in ("valid", "test") if k in data}, info=info)
