"""The package's shape (README's map of the code): at most 10 modules, none over 600 lines, each opening with a
docstring that says what it holds, each importing only the modules `import common` imports before it."""
import ast
from pathlib import Path

import common

PACKAGE = Path(common.__file__).parent
MODULES = sorted(path.stem for path in PACKAGE.glob("*.py"))


def test_at_most_ten_modules_none_over_600_lines_each_saying_what_it_holds_and_importing_only_those_before_it():
    assert len(MODULES) <= 10, MODULES
    order = [name for name in vars(common) if name in MODULES]  # the order `import common` imports them in
    assert sorted(order) == sorted(set(MODULES) - {"__init__"})
    for name in MODULES:
        text = (PACKAGE / f"{name}.py").read_text()
        tree = ast.parse(text)
        assert len(text.splitlines()) <= 600, name
        assert len(ast.get_docstring(tree) or "") > 40, f"{name}.py does not say what it holds"
        earlier = set(order[:order.index(name)]) if name in order else set(order)  # __init__ imports them all
        for_types = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If)  # `if TYPE_CHECKING:` names
                     and getattr(node.test, "id", "") == "TYPE_CHECKING" for inner in ast.walk(node)}
        imported = {node.module or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and node.level == 1 and id(node) not in for_types for alias in node.names}
        assert imported <= earlier, f"common/{name}.py imports {imported - earlier}"
