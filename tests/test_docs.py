"""README.md and docs/*.md against the code: every command of a project script they show parses with that script's
argument parser today (parse only: nothing trains), every flag a command gives is in the script's --help, a flag
named outside a command exists (or, on a page that names the commit, existed at the commit REMOVED_FLAGS gives for
it), every script a command runs exists, every `make` target exists, and every relative link (and #anchor) resolves.
No network; each script's --help read in this process."""
import contextlib
import importlib.util
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = ("ex1_convnet.py", "ex2_transfer.py", "benchmarks/speed.py")
SCRIPT = re.compile(r"(?<![\w./-])(?:\./)?(" + "|".join(re.escape(s) for s in SCRIPTS) + r")(?![\w.])")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")
# A command that runs a file: `python X.py`, `python3 X.py`, `bash X.sh`, `torchrun ... X.py` (its path, relative to the
# repository's root).
RUNS_FILE = re.compile(r"(?<![\w.-])(?:python3?|bash|sh)\s+(?:-\S+\s+)*((?:\./)?[\w./-]+\.(?:py|sh))(?![\w.])")
# Words of a command that stand for more of it ("python ex1_convnet.py ..."), not arguments.
PLACEHOLDERS = {"...", "…"}
END_OF_COMMAND = re.compile(r"\s#|;|&&|\|\||\|")  # a comment, or the next command of the line
INLINE_CODE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# Flags that are not the project's scripts' own: torchrun's, gpu_check.sh's --smoke, TensorBoard's and pip's.
OTHER_TOOLS_FLAGS = {"--standalone", "--nproc_per_node", "--nnodes", "--node_rank", "--rdzv_id", "--rdzv_backend",
                     "--rdzv_endpoint", "--master_addr", "--master_port", "--smoke", "--logdir", "--host", "--port",
                     "--index-url"}
README_MAX_LINES = 250
GUIDE_MAX_LINES = 150  # docs/guide.md, the page a student of the assignment reads first
# Flags since removed from the scripts, each with the last commit that had them. A page may name such a flag (in its
# prose, a table of removed flags, the settings of a run made with it) only where it names that commit; no command
# on any page may give it, since a command a reader copies must run with today's scripts.
REMOVED_FLAGS = {flag: "78d6b9b" for flag in (
    "--whiten", "--no-whiten", "--whiten-eps", "--whiten-directions", "--lookahead", "--no-lookahead",
    "--alternate-flip", "--no-alternate-flip", "--output-scale", "--lr-end", "--bn-momentum", "--decay-norm-bias",
    "--no-decay-norm-bias", "--noise-std", "--no-augment", "--no-sync-bn")}


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


def test_the_parser_finds_commands_in_code_blocks_and_inline_code(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Run `python ex1_convnet.py --epochs 3` or `ex2_transfer.py --scratch`.\n\n"
                    "```bash\npython ex1_convnet.py --seeds 3 \\\n  --no-bn  # a comment --not-a-flag\n"
                    "torchrun --standalone ex2_transfer.py --resume; python benchmarks/speed.py --json f.json\n```\n\n"
                    "```python\nprint('python ex1_convnet.py --ignored')\n```\n")
    assert [(script, FLAG.findall(tail)) for script, tail in commands(page)] == [
        ("ex1_convnet.py", ["--epochs"]), ("ex2_transfer.py", ["--scratch"]),
        ("ex1_convnet.py", ["--seeds", "--no-bn"]), ("ex2_transfer.py", ["--resume"]),
        ("benchmarks/speed.py", ["--json"])]


def removed_here(flag: str, page_text: str) -> bool:
    """True for a removed flag on a page that names the last commit that had it."""
    commit = REMOVED_FLAGS.get(flag)
    return commit is not None and re.search(rf"(?<![0-9a-f]){commit}(?![0-9a-f])", page_text) is not None


def unknown_command_flags(page: Path, help_flags: dict[str, set[str]]) -> list[str]:
    """'script: flag' for each flag of a command on the page that the script's --help does not list (a removed
    flag too: a command must run today, whatever commit the page names)."""
    return [f"{script}: {flag}" for script, tail in commands(page) for flag in FLAG.findall(tail)
            if flag not in help_flags[script]]


