"""Piano rolls of the Bach chorales shipped with music21 (the source of the JSB Chorales set).

A roll is a (T, 88) uint8 tensor: key k is MIDI note 21 + k (A0..C8), frame t is quarter note t of
the score, and key k is 1 in frame t when a sung note of that pitch sounds at the start of quarter
t (onset <= t < onset + duration, in quarter lengths from the start of the score). Only the vocal
parts count: parts whose name begins with Soprano, Alto, Tenor or Bass, so that doubling or
independent instrumental parts (horns, trumpets, timpani, continuo) do not add notes. Scores
without such parts are skipped. Repeats are not expanded and keys are not transposed.

Parsing all the chorales takes about a minute, so the rolls are cached in one .npz file under
``cache_dir()`` (or a ``data_root`` of your choosing), written atomically and reused while
music21's version and the list of source files are unchanged.
"""
from __future__ import annotations

import hashlib
import math
import os
from fractions import Fraction
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from torchopt_ext._atomic import atomic_open

KEYS = 88
LOWEST_MIDI = 21
VOICES = ("soprano", "alto", "tenor", "bass")
# the JSB Chorales set's train/valid/test sizes out of its 382 chorales
JSB_SPLIT = (229, 76, 77)
CACHE_FORMAT = 1
INSTALL_HINT = "pip install 'torchopt_ext[music]' (or: pip install music21)"


class Music21Missing(ImportError):
    """music21 is needed to build the rolls and is not installed."""


def _music21():
    try:
        import music21
    except ImportError as exc:
        raise Music21Missing(f"the jsb task needs music21, which is not installed ({exc}); "
                             f"install it with {INSTALL_HINT}") from exc
    return music21


def corpus_paths() -> List[str]:
    """The MusicXML scores (.mxl, .xml) in music21's corpus/bach folder, sorted by file name."""
    music21 = _music21()
    folder = os.path.join(os.path.dirname(music21.__file__), "corpus", "bach")
    names = sorted(f for f in os.listdir(folder) if f.endswith((".mxl", ".xml")))
    return [os.path.join(folder, f) for f in names]


def _is_voice(part) -> bool:
    words = (part.partName or "").split()
    return bool(words) and words[0].lower() in VOICES


def piano_roll(score) -> Optional[torch.Tensor]:
    """The (T, 88) uint8 roll of a music21 score's vocal parts; None when it has no vocal part.

    T is the vocal parts' length in quarter notes, rounded up. Pitches outside the piano's 88 keys
    are dropped (none occur in the chorales)."""
    parts = [p for p in score.parts if _is_voice(p)]
    if not parts:
        return None
    end = max(Fraction(p.highestTime) for p in parts)
    roll = torch.zeros(math.ceil(end), KEYS, dtype=torch.uint8)
    for part in parts:
        for n in part.flatten().notes:
            start = Fraction(n.offset)
            stop = start + Fraction(n.quarterLength)
            keys = [p.midi - LOWEST_MIDI for p in n.pitches if 0 <= p.midi - LOWEST_MIDI < KEYS]
            if keys:
                # frames whose start time t satisfies start <= t < stop
                roll[math.ceil(start):math.ceil(stop), keys] = 1
    return roll


def parse_chorale(path: str) -> Optional[torch.Tensor]:
    """Parse one score file and return its roll (None when it has no vocal part)."""
    music21 = _music21()
    # our own cache replaces music21's pickles, so nothing is written to its scratch folder
    score = music21.converter.parseFile(path, forceSource=True, storePickle=False)
    return piano_roll(score)


def cache_dir(data_root: Optional[str] = None) -> str:
    """``data_root`` if given, else $XDG_CACHE_HOME/torchopt_ext (default ~/.cache/torchopt_ext)."""
    if data_root:
        return data_root
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "torchopt_ext")


def cache_path(paths: Sequence[str], data_root: Optional[str] = None) -> str:
    """Where the rolls of ``paths`` are cached: the name hashes the format, music21's version and
    each source file's name and size, so a changed corpus gets a new file."""
    music21 = _music21()
    h = hashlib.sha256(f"{CACHE_FORMAT}|{music21.__version__}".encode())
    for p in paths:
        h.update(f"|{os.path.basename(p)}:{os.path.getsize(p)}".encode())
    return os.path.join(cache_dir(data_root), f"bach-rolls-{h.hexdigest()[:16]}.npz")


