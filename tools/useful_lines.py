"""Count the console lines of a pipeline run a person needs (issue #16's rule).

    make demo 2>&1 | tee demo.log; python tools/useful_lines.py demo.log [--show]

The rule: split the output on newlines and carriage returns, drop empty lines, keep only
the last state of each progress bar; a line is *useful* if it is a stage header, a final
progress state, a summary or result line, an actionable warning or error, or a pointer to
outputs. Each kind is one regular expression below, so what counts is reviewable; every
other line is noise. ``--show`` prints each line with its kind.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
BAR = re.compile(r"\d+%\|")
WORKER = r"(\(\w+ pid=\d+\) )?"  # Ray's prefix on a line a worker printed
KINDS = {
    "header": re.compile(r"^(== [\w-]+: |Running stage |> python |\*\*\* |project: )"),
    "summary": re.compile(
        r"^" + WORKER + r"(prepared \d+ images|policy: |best epoch |test \(|epoch \d+/\d+: |"
        r"early stopping after epoch |"
        r"\d+ images scored|\S+: [\d,]+ bytes, sha256 |\S+ v\d+ (is|beats|does not beat|stays) )"),
    "warning": re.compile(r"^(WARNING|ERROR|error): "),
    "pointer": re.compile(r"(-> |^cd \S+, then:$|^  [\w ()-]+:\s{2,}\S)"),
}


def lines(text: str) -> list[str]:
    """The output as a person reads it: colour codes removed, carriage-return redraws and
    bars drawn again later collapsed to each bar's last state, empty lines dropped; text
    another process wrote right after a bar's state (before the next newline) is kept."""
    out: list[str] = []
    for physical in ANSI.sub("", text).split("\n"):
        for state in physical.split("\r"):
            out += _split_bar(state)
    out = [line for line in out if line.strip()]
    last_of = {_bar_name(line): i for i, line in enumerate(out) if BAR.search(line)}
    return [line for i, line in enumerate(out) if not BAR.search(line) or last_of[_bar_name(line)] == i]


def _split_bar(state: str) -> list[str]:
    """A bar's state (up to its closing ``]``) and any text after it, as separate lines."""
    match = BAR.search(state)
    end = state.find("]", match.end()) if match else -1
    return [state] if end < 0 else [state[:end + 1], state[end + 1:]]


def _bar_name(line: str) -> str:
    return line[:BAR.search(line).start()].rstrip(" :0123456789")


def kind(line: str) -> str:
    """The useful kind of ``line``, or "noise"."""
    if BAR.search(line):
        return "progress"
    for name, pattern in KINDS.items():
        if pattern.search(line):
            return name
    return "noise"


def main(argv: list[str]) -> float:
    # Bytes, not read_text: universal newlines would turn each carriage return into a line.
    data = Path(argv[0]).read_bytes() if argv and not argv[0].startswith("--") else sys.stdin.buffer.read()
    text = data.decode(errors="replace")
    kinds = [(kind(line), line) for line in lines(text)]
    if "--show" in argv:
        for name, line in kinds:
            print(f"{name:>8}  {line[:150]}")
    useful = sum(name != "noise" for name, _ in kinds)
    share = useful / max(len(kinds), 1)
    print(f"{useful} of {len(kinds)} lines useful ({share:.0%})")
    return share


if __name__ == "__main__":
    main(sys.argv[1:])
