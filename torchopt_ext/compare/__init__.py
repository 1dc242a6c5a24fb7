"""``python -m torchopt_ext compare``: the paper's robustness experiment, EB vs IB over a
learning-rate grid, on built-in data (sklearn digits, a digits autoencoder, a synthetic sequence)."""