def _save(path: str, names: List[str], rolls: List[torch.Tensor], skipped: List[str]) -> None:
    with atomic_open(path, "wb") as f:  # readers see either no file or a complete one
        np.savez_compressed(
            f, format=np.array(CACHE_FORMAT), names=np.array(names, dtype=str),
            skipped=np.array(skipped, dtype=str),
            lengths=np.array([r.shape[0] for r in rolls], dtype=np.int64),
            frames=(torch.cat(rolls).numpy() if rolls else np.zeros((0, KEYS), np.uint8)))


def _load(path: str, expected: List[str]) -> Optional[Tuple[List[str], List[torch.Tensor]]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["format"]) != CACHE_FORMAT:
                return None
            names, skipped = [str(s) for s in z["names"]], [str(s) for s in z["skipped"]]
            lengths, frames = z["lengths"], z["frames"]
    except (OSError, ValueError, KeyError):
        return None
    if sorted(names + skipped) != sorted(expected) or int(lengths.sum()) != frames.shape[0]:
        return None
    rolls = list(torch.from_numpy(frames.copy()).split(lengths.tolist()))
    return names, rolls


def load_rolls(paths: Optional[Sequence[str]] = None, data_root: Optional[str] = None,
               progress: bool = False) -> Tuple[List[str], List[torch.Tensor]]:
    """(file names, rolls) of ``paths`` (default: ``corpus_paths()``), from the cache when it
    holds them, else parsed and cached. Scores without vocal parts are left out."""
    paths = list(corpus_paths() if paths is None else paths)
    expected = [os.path.basename(p) for p in paths]
    path = cache_path(paths, data_root)
    if os.path.exists(path):
        hit = _load(path, expected)
        if hit is not None:
            return hit
    names, rolls, skipped = [], [], []
    todo = paths
    if progress:
        from tqdm import tqdm

        todo = tqdm(paths, desc="parsing chorales", unit="file")
    for p in todo:
        roll = parse_chorale(p)
        if roll is None:
            skipped.append(os.path.basename(p))
        else:
            names.append(os.path.basename(p))
            rolls.append(roll)
    _save(path, names, rolls, skipped)
    return names, rolls


def split(names: Sequence[str], seed: int = 0, proportions: Sequence[int] = JSB_SPLIT) -> Dict[str, List[int]]:
    """Indices of a random train/valid/test split of ``names`` in the given proportions (train and
    valid rounded to the nearest piece, test the rest), drawn with a fixed-seed permutation of the
    names in sorted order, so the split depends only on the set of names and the seed."""
    order = sorted(range(len(names)), key=lambda i: names[i])
    perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [order[i] for i in perm]
    total = sum(proportions)
    n_train = round(len(names) * proportions[0] / total)
    n_valid = round(len(names) * proportions[1] / total)
    return {"train": shuffled[:n_train], "valid": shuffled[n_train:n_train + n_valid],
            "test": shuffled[n_train + n_valid:]}


def next_frame_tensors(rolls: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, y, lengths) for next-frame prediction: x[i, t] is frame t of roll i and y[i, t] frame
    t + 1, for t < lengths[i] = T_i - 1; padding is 0 in x and -1 in y (the loss's mask)."""
    lengths = torch.tensor([r.shape[0] - 1 for r in rolls], dtype=torch.long)
    if (lengths < 1).any():
        raise ValueError("next_frame_tensors: every roll needs at least 2 frames")
    t_max = int(lengths.max())
    x = torch.zeros(len(rolls), t_max, KEYS)
    y = torch.full((len(rolls), t_max, KEYS), -1.0)
    for i, r in enumerate(rolls):
        n = r.shape[0] - 1
        x[i, :n] = r[:-1].float()
        y[i, :n] = r[1:].float()
    return x, y, lengths


def frame_nll(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over pieces of each piece's mean over its frames of the Bernoulli negative
    log-likelihood summed over the 88 keys (nats); logits and y are (B, T, 88), y -1 on padding."""
    mask = (y[..., 0] >= 0).to(logits.dtype)
    nll = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, y.clamp(min=0), reduction="none").sum(-1)
    per_piece = (nll * mask).sum(1) / mask.sum(1)
    return per_piece.mean()
