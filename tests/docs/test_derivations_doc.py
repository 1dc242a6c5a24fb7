"""docs/derivations.md against the code it derives: every pointer into docs/derivations.md names
a section of the page, every solver in the headers carries such a pointer, and every tuned numeric
constant in the headers' code appears on the page beside its justification."""
import pathlib
import re

import pytest

ROOT = next(p for p in pathlib.Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
DOC = ROOT / "docs" / "derivations.md"
HEADERS = ROOT / "csrc" / "include" / "torchopt_ext"

# the functions (and row-constant structs) whose mathematics the page derives, by header
SOLVERS = {
    "ib_alpha_math.h": ["LinearRow", "alpha_relu_row", "alpha_identity_row", "alpha_arctan", "alpha_piecewise",
                        "alpha_odd3", "alpha_hardtanh"],
    "ib_alpha_fast32.h": ["Fast32Row", "alpha_hardtanh_fast32", "alpha_smoothstep_fast32",
                          "alpha_smoothstep_fast32_general", "alpha_arctan_fast32", "alpha_arctan_fast32_cardano"],
    "probe_math.h": ["newton_lr_update", "guarded_lr_update"],
}
POINTER = re.compile(r"docs/derivations\.md#([A-Za-z0-9_-]+)")
# a tuned number: one with an exponent or with two or more decimals (1e-12, 0.99, 1.9073486328125e-06);
# small exact constants such as 0.5, 1.5 or 1.0 / 3.0 are the formulas' own
TUNED = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?[eE][-+]?\d+|\d+\.\d{2,})")


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def code_of(text: str) -> str:
    """The header without its // comments (the headers have no /* */ comments or '//' in strings)."""
    return "\n".join(line.split("//", 1)[0] for line in text.splitlines())


def sources():
    for sub in ("csrc", "torchopt_ext", "tests", "docs"):
        for path in sorted((ROOT / sub).rglob("*")):
            if path.suffix in {".h", ".cpp", ".cu", ".py", ".md"} and path.is_file():
                yield path


def test_slug_follows_github():
    assert slug("hardtanh, float32") == "hardtanh-float32"
    assert slug("relu and identity") == "relu-and-identity"
    assert slug("Five-probe learning rate") == "five-probe-learning-rate"


def test_every_pointer_names_a_section():
    have = anchors(DOC.read_text())
    cited = {}
    for path in sources():
        for anchor in POINTER.findall(path.read_text(errors="replace")):
            cited.setdefault(anchor, path.relative_to(ROOT).as_posix())
    assert cited, "no file points to docs/derivations.md"
    missing = {a: f for a, f in cited.items() if a not in have}
    assert not missing, f"pointers to sections docs/derivations.md does not have: {missing}"


def test_links_inside_the_page_resolve():
    text = DOC.read_text()
    have = anchors(text)
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert links
    assert sorted(set(links) - have) == []


@pytest.mark.parametrize("header, name", [(h, n) for h, names in SOLVERS.items() for n in names])
def test_every_solver_points_to_its_derivation(header, name):
    lines = (HEADERS / header).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"(?!//)(struct {name}\b|\S.*\b{name}\()", line))
    i = start - 1
    while i >= 0 and lines[i].startswith("template"):
        i -= 1
    block = []
    while i >= 0 and lines[i].startswith("//"):
        block.append(lines[i])
        i -= 1
    pointers = [line for line in block if line.startswith("// Derivation: ") and POINTER.search(line)]
    assert pointers, f"{header}: {name} has no '// Derivation: docs/derivations.md#...' line above it"


def test_every_tuned_constant_is_justified_on_the_page():
    doc = DOC.read_text()
    found = {}
    for header in SOLVERS:
        for value in TUNED.findall(code_of((HEADERS / header).read_text())):
            found.setdefault(value, header)
    assert "1.9073486328125e-06" in found and "0.99" in found  # the pattern sees the constants at all
    missing = {v: h for v, h in found.items() if v not in doc}
    assert not missing, f"constants without a justification in docs/derivations.md: {missing}"
