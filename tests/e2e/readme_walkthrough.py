"""The README's one-box walkthrough, run as written.

The walkthrough is the part of README.md between ``<!-- walkthrough -->`` and
``<!-- /walkthrough -->``. Each line of its ```bash blocks is one command (``\\`` continues a line):

* a command ending in `` &`` runs in the background until ``kill $(jobs -p)``, which stops every
  background command with SIGTERM, as Ctrl-C would, newest first;
* ``export NAME=value`` sets a variable for the commands after it; ``. .venv/bin/activate`` is
  taken as done (the walkthrough runs with this interpreter's ``bin/`` first on PATH);
* a ``# exits N`` comment says the command is meant to exit with status N (default 0).

A bash block followed by ``<!-- output -->`` (or ``<!-- output: last N -->``) and a plain fenced
block shows what its commands printed, as a terminal transcript. ``tests/e2e/test_readme.py`` runs
the walkthrough against a real Mosquitto (``EDGELINE_BROKER``); this module's command line runs it
the same way and writes the transcripts into README.md, so every figure there comes from a run:

    .venv/bin/python -m tests.e2e.readme_walkthrough --update     # scripts/update-readme.sh
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
README = REPO_ROOT / "README.md"
START, END = "<!-- walkthrough -->", "<!-- /walkthrough -->"
OUTPUT = re.compile(r"^<!-- output(?::\s*last (\d+))? -->$")
EXITS = re.compile(r"^\s*exits (\d+)")
STOP_ALL = "kill $(jobs -p)"
COMMAND_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0


@dataclass
class Command:
    text: str
    background: bool = False
    expect_exit: int = 0


@dataclass
class Block:
    commands: list[Command]
    output_lines: tuple[int, int] | None = None
    """README line range (start, end) of the transcript's fenced block contents, when it has one."""
    last: int | None = None
    """Keep only the last N lines of the transcript."""


@dataclass
class Ran:
    command: Command
    exit_code: int
    output: str


@dataclass
class Walkthrough:
    blocks: list[Block]
    results: list[Ran] = field(default_factory=list)

    def result(self, prefix: str) -> Ran:
        """The first command run that starts with ``prefix``."""
        for ran in self.results:
            if ran.command.text.startswith(prefix):
                return ran
        raise KeyError(f"no walkthrough command starts with {prefix!r}")


def parse(readme: str) -> Walkthrough:
    lines = readme.splitlines()
    start, end = lines.index(START), lines.index(END)
    blocks: list[Block] = []
    i = start
    while i < end:
        if lines[i].strip() == "```bash":
            close = lines.index("```", i + 1)
            block = Block(_commands(lines[i + 1:close]))
            blocks.append(block)
            i = close + 1
            while i < end and not lines[i].strip():
                i += 1
            match = OUTPUT.match(lines[i].strip()) if i < end else None
            if match:
                fence_open = i + 1
                fence_close = lines.index("```", fence_open + 1)
                block.output_lines = (fence_open + 1, fence_close)
                block.last = int(match.group(1)) if match.group(1) else None
                i = fence_close
        i += 1
    return Walkthrough(blocks)


def _commands(lines: list[str]) -> list[Command]:
    commands, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1].rstrip() + " "
            continue
        text = (pending + line.strip()).strip()
        pending = ""
        if not text or text.startswith("#"):
            continue
        code, _, comment = text.partition(" #")
        code = code.strip()
        expect = EXITS.search(comment)
        background = code.endswith("&")
        commands.append(Command(code.rstrip("&").strip(), background, int(expect.group(1)) if expect else 0))
    return commands


def _working_copy(into: Path) -> Path:
    """The repository's tracked files in ``into/repo``, with ``../shared`` pointing at the real one:
    the walkthrough writes its state (outbox, central.db, token) there, not into the checkout."""
    repo = into / "repo"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, check=True, capture_output=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        source = REPO_ROOT / name
        if source.is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, repo / name)
    shared = REPO_ROOT.parent / "shared"
    if shared.exists():
        (into / "shared").symlink_to(shared)
    return repo


def _environment(broker: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGELINE_", "COLUMNS", "LINES"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", EDGELINE_BROKER=broker,
               NO_COLOR="1", TERM="dumb", PYTHONUNBUFFERED="1")
    return env


