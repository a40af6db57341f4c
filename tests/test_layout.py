"""The tree's shape: no module over 400 lines, no import cycles among edgepack's modules (imports
inside functions count too), no private name imported from another edgepack module.

The checker reads the sources with :mod:`ast` (nothing is imported), so it also runs on the small
fake trees below that prove it finds what it should."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import edgepack

MAX_LINES = 400
PACKAGE_DIR = Path(edgepack.__file__).parent


@dataclass
class Tree:
    """The modules of one package tree: name -> file, plus their imports of each other."""

    root: str
    files: dict[str, Path]
    # (importer, imported) -> line numbers where the importer imports it
    edges: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    # "importer:line imports module.name" for each private name taken from another module
    private: list[str] = field(default_factory=list)


def module_name(path: Path, package_dir: Path, root: str) -> str:
    parts = list(path.relative_to(package_dir).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([root, *parts])


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _base(importer: str, is_package: bool, node: ast.ImportFrom) -> str | None:
    """The absolute module an ``from X import ...`` names (relative imports resolved)."""
    if not node.level:
        return node.module
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    if node.level - 1 > len(package):
        return None
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def scan(package_dir: Path, root: str | None = None) -> Tree:
    """Every module under ``package_dir`` and every import between them, module-level or not.
    ``from a.b import c`` points at ``a.b.c`` when that is a module, else at ``a.b``."""
    root = root or package_dir.name
    files = {module_name(p, package_dir, root): p for p in sorted(package_dir.rglob("*.py"))}
    tree = Tree(root, files)

    def owner(dotted: str) -> str | None:
        """The longest prefix of ``dotted`` that is one of our modules."""
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in files:
                return ".".join(parts[:n])
        return None

    for name, path in files.items():
        is_package = path.name == "__init__.py"
        body = ast.parse(path.read_text(), filename=str(path))
        aliases: dict[str, str] = {}  # local names bound to one of our modules (for `mod._private`)

        def edge(target: str | None, line: int) -> None:
            if target is None or target == name:
                return
            lines = tree.edges.setdefault((name, target), [])
            if line not in lines:
                lines.append(line)

        for node in ast.walk(body):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == root or a.name.startswith(root + "."):
                        target = owner(a.name)
                        edge(target, node.lineno)
                        if a.asname and target == a.name:
                            aliases[a.asname] = target
            elif isinstance(node, ast.ImportFrom):
                base = _base(name, is_package, node)
                if base is None or not (base == root or base.startswith(root + ".")):
                    continue
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    if sub in files:
                        edge(sub, node.lineno)
                        aliases[a.asname or a.name] = sub
                    else:
                        target = owner(base)
                        edge(target, node.lineno)
                        if _is_private(a.name) and target != name:
                            tree.private.append(f"{name}:{node.lineno} imports {base}.{a.name}")
        for node in ast.walk(body):  # `import edgepack.x as m` ... `m._helper`
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in aliases and _is_private(node.attr) and aliases[node.value.id] != name:
                tree.private.append(f"{name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    return tree


def strongly_connected(nodes: list[str], edges: dict[tuple[str, str], list[int]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit): the components with more than one module."""
    succ: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b in sorted(edges):
        succ.setdefault(a, []).append(b)
        succ.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in succ:
        if start in index:
            continue
        work = [(start, iter(succ[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(succ[w])))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return sorted(found)


def cycles(tree: Tree) -> list[str]:
    """One line per cycle: its modules, then each import inside it with its line numbers."""
    lines = []
    for comp in strongly_connected(list(tree.files), tree.edges):
        members = set(comp)
        inner = [f"{a} -> {b} (line {', '.join(map(str, ls))})" for (a, b), ls in sorted(tree.edges.items())
                 if a in members and b in members]
        lines.append(" <-> ".join(comp) + ":\n      " + "\n      ".join(inner))
    return lines


def too_long(tree: Tree, limit: int = MAX_LINES) -> list[str]:
    counts = {name: len(path.read_text().splitlines()) for name, path in tree.files.items()}
    return [f"{name} ({n} lines, {tree.files[name]})" for name, n in sorted(counts.items()) if n > limit]


# --- the real tree ------------------------------------------------------------------------------


def test_no_module_over_400_lines():
    long = too_long(scan(PACKAGE_DIR))
    assert not long, f"modules over {MAX_LINES} lines (split them by concern):\n  " + "\n  ".join(long)


def test_no_import_cycles():
    found = cycles(scan(PACKAGE_DIR))
    assert not found, "import cycles among edgepack modules (function-local imports count):\n  " + "\n  ".join(found)


def test_no_private_imports_across_modules():
    found = scan(PACKAGE_DIR).private
    assert not found, "private names used from another module (make them public or move them):\n  " + \
        "\n  ".join(found)


# --- the checker on small fake trees ------------------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Tree:
    pkg = tmp_path / "fake"
    for rel, text in {"__init__.py": "", **files}.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    return scan(pkg)


def test_checker_finds_a_two_module_cycle_through_a_function_local_import(tmp_path):
    tree = _tree(tmp_path, {
        "a.py": "from fake.b import helper\n",
        "b.py": "def helper():\n    from fake import a\n    return a\n",
        "c.py": "import fake.a\n",
    })
    assert strongly_connected(list(tree.files), tree.edges) == [["fake.a", "fake.b"]]
    (line,) = cycles(tree)
    assert "fake.a <-> fake.b" in line and "fake.b -> fake.a (line 2)" in line and "fake.c" not in line


def test_checker_passes_a_clean_tree(tmp_path):
    tree = _tree(tmp_path, {
        "__init__.py": "from fake.sub import thing\n",  # a package importing its own submodule
        "sub/__init__.py": "",
        "sub/thing.py": "import os\nfrom fake.util import public\n",
        "util.py": "def public():\n    from . import leaf\n",
        "leaf.py": "x = 1\n",
    })
    assert cycles(tree) == [] and tree.private == [] and too_long(tree) == []
    assert ("fake", "fake.sub.thing") in tree.edges and ("fake.util", "fake.leaf") in tree.edges


def test_checker_resolves_relative_and_package_imports(tmp_path):
    tree = _tree(tmp_path, {
        "sub/__init__.py": "from .mod import f\n",
        "sub/mod.py": "from .. import top\nfrom ..sub import other\n",
        "sub/other.py": "from fake.sub import mod\n",
        "top.py": "import fake.sub\n",
    })
    assert ("fake.sub", "fake.sub.mod") in tree.edges and ("fake.sub.mod", "fake.top") in tree.edges
    assert ("fake.sub.mod", "fake.sub.other") in tree.edges and ("fake.top", "fake.sub") in tree.edges
    # the package's __init__ importing its own submodule counts: sub -> mod -> top -> sub is a cycle
    assert strongly_connected(list(tree.files), tree.edges) == [["fake.sub", "fake.sub.mod", "fake.sub.other",
                                                                 "fake.top"]]


def test_checker_finds_a_longer_cycle_and_keeps_components_apart(tmp_path):
    tree = _tree(tmp_path, {
        "a.py": "from fake.b import x\n", "b.py": "from fake.c import x\n", "c.py": "from fake.a import x\n",
        "d.py": "from fake.e import x\nfrom fake.a import x\n", "e.py": "def f():\n    import fake.d\n",
    })
    assert strongly_connected(list(tree.files), tree.edges) == [["fake.a", "fake.b", "fake.c"], ["fake.d", "fake.e"]]


def test_checker_finds_private_imports_and_long_modules(tmp_path):
    tree = _tree(tmp_path, {
        "a.py": "def _helper():\n    pass\n\n\ndef f():\n    return _helper()\n",
        "b.py": "from fake.a import _helper, __doc__\n",
        "c.py": "from fake import a\n\n\ndef g():\n    return a._helper()\n",
        "d.py": "x = 1\n" * (MAX_LINES + 1),
    })
    assert tree.private == ["fake.b:1 imports fake.a._helper", "fake.c:5 uses fake.a._helper"]
    assert too_long(tree) == [f"fake.d ({MAX_LINES + 1} lines, {tree.files['fake.d']})"]
