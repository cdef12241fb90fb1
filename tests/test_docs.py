"""The documentation stays true: README.md and docs/*.md against the real command line, the demo and the site build.

* Every ``selfsup <command> ...`` line of a ``bash`` code block in README.md and docs/*.md parses with the real
  CLI parser of that command (:mod:`selfsup.cli`, ``_<command>_parser()``), without running it: a recipe named by
  ``--config`` is read and its keys validated, a misspelt flag or a value of the wrong type fails, naming the file,
  the line and the parser's error. A recipe given by bare name (``--config cpu-small``) is resolved as the CLI does
  (:func:`selfsup.recipes.resolve_recipe`, else ``recipes/<name>.yaml``).
* The README's quick start holds exactly its two commands, and the demo it advertises runs.
* ``mkdocs build --strict`` passes (a broken link or anchor, a page missing from the nav, an API name that does not
  exist fail it); skipped, naming the ``docs`` extra, where mkdocs is not installed (CI installs it).
* Every relative link of README.md points to a file of the repository.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# adding-a-method.md's commands use the example package its page builds: tests/test_adding_a_method.py runs them
DOC_FILES = [README, *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "adding-a-method.md")]
QUICK_START = [
    "pip install -e . && selfsup demo",
    'pip install -e ".[test]" && python -m pytest -q',
]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
SEPARATORS = {"&&", "||", ";", "|", "&"}


@dataclass
class DocCommand:
    """One ``selfsup ...`` invocation found in a shell code block."""

    path: Path
    line: int  # 1-based line of the command's first physical line
    text: str  # the command as written (continuations joined)
    argv: list[str]  # after "selfsup"; "..." placeholders replaced

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def shell_blocks(text: str) -> list[tuple[int, list[str]]]:
    """``(first line number, lines)`` of every fenced code block whose language is a shell (```bash, ```sh)."""
    blocks, current, start, fence = [], None, 0, ""
    for i, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if current is None:
            m = re.match(r"^(`{3,}|~{3,})\s*([\w+-]*)", stripped)
            if m:
                fence = m.group(1)
                current = [] if m.group(2).lower() in SHELL_LANGS else None
                start = i + 1
                if current is None:  # a non-shell block: skip to its closing fence
                    current = False
        elif stripped.startswith(fence) and stripped.strip("`~") == "":
            if current is not False:
                blocks.append((start, current))
            current = None
        elif current is not False:
            current.append(raw)
    return blocks


def strip_comment(line: str) -> str:
    """``line`` without a shell comment: ``#`` at the start of a word, outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def logical_lines(start: int, lines: list[str]) -> list[tuple[int, str]]:
    """Join backslash continuations; ``(line number of the first physical line, joined text)``, comments dropped."""
    out, buf, first = [], [], None
    for offset, raw in enumerate(lines):
        line = strip_comment(raw).rstrip()
        if first is None:
            first = start + offset
        if line.endswith("\\"):
            buf.append(line[:-1])
            continue
        buf.append(line)
        joined = " ".join(part.strip() for part in buf).strip()
        if joined:
            out.append((first, joined))
        buf, first = [], None
    if buf:
        out.append((first, " ".join(part.strip() for part in buf).strip()))
    return out


def split_words(text: str) -> list[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = ""
    return list(lexer)


def doc_commands() -> tuple[list[DocCommand], list[str]]:
    """Every ``selfsup`` command of the docs' shell blocks, and the ``file:line`` of those skipped (a ``...`` that is
    not a whole placeholder argument, which cannot be parsed)."""
    commands, skipped = [], []
    for path in DOC_FILES:
        for start, lines in shell_blocks(path.read_text()):
            for line_no, text in logical_lines(start, lines):
                words = split_words(text)
                segments, seg = [], []
                for w in words:
                    if w in SEPARATORS:
                        segments.append(seg)
                        seg = []
                    else:
                        seg.append(w)
                segments.append(seg)
                for seg in segments:
                    while seg and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", seg[0]):  # VAR=value selfsup ...
                        seg = seg[1:]
                    if not seg or seg[0] != "selfsup":
                        continue
                    argv = ["PLACEHOLDER" if w == "..." else w for w in seg[1:]]
                    if any("..." in w for w in argv):
                        skipped.append(f"{path.relative_to(ROOT)}:{line_no}")
                        continue
                    commands.append(DocCommand(path, line_no, text, argv))
    return commands, skipped


COMMANDS, SKIPPED = doc_commands()


def resolve_configs(argv: list[str]) -> list[str]:
    """``--config NAME`` -> the recipe's path, as ``selfsup pretrain`` resolves it."""
    try:
        from selfsup.recipes import resolve_recipe
    except ImportError:  # before bare recipe names existed: recipes/<name>.yaml
        resolve_recipe = None

    def resolve(name: str) -> str:
        if resolve_recipe is not None:
            return resolve_recipe(name)
        if Path(name).is_file():
            return name
        candidate = ROOT / "recipes" / f"{name.removesuffix('.yaml')}.yaml"
        return str(candidate) if candidate.is_file() else name

    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv):
            out += ["--config", resolve(argv[i + 1])]
            i += 2
            continue
        if argv[i].startswith("--config="):
            out.append("--config=" + resolve(argv[i].split("=", 1)[1]))
        else:
            out.append(argv[i])
        i += 1
    return out


