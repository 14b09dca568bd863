"""README.md and docs/*.md against the code: every flag of a command they show exists in that script's --help, and
every relative link (and #anchor) they make resolves. No network; one --help per script, run side by side."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = ("ex1_convnet.py", "ex2_transfer.py", "benchmarks/speed.py", "benchmarks/tta.py")
SCRIPT = re.compile(r"(?<![\w./-])(?:\./)?(" + "|".join(re.escape(s) for s in SCRIPTS) + r")(?![\w.])")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")
END_OF_COMMAND = re.compile(r"\s#|;|&&|\|\||\|")  # a comment, or the next command of the line
INLINE_CODE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# Flags that are not the project's scripts' own: torchrun's, gpu_check.sh's --smoke and TensorBoard's.
OTHER_TOOLS_FLAGS = {"--standalone", "--nproc_per_node", "--nnodes", "--node_rank", "--rdzv_id", "--rdzv_backend",
                     "--rdzv_endpoint", "--master_addr", "--master_port", "--smoke", "--logdir", "--host", "--port"}
README_MAX_LINES = 250


def split_markdown(text: str) -> tuple[str, list[tuple[str, str]]]:
    """The page's prose (fenced code blocks blanked, so line numbers stay) and its fenced blocks as (language, code)."""
    prose, blocks, fence, language, code = [], [], None, "", []
    for line in text.splitlines():
        stripped = line.strip()
        if fence is None and (stripped.startswith("```") or stripped.startswith("~~~")):
            fence, language, code = stripped[:3], stripped[3:].strip().lower(), []
            prose.append("")
        elif fence is not None and stripped.startswith(fence) and not stripped[3:].strip():
            blocks.append((language, "\n".join(code)))
            fence = None
            prose.append("")
        elif fence is not None:
            code.append(line)
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), blocks


def inline_code(prose: str) -> list[str]:
    """The inline code spans of the prose; a span may run over a line break."""
    return [span.replace("\n", " ") for span in INLINE_CODE.findall(prose)]


def commands(page: Path) -> list[tuple[str, str]]:
    """(script, its flags' text) for every command of a project script in the page's code blocks and inline code."""
    prose, blocks = split_markdown(page.read_text())
    pieces = inline_code(prose)
    for language, code in blocks:
        if language not in ("python", "py"):
            pieces += code.replace("\\\n", " ").splitlines()
    found = []
    for piece in pieces:
        matches = list(SCRIPT.finditer(piece))
        for i, match in enumerate(matches):
            tail = piece[match.end():matches[i + 1].start() if i + 1 < len(matches) else len(piece)]
            found.append((match.group(1), END_OF_COMMAND.split(tail, 1)[0]))
    return found


@pytest.fixture(scope="module")
def help_flags() -> dict[str, set[str]]:
    """Each script's flags, read from its --help (the four run side by side)."""
    processes = {script: subprocess.Popen([sys.executable, str(ROOT / script), "--help"], cwd=ROOT, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) for script in SCRIPTS}
    flags = {}
    for script, process in processes.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, f"{script} --help failed: {err[-2000:]}"
        flags[script] = set(FLAG.findall(out))
    return flags


def test_the_pages_are_found():
    assert (ROOT / "README.md") in PAGES and len(PAGES) > 1, PAGES


def test_the_parser_finds_commands_in_code_blocks_and_inline_code(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Run `python ex1_convnet.py --epochs 3` or `ex2_transfer.py --scratch`.\n\n"
                    "```bash\npython ex1_convnet.py --seeds 3 \\\n  --no-bn  # a comment --not-a-flag\n"
                    "torchrun --standalone ex2_transfer.py --resume; python benchmarks/speed.py --json f.json\n```\n\n"
                    "```python\nprint('python ex1_convnet.py --ignored')\n```\n")
    assert [(script, FLAG.findall(tail)) for script, tail in commands(page)] == [
        ("ex1_convnet.py", ["--epochs"]), ("ex2_transfer.py", ["--scratch"]), ("ex1_convnet.py", ["--seeds", "--no-bn"]),
        ("ex2_transfer.py", ["--resume"]), ("benchmarks/speed.py", ["--json"])]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_flag_of_a_command_is_in_that_scripts_help(page, help_flags):
    unknown = [f"{script}: {flag}" for script, tail in commands(page) for flag in FLAG.findall(tail)
               if flag not in help_flags[script]]
    assert not unknown, f"{page.name}: flags that --help does not list: {unknown}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_flag_the_page_names_exists(page, help_flags):
    """A flag named anywhere in inline code or a code block, with or without its script, belongs to one of them."""
    prose, blocks = split_markdown(page.read_text())
    text = " ".join(inline_code(prose)) + " " + " ".join(code for language, code in blocks if language not in ("python", "py"))
    known = set().union(*help_flags.values()) | OTHER_TOOLS_FLAGS
    unknown = sorted(set(FLAG.findall(text)) - known)
    assert not unknown, f"{page.name}: flags no script has: {unknown}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    prose, _ = split_markdown(page.read_text())
    seen: dict[str, int] = {}
    result = set()
    for line in prose.splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            result.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return result


def test_slugs_follow_githubs_rule():
    assert slug("How long `make train` takes") == "how-long-make-train-takes"
    assert slug("The budget's rule") == "the-budgets-rule"
    assert slug("Use your model: `--predict`, `--tta`") == "use-your-model---predict---tta"
    assert slug("gpu_check.sh") == "gpu_checksh"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    prose, _ = split_markdown(page.read_text())
    prose = INLINE_CODE.sub(lambda m: " " * len(m.group(0)), prose)
    broken = []
    for target in LINK.findall(prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif not linked.resolve().is_relative_to(ROOT):
            broken.append(f"{target}: outside the repository")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, f"{page.name}: {broken}"


def test_the_readme_is_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; the rest belongs in docs/"