def unknown_named_flags(page: Path, help_flags: dict[str, set[str]]) -> list[str]:
    """The flags named anywhere in inline code or a code block, with or without a script, that none has."""
    text = page.read_text()
    prose, blocks = split_markdown(text)
    code = " ".join(inline_code(prose)) + " " + " ".join(code for language, code in blocks
                                                         if language not in ("python", "py"))
    known = set().union(*help_flags.values()) | OTHER_TOOLS_FLAGS
    return sorted(flag for flag in set(FLAG.findall(code)) - known if not removed_here(flag, text))


def test_a_removed_flag_is_named_only_on_a_page_that_names_its_commit_and_never_in_a_command(tmp_path):
    help_flags = {script: {"--epochs"} for script in SCRIPTS}
    page = tmp_path / "page.md"
    page.write_text("`python ex1_convnet.py --epochs 3 --whiten`\n")
    assert unknown_command_flags(page, help_flags) == ["ex1_convnet.py: --whiten"]
    assert unknown_named_flags(page, help_flags) == ["--whiten"]
    page.write_text("Whitened (`--whiten`) at commit 78d6b9b0\n")  # another commit's hash
    assert unknown_named_flags(page, help_flags) == ["--whiten"]
    page.write_text("Whitened (`--whiten`, up to commit 78d6b9b), `--no-such-flag`\n")
    assert unknown_named_flags(page, help_flags) == ["--no-such-flag"]
    page.write_text("At commit 78d6b9b: `python ex1_convnet.py --epochs 3 --whiten --no-such-flag`\n")
    assert unknown_command_flags(page, help_flags) == ["ex1_convnet.py: --whiten", "ex1_convnet.py: --no-such-flag"]


