"""README.md and docs/*.md against the code: every command of a project script they show parses today (nothing runs)
with only flags its --help lists, any flag in their code exists (or existed at REMOVED_AT, on a page naming it), every
file a command runs and every `make` target exists, every relative link (and #anchor) resolves. No network."""
import contextlib
import importlib.util
import io
import re
import shlex
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = ("ex1_convnet.py", "ex2_transfer.py", "benchmarks/speed.py")
SCRIPT = re.compile(r"(?<![\w./-])(?:\./)?(" + "|".join(re.escape(s) for s in SCRIPTS) + r")(?![\w.])")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")
# A command that runs a file: `python X.py`, `python3 -u X.py`, `bash X.sh` (its path from the repository's root).
RUNS_FILE = re.compile(r"(?<![\w.-])(?:python3?|bash|sh)\s+(?:-\S+\s+)*((?:\./)?[\w./-]+\.(?:py|sh))(?![\w.])")
MAKE = re.compile(r"(?<![\w./-])make((?:\s+[A-Z_]+=\S*)*)((?:\s+[a-z][\w-]*)*)")
PLACEHOLDERS = {"...", "…"}  # words of a command that stand for more of it, not arguments
END_OF_COMMAND = re.compile(r"\s#|;|&&|\|\||\|")  # a comment, or the next command of the line
INLINE_CODE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# Flags that are not the project's scripts' own: torchrun's, gpu_check.sh's --smoke, TensorBoard's and pip's.
OTHER_TOOLS_FLAGS = {"--standalone", "--nproc_per_node", "--nnodes", "--node_rank", "--rdzv_id", "--rdzv_backend",
                     "--rdzv_endpoint", "--master_addr", "--master_port", "--smoke", "--logdir", "--host", "--port",
                     "--index-url"}
# Flags since removed from the scripts, and the last commit that had them. A page may name them only where it names
# that commit; no command may give them, since a command a reader copies must run with today's scripts.
REMOVED_AT = "78d6b9b"
REMOVED_FLAGS = {"--whiten", "--no-whiten", "--whiten-eps", "--whiten-directions", "--lookahead", "--no-lookahead",
                 "--alternate-flip", "--no-alternate-flip", "--output-scale", "--lr-end", "--bn-momentum",
                 "--decay-norm-bias", "--no-decay-norm-bias", "--noise-std", "--no-augment", "--no-sync-bn"}


def split_markdown(text: str) -> tuple[str, list[str]]:
    """The page's prose, and its pieces of code: the inline code spans (which may run over a line break) and the lines
    of its fenced code blocks but Python's (a line continued by \\ joined)."""
    prose, code, fence = [], [], None
    for line in text.splitlines():
        stripped = line.strip()
        if fence is None and stripped[:3] in ("```", "~~~"):
            fence, python = stripped[:3], stripped[3:].strip().lower() in ("python", "py")
        elif fence is None:
            prose.append(line)
        elif stripped.startswith(fence) and not stripped[3:].strip():
            fence = None
        elif not python:
            code.append(line)
    spans = [span.replace("\n", " ") for span in INLINE_CODE.findall("\n".join(prose))]
    return "\n".join(prose), spans + "\n".join(code).replace("\\\n", " ").splitlines()


def commands(pieces: list[str]) -> list[tuple[str, str]]:
    """(script, its arguments' text) for every command of a project script in the pieces of code."""
    found = []
    for piece in pieces:
        matches = list(SCRIPT.finditer(piece))
        for match, following in zip(matches, [*matches[1:], None], strict=False):
            tail = piece[match.end():following.start() if following else None]
            found.append((match.group(1), END_OF_COMMAND.split(tail, 1)[0]))
    return found


