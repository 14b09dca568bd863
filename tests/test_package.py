"""The package's shape (README's map of the code): at most 10 modules, none over 600 lines, each opening with a
docstring that says what it holds, each importing only the modules `import common` imports before it."""
import ast
from pathlib import Path

import common

PACKAGE = Path(common.__file__).parent
MODULES = sorted(path.stem for path in PACKAGE.glob("*.py"))


def test_at_most_ten_modules_none_over_600_lines_each_saying_what_it_holds():
    assert len(MODULES) <= 10, MODULES
    for name in MODULES:
        text = (PACKAGE / f"{name}.py").read_text()
        assert len(text.splitlines()) <= 600, name
        assert len(ast.get_docstring(ast.parse(text)) or "") > 40, f"{name}.py does not say what it holds"


def test_each_module_imports_only_the_modules_before_it():
    order = [name for name in vars(common) if name in MODULES]  # the order `import common` imports them in
    assert sorted(order) == sorted(set(MODULES) - {"__init__"})
    for position, name in enumerate(order):
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        for_types = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If)  # `if TYPE_CHECKING:` names
                     and getattr(node.test, "id", "") == "TYPE_CHECKING" for inner in ast.walk(node)}
        imported = {node.module or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and node.level == 1 and id(node) not in for_types for alias in node.names}
        assert imported <= set(order[:position]), f"common/{name}.py imports {imported - set(order[:position])}"
