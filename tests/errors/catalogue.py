"""docs/ERRORS.md read as data, and the checks every catalogue test makes.

An entry is one table row of docs/ERRORS.md:

    | `config.unknown_key` | what triggers it | `error: invalid config <file>: <field>: unknown key (...)` | 2 |

The message column is the exact shape of the one stderr line: `<...>` stands for any text (a path,
a value, a list), everything else must match literally. The test of entry `area.name` is
`test_area__name`; `Entry.check` holds it to the row, so the document cannot drift from the code.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Dict, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(ROOT, "docs", "ERRORS.md")

ROW = re.compile(r"^\| `(?P<id>[a-z0-9_]+\.[a-z0-9_]+)` \| (?P<trigger>.+?) \| `(?P<message>[^`]+)` \| "
                 r"(?P<exit>\d+(?:\+N)?) \|$")
PLACEHOLDER = re.compile(r"<[^<>]+>")


def message_regex(shape: str) -> re.Pattern:
    """`error: <file>: no such file` -> a regex that fully matches the lines of that shape."""
    literal = PLACEHOLDER.split(shape)
    return re.compile(".+?".join(re.escape(part) for part in literal))


@dataclass
class Entry:
    id: str
    trigger: str
    message: str
    exit: str  # a number, or "128+N" (killed by / exiting on signal N)

    @property
    def regex(self) -> re.Pattern:
        return message_regex(self.message)

    def check(self, outcome: "Outcome", *mentions: str) -> str:
        """The outcome of a bad input: the documented exit code, no traceback, exactly one `error: ...`
        line on stderr (the last; a progress bar may come before it) of the documented shape, naming
        each of `mentions` (the field, the file, what was expected). Returns the line."""
        if self.exit == "128+N":
            assert 128 < outcome.rc < 160, f"{self.id}: exit code {outcome.rc}, documented 128+N\n{outcome.err}"
        else:
            assert outcome.rc == int(self.exit), f"{self.id}: exit code {outcome.rc}, documented {self.exit}\n{outcome.err}"
        assert "Traceback" not in outcome.out + outcome.err, f"{self.id}: a traceback\n{outcome.err}"
        lines = [line for line in outcome.err.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error")]  # progress bars may come before
        assert len(errors) == 1 and errors[0] == lines[-1] and errors[0].startswith("error: "), \
            f"{self.id}: stderr does not end with exactly one error line: {lines}"
        line = errors[0]
        assert self.regex.fullmatch(line), \
            f"{self.id}: the message\n  {line}\ndoes not have the documented shape\n  {self.message}"
        for text in mentions:
            assert text in line, f"{self.id}: {text!r} is not named in\n  {line}"
        return line


def read_catalogue(path: str = DOC) -> Dict[str, Entry]:
    entries: Dict[str, Entry] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = ROW.match(line.rstrip("\n"))
            if m:
                assert m["id"] not in entries, f"{m['id']} is listed twice in {path}"
                entries[m["id"]] = Entry(m["id"], m["trigger"], m["message"], m["exit"])
    return entries


def entry(entry_id: str) -> Entry:
    """The row of `entry_id` (for catalogue tests outside tests/errors)."""
    return read_catalogue()[entry_id]


def outcome(rc: int, err_lines, out: str = "") -> "Outcome":
    return Outcome(rc, out, "\n".join(err_lines))


def function_for(entry_id: str) -> str:
    return "test_" + entry_id.replace(".", "__")


def entry_id_of(test_function: str) -> str:
    return test_function[len("test_"):].replace("__", ".")


# --- running an entry point in-process ---------------------------------------------------------------
@dataclass
class Outcome:
    rc: int
    out: str
    err: str


def run_trainer(capsys, argv: Sequence[str]) -> Outcome:
    """launch/pretrain.py's `main(argv)` in this process. The trainer's shutdown leaves the process as
    it found it (process group, DeepSpeed's cached groups, signal handlers), so runs can follow runs."""
    from megams.training.trainer import main
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return Outcome(rc, out, err)


def run_tool(capsys, name: str, argv: Sequence[str]) -> Outcome:
    """tools/NAME.py's `main(argv)` in this process."""
    from tests.checkpoint.conftest import tool
    capsys.readouterr()
    rc = tool(name).main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return Outcome(rc, out, err)


# --- nothing saved is damaged -----------------------------------------------------------------------
def snapshot(path: str) -> Dict[str, str]:
    """{relative path: sha256} of every file under `path` (a file: itself)."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return {".": hashlib.sha256(f.read()).hexdigest()}
    out = {}
    for d, _, files in os.walk(path):
        for name in files:
            p = os.path.join(d, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, path)] = hashlib.sha256(f.read()).hexdigest()
    return out