def load_script(script: str):
    """The script as a module (its parse_args parses a command line without running anything)."""
    spec = importlib.util.spec_from_file_location(f"docs_check_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def parsers() -> dict:
    """Each script's parse_args."""
    return {script: load_script(script).parse_args for script in SCRIPTS}


@pytest.fixture(scope="module")
def help_flags(parsers) -> dict[str, set[str]]:
    """Each script's flags, read from its --help."""
    flags = {}
    for script, parse_args in parsers.items():
        with contextlib.redirect_stdout(io.StringIO()) as out, pytest.raises(SystemExit) as done:
            parse_args(["--help"])
        assert done.value.code == 0, script
        flags[script] = set(FLAG.findall(out.getvalue()))
    return flags


def parse_error(parse_args, tail: str) -> str | None:
    """None when the command's arguments parse (--help, which exits 0, counts); else what the parser said."""
    try:
        argv = [word for word in shlex.split(tail) if word not in PLACEHOLDERS]
    except ValueError as e:
        return f"cannot split {tail!r}: {e}"
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(io.StringIO()):
            parse_args(argv)
    except SystemExit as e:
        if e.code:
            return said.getvalue().strip().splitlines()[-1] if said.getvalue().strip() else f"exit code {e.code}"
    return None


def unparsed_commands(page: Path, parsers: dict) -> list[str]:
    """'script tail: error' for each command on the page that its script's argument parser refuses."""
    errors = []
    for script, tail in commands(page):
        error = parse_error(parsers[script], tail)
        if error:
            errors.append(f"{script} {tail.strip()}: {error}")
    return errors


def missing_run_files(page: Path) -> list[str]:
    """The files that a command on the page runs (`python X.py`, `bash X.sh`) and that the repository lacks."""
    prose, blocks = split_markdown(page.read_text())
    code = inline_code(prose) + [line for language, block in blocks if language not in ("python", "py")
                                 for line in block.replace("\\\n", " ").splitlines()]
    return sorted({path for piece in code for path in RUNS_FILE.findall(piece) if not (ROOT / path).is_file()})


def test_the_parse_check_finds_bad_commands(parsers, tmp_path):
    page = tmp_path / "page.md"
    page.write_text("`python ex1_convnet.py --epochs 2 --limit-train 5000` and `python ex1_convnet.py ...`, "
                    "`python ex1_convnet.py --help`, `python ex2_transfer.py --scratch --weights w.pth`, "
                    "`python ex1_convnet.py --precision fp64`, `python ex1_convnet.py --epochs two`, "
                    "`python benchmarks/speed.py --images 2048 --no-such-flag`\n")
    errors = unparsed_commands(page, parsers)
    assert [error.split(":")[0] for error in errors] == [
        "ex2_transfer.py --scratch --weights w.pth", "ex1_convnet.py --precision fp64", "ex1_convnet.py --epochs two",
        "benchmarks/speed.py --images 2048 --no-such-flag"], errors
    assert "cannot be combined" in errors[0] and "invalid choice" in errors[1], errors


def test_the_file_and_make_checks_find_scripts_that_are_gone_and_unknown_targets(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("`python benchmarks/tta.py --views 6` and `python ex1_convnet.py`, `benchmarks/tta.py` in prose\n\n"
                    "```bash\nbash benchmarks/gpu_check.sh BUNDLE OUT\npython3 -u tools/gone.py  # gone\n```\n")
    assert missing_run_files(page) == ["benchmarks/tta.py", "tools/gone.py"]
    page = tmp_path / "page.md"
    page.write_text("`make train`, `make PYTHON=python3.12 test`, `make board LOGDIR=runs/x`, `make trian`\n")
    assert unknown_make_targets(page, make_targets()) == ["trian"]
    assert {"train", "transfer", "test", "test-fast", "venv", "board"} <= make_targets()


MAKE = re.compile(r"(?<![\w./-])make((?:\s+[A-Z_]+=\S*)*)((?:\s+[a-z][\w-]*)*)")


def make_targets() -> set[str]:
    """The targets the Makefile defines."""
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", (ROOT / "Makefile").read_text(), re.MULTILINE))


def unknown_make_targets(page: Path, targets: set[str]) -> list[str]:
    """The targets of `make ...` commands in the page's code that the Makefile lacks."""
    prose, blocks = split_markdown(page.read_text())
    code = inline_code(prose) + [line.split("#")[0] for language, block in blocks if language not in ("python", "py")
                                 for line in block.splitlines()]
    return sorted({target for piece in code for match in MAKE.finditer(piece) for target in match.group(2).split()
                   if target not in targets})


def test_the_removed_flags_are_gone_and_existed_at_their_commit(help_flags):
    """The allowance lists only flags that no script has any more, each an argument in the scripts' source at the
    commit REMOVED_FLAGS gives (a --no-X as the negative of an argparse.BooleanOptionalAction --X); that part is
    skipped without git or that commit."""
    assert not set(REMOVED_FLAGS) & set().union(*help_flags.values())
    sources = {}
    for commit in set(REMOVED_FLAGS.values()):
        try:
            shown = [subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, capture_output=True, text=True)
                     for path in ("common/settings.py", "ex1_convnet.py", "ex2_transfer.py")]
        except FileNotFoundError:
            pytest.skip("no git")
        if any(result.returncode for result in shown):
            pytest.skip(f"commit {commit} is not in this checkout")
        sources[commit] = "".join(result.stdout for result in shown)
    missing = [flag for flag, commit in REMOVED_FLAGS.items() if f'"{flag}"' not in sources[commit]
               and not (flag.startswith("--no-")
                        and f'"--{flag[5:]}", action=argparse.BooleanOptionalAction' in sources[commit])]
    assert not missing, f"not arguments at their commit: {missing}"


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


def broken_links(page: Path) -> list[str]:
    """The relative links (and #anchors) of the page that resolve to nothing in the repository."""
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
    return broken



@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_flag_script_make_target_and_link_of_the_page_is_right(page, help_flags, parsers):
    problems = {"flags that --help does not list": unknown_command_flags(page, help_flags),
                "flags no script has": unknown_named_flags(page, help_flags),
                "commands that today's scripts refuse": unparsed_commands(page, parsers),
                "commands run files that are not in the repository": missing_run_files(page),
                "make targets the Makefile does not define": unknown_make_targets(page, make_targets()),
                "broken links": broken_links(page)}
    assert not {what: found for what, found in problems.items() if found}, page.name


def test_the_pages_are_found_the_readme_and_the_guide_are_short_and_the_readme_links_the_guide_early():
    assert (ROOT / "README.md") in PAGES and len(PAGES) > 1, PAGES
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; the rest belongs in docs/"
    lines = len((ROOT / "docs" / "guide.md").read_text().splitlines())
    assert lines <= GUIDE_MAX_LINES, f"docs/guide.md has {lines} lines; the rest belongs in the other docs/ pages"
    first = "\n".join((ROOT / "README.md").read_text().splitlines()[:40])
    assert "](docs/guide.md)" in first, "README.md's first 40 lines do not link docs/guide.md"
