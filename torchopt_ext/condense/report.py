"""results.md from results.json: the field's table (rows methods, columns ipc per evaluation net)."""
from __future__ import annotations

from torchopt_ext.condense.evaluate import protocol_text


def row_order(methods):
    """random first, the whole-data row last, the others as given."""
    middle = [m for m in methods if m not in ("random", "whole")]
    return (["random"] if "random" in methods else []) + middle + (["whole"] if "whole" in methods else [])


def cell_name(method: str, ipc) -> str:
    """The file stem of a grid cell: ``<method>_ipc<k>``, or ``whole`` (one cell, ipc does not apply)."""
    return "whole" if method == "whole" else f"{method}_ipc{ipc}"


def _nets(cfg: dict) -> str:
    several = cfg.get("distill_nets") or []
    return f"{cfg['net']} net" if len(several) < 2 else "nets " + ", ".join(several) + " (one drawn per iteration)"


def results_markdown(results: dict) -> str:
    """The table in percent, mean ± std over the evaluation nets, then the protocol, data and command."""
    cfg = results["config"]
    nets = list(cfg["eval_nets"] or [cfg["net"]])
    ipcs = cfg["ipcs"]
    cells = results["cells"]
    methods = row_order([m for m in cfg["methods"] if m != "whole"] + (["whole"] if "whole" in cells else []))
    several = len(nets) > 1
    header = [f"{n}, ipc {k}" if several else f"ipc {k}" for n in nets for k in ipcs]
    lines = ["| method | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for m in methods:
        out = []
        for n in nets:
            for k in ipcs:
                ev = cells.get(cell_name(m, k), {}).get("eval", {}).get(n)
                out.append("—" if ev is None else f"{100 * ev['mean']:.1f} ± {100 * ev['std']:.1f}")
        label = f"whole ({cells['whole']['n_images']} images)" if m == "whole" else m
        lines.append(f"| {label} | " + " | ".join(out) + " |")
    data = results["data"]
    memory = memory_markdown(cells, [m for m in methods if m != "whole"], ipcs)
    notes = [f"Test accuracy in %, mean ± std over {cfg['eval_models']} evaluation nets. "
             + protocol_text(cfg["eval_models"], cfg["eval_epochs"], cfg["eval_optimizer"], cfg["use_learned_lrs"],
                           cfg.get("eval_augment", False))]
    if "whole" in cells and cfg.get("whole_epochs") and cfg["whole_epochs"] != cfg["eval_epochs"]:
        notes.append(f"The whole-data row is trained for {cfg['whole_epochs']} epochs instead (its value is "
                     "repeated in every ipc column: ipc does not apply to it).")
    elif "whole" in cells:
        notes.append("The whole-data row is one evaluation, repeated in every ipc column (ipc does not apply).")
    zca = ", ZCA-whitened" if data["zca"] else ""
    notes.append(f"Data: {data['name']}, {data['n_train']} training / {data['n_test']} test images of shape "
                 f"{'x'.join(str(s) for s in data['shape'])}, standardised per channel{zca}; split: "
                 f"{data['split'].get('kind', '')}. Methods distil with the {_nets(cfg)} (width {cfg['width']}, "
                 f"depth {cfg['depth'] or 'default'}; a method's own --<method>-width, where it has one, sets its "
                 f"inner net's width: see each cell's options in results.json); seed {cfg['seed']}.")
    wall = sum(c.get("method_wall_s", 0) + sum(sum(e["wall_s"]) for e in c["eval"].values()) for c in cells.values())
    shared = results.get("prepare_wall_s") or {}
    shared_text = "".join(f"; {m}'s shared work before the cells {s:.0f} s" for m, s in shared.items())
    notes.append(f"Wall time of the cells: {wall:.0f} s{shared_text} (per cell and per net in results.json).")
    notes.append(f"Command: `{results['command']}`")
    return ("# Condensation results\n\n" + "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"
            + (memory and "\n" + memory))


def held_bytes(meta: dict):
    """The bytes of tensors the method counts as held in one outer iteration (its peak; torchopt_ext/condense/memory.py),
    None when it counts none: the unrolls' parameter copies (dd, ld, gtn, mtt), the tensors autograd saved
    (dc, dsa, dm, kip)."""
    for key in ("peak_state_bytes", "peak_held_bytes"):
        if meta.get(key):
            return meta[key]
    return max(meta["held_bytes"]) if meta.get("held_bytes") else None


def memory_markdown(cells: dict, methods, ipcs) -> str:
    """The memory table (MiB held per outer iteration, per cell); empty when no cell counted any."""
    rows, any_value = [], False
    for m in methods:
        out = []
        for k in ipcs:
            held = held_bytes(cells.get(cell_name(m, k), {}).get("meta", {}))
            any_value = any_value or held is not None
            out.append("—" if held is None else f"{held / 2 ** 20:.1f}")
        rows.append(f"| {m} | " + " | ".join(out) + " |")
    if not any_value:
        return ""
    return ("## Memory per outer iteration (MiB)\n\n| method | " + " | ".join(f"ipc {k}" for k in ipcs) + " |\n|---|"
            + "---|" * len(ipcs) + "\n" + "\n".join(rows) + "\n\nThe tensors a method holds at its peak in one "
            "outer iteration, counted as numel x element size (torchopt_ext/condense/memory.py): an unroll's parameter copies "
            "(dd, ld, gtn, mtt; fewer with --<method>-checkpoint-every), or the tensors the step keeps plus every "
            "storage autograd saves for backward (dc, dsa, dm, kip). No allocator slack, and the same on every "
            "machine.\n")