def run(walkthrough: Walkthrough, broker: str, workdir: Path) -> Walkthrough:
    """Run every command in order in a working copy under ``workdir``; background ones are
    stopped at ``kill $(jobs -p)`` or at the end, whatever happens."""
    repo = _working_copy(workdir)
    env = _environment(broker)
    background: list[tuple[Command, subprocess.Popen[bytes], Path]] = []
    try:
        for block in walkthrough.blocks:
            for command in block.commands:
                if command.text.startswith((". ", "source ")):
                    continue  # the virtualenv: its bin/ is already first on PATH
                if command.text == STOP_ALL:
                    walkthrough.results.append(_stop_all(command, background))
                elif command.text.startswith("export "):
                    name, _, value = command.text.removeprefix("export ").partition("=")
                    env[name] = os.path.expandvars(value.strip("'\""))
                elif command.background:
                    log = workdir / f"background-{len(background)}.log"
                    background.append((command, _spawn(command.text, repo, env, log), log))
                else:
                    walkthrough.results.append(_run_one(command, repo, env))
    finally:
        if background:
            _stop_all(Command(STOP_ALL), background)
    return walkthrough


def _spawn(text: str, cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(["bash", "-c", f"exec {text}"], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _run_one(command: Command, cwd: Path, env: dict[str, str]) -> Ran:
    try:
        done = subprocess.run(["bash", "-c", command.text], cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        return Ran(command, -1, (exc.output or b"").decode(errors="replace") + f"\n(timed out after {COMMAND_TIMEOUT_S:g} s)")
    return Ran(command, done.returncode, done.stdout.decode(errors="replace"))


def _stop_all(command: Command, background: list[tuple[Command, subprocess.Popen[bytes], Path]]) -> Ran:
    """SIGTERM to every background command, newest first; its exit code is the worst of theirs:
    each must shut down in order and exit 0 (one that had to be killed counts as -9). Its output: each command's last logged line
    (its last 40 when it failed)."""
    notes, worst = [], 0
    while background:
        started, proc, log = background.pop()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
            code = -9
        worst = worst if code == 0 else code
        logged = log.read_text(errors="replace").rstrip().splitlines()
        shown = logged[-1:] if code == 0 else logged[-40:]
        notes.append(f"[{started.text}] exited {code}: " + "\n".join(shown or ["(nothing logged)"]))
    return Ran(command, worst, "\n".join(notes))


def transcript(block: Block, results: list[Ran]) -> list[str]:
    """``$ command`` and what it printed, for the block's foreground commands."""
    lines: list[str] = []
    for ran in results:
        if any(ran.command is c for c in block.commands) and not ran.command.background:
            lines.append(f"$ {ran.command.text}")
            lines += [line.rstrip() for line in ran.output.rstrip().splitlines()]
    if block.last is not None:
        lines = lines[:1] + ["..."] + lines[-block.last:] if len(lines) > block.last + 1 else lines
    return lines


def update_readme(walkthrough: Walkthrough, readme_path: Path = README) -> None:
    lines = readme_path.read_text().splitlines()
    for block in sorted((b for b in walkthrough.blocks if b.output_lines), key=lambda b: b.output_lines[0], reverse=True):
        first, end = block.output_lines
        lines[first:end] = transcript(block, walkthrough.results)
    readme_path.write_text("\n".join(lines) + "\n")


def failures(walkthrough: Walkthrough) -> list[str]:
    return [f"`{ran.command.text}` exited {ran.exit_code}, expected {ran.command.expect_exit}:\n{ran.output[-3000:]}"
            for ran in walkthrough.results if ran.exit_code != ran.command.expect_exit]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="write the transcripts into README.md")
    args = parser.parse_args()
    from edgeline.services import MosquittoBroker

    walkthrough = parse(README.read_text())
    with tempfile.TemporaryDirectory(prefix="edgeline-readme-") as tmp, \
            MosquittoBroker(workdir=Path(tmp) / "mosquitto") as broker:
        run(walkthrough, f"{broker.host}:{broker.port}", Path(tmp))
    for ran in walkthrough.results:
        print(f"[{ran.exit_code:>3}] {shlex.split(ran.command.text)[0:3]} ...", file=sys.stderr)
    problems = failures(walkthrough)
    for problem in problems:
        print(problem, file=sys.stderr)
    if args.update and not problems:
        update_readme(walkthrough)
        print(f"updated {README}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
