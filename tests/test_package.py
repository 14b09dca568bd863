"""The package's shape: one module per step of the data flow, each importing only the modules before it (named in its
docstring), none over 450 lines, and every module imported by `import common`."""
import ast
import re
from pathlib import Path

import common

PACKAGE = Path(common.__file__).parent
ORDER = re.search(r"^errors -> [\s\S]*?-> cli$", common.__doc__, re.MULTILINE).group(0).replace("\n", " ").split(" -> ")


def package_imports(path: Path) -> list[str]:
    """The modules of common that the module at `path` imports (from .x import ..., at any depth of its code)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found += [node.module] if node.module else [alias.name for alias in node.names]
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and "common" in (getattr(node, "module", None) or "",
                                                                                 *(a.name for a in node.names)):
            found.append("common")
    return found


def test_the_package_docstring_names_every_module_in_data_flow_order():
    modules = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__"}
    assert sorted(ORDER) == sorted(modules)
    assert [name for name in vars(common) if name in modules] == ORDER  # import common imports each, in that order


def test_each_module_imports_only_the_modules_before_it():
    for position, name in enumerate(ORDER):
        imported = package_imports(PACKAGE / f"{name}.py")
        assert "common" not in imported, f"{name}.py imports the package itself"
        later = [m for m in imported if m not in ORDER[:position]]
        assert not later, f"common/{name}.py imports {later}, which come after it (or are not modules)"


def test_each_module_says_what_it_holds_and_which_modules_it_imports():
    for name in ORDER:
        path = PACKAGE / f"{name}.py"
        doc = ast.get_docstring(ast.parse(path.read_text()))
        imported = list(dict.fromkeys(package_imports(path)))
        said = re.search(r"Imports (no other module of common|([\s\S]*?))\.$", doc)
        assert said, f"{name}.py: its docstring does not end with the modules it imports"
        named = re.findall(r"common\.(\w+)", said.group(1))
        assert named == sorted(imported, key=ORDER.index), f"{name}.py imports {imported}, its docstring says {named}"


def test_no_module_is_over_450_lines():
    sizes = {path.name: len(path.read_text().splitlines()) for path in PACKAGE.glob("*.py")}
    assert max(sizes.values()) <= 450, sizes