@pytest.fixture(scope="module")
def scripts() -> dict[str, tuple]:
    """Each script's parse_args (it parses a command line without running anything) and the flags its --help lists."""
    found = {}
    for script in SCRIPTS:
        spec = importlib.util.spec_from_file_location(f"docs_check_{Path(script).stem}", ROOT / script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        with contextlib.redirect_stdout(io.StringIO()) as out, pytest.raises(SystemExit) as done:
            module.parse_args(["--help"])
        assert done.value.code == 0, script
        found[script] = module.parse_args, set(FLAG.findall(out.getvalue()))
    return found


def parse_error(parse_args, tail: str) -> str | None:
    """None when the command's arguments parse (--help, which exits 0, counts); else the parser's error."""
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(io.StringIO()):
            parse_args([word for word in shlex.split(tail) if word not in PLACEHOLDERS])
    except SystemExit as e:
        if e.code:
            return (said.getvalue().strip().splitlines() or [f"exit code {e.code}"])[-1]  # the parser's error line
    return None


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for line in split_markdown(page.read_text())[0].splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            result.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return result


def broken_links(page: Path) -> list[str]:
    """The relative links (and #anchors) of the page that resolve to nothing in the repository."""
    prose = INLINE_CODE.sub(lambda m: " " * len(m.group(0)), split_markdown(page.read_text())[0])
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
    return broken


def problems(page: Path, scripts: dict[str, tuple]) -> dict[str, list[str]]:
    """What is wrong with the page, by kind; only the kinds found."""
    text = page.read_text()
    pieces = split_markdown(text)[1]
    known = set().union(*(flags for _, flags in scripts.values())) | OTHER_TOOLS_FLAGS
    if re.search(rf"(?<![0-9a-f]){REMOVED_AT}(?![0-9a-f])", text):
        known |= REMOVED_FLAGS
    targets = set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", (ROOT / "Makefile").read_text(), re.MULTILINE))
    run = commands(pieces)
    found = {
        "flags that --help does not list": [f"{script}: {flag}" for script, tail in run
                                            for flag in FLAG.findall(tail) if flag not in scripts[script][1]],
        "commands that today's scripts refuse": [f"{script} {tail.strip()}: {error}" for script, tail in run
                                                 if (error := parse_error(scripts[script][0], tail))],
        "flags no script has": sorted(set(FLAG.findall(" ".join(pieces))) - known),
        "files that commands run and the repository lacks": sorted(
            {path for piece in pieces for path in RUNS_FILE.findall(piece) if not (ROOT / path).is_file()}),
        "make targets the Makefile does not define": sorted(
            {target for piece in pieces for match in MAKE.finditer(piece.split("#")[0])
             for target in match.group(2).split() if target not in targets}),
        "broken links": broken_links(page)}
    return {what: items for what, items in found.items() if items}


def test_the_checks_find_each_kind_of_mistake(tmp_path, scripts):
    page = tmp_path / "page.md"
    page.write_text(
        "Run `python ex1_convnet.py --epochs 2` or `python ex1_convnet.py ...`, `ex2_transfer.py --scratch --weights\n"
        "w.pth`, `python ex1_convnet.py --epoch 2`, `make PYTHON=python3.12 test`, `make board LOGDIR=runs/x`,\n"
        f"`make trian`; `--whiten` (at commit {REMOVED_AT}0), `python ex1_convnet.py --help`, [gone](gone.md).\n\n"
        "```bash\npython ex1_convnet.py --seeds 3 \\\n  --precision fp64  # --not-a-flag; make test installs\n"
        "torchrun --standalone ex2_transfer.py --resume; python benchmarks/speed.py --images 2048 --no-such-flag\n"
        "bash benchmarks/gpu_check.sh BUNDLE OUT && python3 -u tools/gone.py\n```\n\n"
        "```python\nprint('python ex1_convnet.py --ignored')\n```\n")
    found = problems(page, scripts)
    refused = found.pop("commands that today's scripts refuse")
    assert [error.split(":")[0] for error in refused] == [
        "ex2_transfer.py --scratch --weights w.pth", "ex1_convnet.py --seeds 3    --precision fp64",
        "benchmarks/speed.py --images 2048 --no-such-flag"], refused
    assert "cannot be combined" in refused[0] and "invalid choice" in refused[1], refused
    assert found == {
        "flags that --help does not list": ["ex1_convnet.py: --epoch", "benchmarks/speed.py: --no-such-flag"],
        "flags no script has": ["--epoch", "--no-such-flag", "--not-a-flag", "--whiten"],
        "files that commands run and the repository lacks": ["tools/gone.py"],
        "make targets the Makefile does not define": ["trian"],
        "broken links": ["gone.md: no such file"]}
    page.write_text(f"Whitened (`--whiten`, up to commit {REMOVED_AT}): `python ex1_convnet.py --whiten`\n")
    found = problems(page, scripts)
    assert found.keys() == {"flags that --help does not list", "commands that today's scripts refuse"}, found
    assert found["flags that --help does not list"] == ["ex1_convnet.py: --whiten"]
    assert slug("Use your model: `--predict`, `gpu_check.sh`") == "use-your-model---predict-gpu_checksh"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_flag_script_make_target_and_link_of_the_page_is_right(page, scripts):
    assert not problems(page, scripts), page.name


def test_the_pages_are_found_the_readme_and_the_guide_are_short_and_the_readme_links_the_guide_early():
    assert (ROOT / "README.md") in PAGES and len(PAGES) > 1, PAGES
    readme = (ROOT / "README.md").read_text().splitlines()
    assert len(readme) <= 250, f"README.md has {len(readme)} lines; the rest belongs in docs/"
    guide = (ROOT / "docs" / "guide.md").read_text().splitlines()
    assert len(guide) <= 150, f"docs/guide.md has {len(guide)} lines; the rest belongs in the other docs/ pages"
    assert "](docs/guide.md)" in "\n".join(readme[:40]), "README.md's first 40 lines do not link docs/guide.md"