def test_docs_hold_commands():
    """The extraction finds the documented commands (a broken extractor would make the parse test vacuous)."""
    names = {c.argv[0] for c in COMMANDS if c.argv}
    assert len(COMMANDS) >= 40, f"only {len(COMMANDS)} selfsup commands found in {len(DOC_FILES)} files"
    for name in ("demo", "pretrain", "knn", "linear", "finetune", "fewshot", "export", "reconstruct", "report"):
        assert name in names, f"no `selfsup {name}` command in README.md or docs/*.md"
    assert len(SKIPPED) <= 5, f"commands skipped for a '...' that is not a whole argument: {SKIPPED}"


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command_parses(cmd: DocCommand, monkeypatch):
    """``selfsup <command> <args>`` as written in the docs is accepted by that command's parser (not run)."""
    from selfsup import cli

    monkeypatch.chdir(ROOT)  # recipe paths such as recipes/cpu-small.yaml are relative to the repository
    assert cmd.argv, f"{cmd.where}: bare `selfsup` without a command: {cmd.text}"
    name, args = cmd.argv[0], cmd.argv[1:]
    if name not in cli.COMMANDS:
        if name == "recipes":
            pytest.skip("`selfsup recipes` is not in selfsup.cli.COMMANDS yet")
        pytest.fail(f"{cmd.where}: unknown command `selfsup {name}` in: {cmd.text}")
    builder = getattr(cli, f"_{name}_parser", None)
    if builder is None:
        pytest.skip(f"selfsup.cli has no _{name}_parser to check `selfsup {name}` with")
    if "--config" in args or any(a.startswith("--config=") for a in args):
        try:
            args = resolve_configs(args)
        except FileNotFoundError as e:
            pytest.fail(f"{cmd.where}: {e}\n  {cmd.text}")
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            builder().parse_args(args)
    except SystemExit as e:  # --print_config / --help print and exit 0
        if e.code not in (0, None):
            pytest.fail(f"{cmd.where}: `selfsup {name}` exited {e.code}: {out.getvalue().strip()}\n  {cmd.text}")
    except Exception as e:
        pytest.fail(f"{cmd.where}: `selfsup {name}` rejects its arguments: {e}\n  {cmd.text}")


def test_readme_quick_start_is_the_two_commands():
    """The README's quick start block is exactly ``selfsup demo`` and the test suite, as .ci/run and newcomers rely on."""
    text = README.read_text()
    m = re.search(r"^## Quick start.*?$(.*?)^## ", text, flags=re.S | re.M)
    assert m, "README.md has no '## Quick start' section"
    blocks = shell_blocks(m.group(1))
    assert blocks, "README.md's quick start has no ```bash block"
    lines = [ln.strip() for ln in blocks[0][1] if ln.strip()]
    assert lines == QUICK_START, f"README.md's quick start is {lines}, expected {QUICK_START}"


def test_readme_links_exist():
    """Every relative link of README.md (docs pages, scripts) points to a file or directory of the repository."""
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", README.read_text()):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        if not (ROOT / target.split("#", 1)[0]).exists():
            missing.append(target)
    assert not missing, f"README.md links to missing files: {missing}"


@pytest.mark.timeout(900)
def test_quick_start_demo_runs(tmp_path):
    """``selfsup demo`` (the quick start's first command) runs end to end and prints the kNN and linear-probe table.

    With ``--epochs 1`` instead of the default 10, the smallest value that runs the same path (in-memory sample,
    batched views, MMCR pretraining, checkpoint, kNN and linear probe before and after): one epoch of 62 steps.
    It cannot be made as short as a minute on 2 cores: the two evaluations (features of the 5,000 sample images and
    a 30-epoch probe, before and after pretraining) cost the same whatever the epochs, about 25 s of CPU each.
    Measured on the shared 2-core development machine while other jobs ran: 4.6-5.7 min at a load average of 4-5,
    10.2 min at 7 (an idle machine is far faster: the whole 10-epoch demo took 2.7 min); the timeout leaves room.
    Runs the installed console script (what the quick start types), else ``python -m selfsup.cli``.
    """
    script = Path(sys.executable).parent / "selfsup"
    launcher = [str(script)] if script.is_file() else [sys.executable, "-m", "selfsup.cli"]
    out_dir = tmp_path / "demo"
    proc = subprocess.run(
        [*launcher, "demo", "--epochs", "1", "--out_dir", str(out_dir), "--progress_bar", "false"],
        capture_output=True,
        text=True,
        timeout=840,
        cwd=tmp_path,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"selfsup demo exited {proc.returncode}:\n{output[-3000:]}"
    assert "random init" in proc.stdout and "MMCR" in proc.stdout, proc.stdout
    for row in ("kNN top-1", "kNN top-5", "linear top-1", "linear top-5"):
        m = re.search(rf"{row}\s+([\d.]+)%\s+([\d.]+)%", proc.stdout)
        assert m, f"selfsup demo printed no '{row}' row:\n{proc.stdout}"
        before, after = float(m.group(1)), float(m.group(2))
        assert 0.0 <= before <= 100.0 and 0.0 <= after <= 100.0, m.group(0)
    assert (out_dir / "checkpoints" / "last.ckpt").is_file(), f"no last.ckpt in {out_dir}"


def test_mkdocs_build_strict(tmp_path):
    """The documentation site builds with ``mkdocs build --strict`` (what .ci/run runs)."""
    pytest.importorskip("mkdocs", reason='mkdocs is not installed: pip install -e ".[docs]"')
    pytest.importorskip("mkdocstrings", reason='mkdocstrings is not installed: pip install -e ".[docs]"')
    pytest.importorskip("material", reason='mkdocs-material is not installed: pip install -e ".[docs]"')
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{output[-5000:]}"
    assert (site / "index.html").is_file()
    assert (site / "api" / "losses" / "index.html").is_file()
