"""No dead flags: every command-line flag a script defines is read somewhere in the code.

A flag is read when its destination name appears in the code outside the add_argument call
that defines it, as an attribute (`args.lr`) or as a string (`getattr(args, "lr")`, a key
table). A user who sets a flag nothing reads is silently ignored; this test fails first.
"""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def python_files() -> list[Path]:
    return [p for p in REPO.rglob("*.py") if not {"tests", ".venv"} & set(p.relative_to(REPO).parts)]


def defined_flags(tree: ast.AST) -> list[tuple[str, int, ast.Call]]:
    """(dest, line, the add_argument call) for every flag defined in a module."""
    out = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"):
            continue
        names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        kw = {k.arg: k.value.value for k in node.keywords if isinstance(k.value, ast.Constant)}
        if not names or kw.get("action") in ("help", "version"):
            continue
        dest = kw.get("dest")
        if dest is None:
            longs = [n for n in names if n.startswith("--")]
            dest = (longs[0] if longs else names[0]).lstrip("-").replace("-", "_")
        out.append((dest, node.lineno, node))
    return out


def names_read(tree: ast.AST) -> set[str]:
    """Attribute names and strings of a module, outside add_argument calls."""
    skip = {id(n) for call, _ in _calls(tree) for n in ast.walk(call)}
    seen = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Attribute):
            seen.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            seen.add(node.value)
    return seen


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            yield node, None


def dead_flags(sources: dict[str, str]) -> list[str]:
    trees = {name: ast.parse(src) for name, src in sources.items()}
    read = set().union(*(names_read(t) for t in trees.values()))
    return [f"{name}:{line} {dest}" for name, tree in trees.items()
            for dest, line, _ in defined_flags(tree) if dest not in read]


def test_the_check_finds_a_dead_flag():
    script = ("import argparse\np = argparse.ArgumentParser()\n"
              "p.add_argument('--used', type=int)\np.add_argument('--dead-one', help='args.dead_one')\n"
              "args = p.parse_args()\nprint(args.used)\n")
    assert dead_flags({"s.py": script}) == ["s.py:4 dead_one"]


def test_no_script_defines_a_flag_nothing_reads():
    sources = {str(p.relative_to(REPO)): p.read_text() for p in python_files()}
    assert dead_flags(sources) == []
