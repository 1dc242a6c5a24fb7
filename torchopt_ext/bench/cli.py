"""``python -m torchopt_ext bench``: placeholder wired up below."""


def add_parser(sub):
    p = sub.add_parser("bench", help="kernel and layer microbenchmarks, printed as ratios")
    p.set_defaults(func=lambda args: 0)
    return p
