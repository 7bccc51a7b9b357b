"""docs: the pages say what is true of this checkout. Every test the reliability table names
exists; every README figure equals the JSON it comes from; every documented command, option and
file exists; the user pages carry no development history; links and anchors resolve."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import itertools
import json
import re
import shlex
import subprocess

import yaml

from tests.conftest import REPO


def test_every_test_named_in_the_reliability_table_exists():
    table = (REPO / "docs" / "reliability.md").read_text()
    named = re.findall(r"`(tests/(?:\w+/)?test_\w+\.py)::(test_\w+)(?:\[[\w-]+\])?`", table)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "`tests/" in line]
    assert len(rows) >= 25 and len(named) >= len(rows)
    for path, name in named:
        source = (REPO / path).read_text()
        assert re.search(rf"^def {name}\(", source, re.MULTILINE), f"{path}::{name} is named but not defined"
        assert "pytest.mark.skip" not in source.split(f"def {name}(")[0].rsplit("\n\n\n", 1)[-1]


def test_readme_is_a_front_door_whose_links_resolve():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 170
    for page in ("cluster", "datasets", "regimes", "performance", "reliability", "development"):
        assert f"docs/{page}.md" in readme, page
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if not target.startswith("http"):
            assert (REPO / target).exists(), f"README links to {target}, which does not exist"


def test_every_module_is_in_the_module_map():
    table = (REPO / "docs" / "development.md").read_text()
    for module in sorted((REPO / "pipeline").rglob("*.py")):
        name = str(module.relative_to(REPO / "pipeline"))
        if module.name != "__init__.py":
            assert f"`{name}`" in table, f"{name} is missing from docs/development.md"


def test_the_model_page_shows_the_served_contract_itself():
    from pipeline.serving.pyfunc import CONTRACT

    assert CONTRACT in (REPO / "docs" / "model.md").read_text()


# --- The user pages: no development history, no machine paths -------------------------------

def user_pages() -> list:
    """README and the docs a user reads; development history lives in development.md and the
    CHANGELOG."""
    return [REPO / "README.md"] + [p for p in sorted((REPO / "docs").glob("*.md"))
                                   if p.name != "development.md"]


HISTORY = {
    r"(?<![\w/])#\d+\b": "an issue number",
    r"\bissues?\b(?! table)(?!\.csv)": "an issue",
    r"\bthis machine\b": "'this machine'",
    r"\bour machines?\b": "'our machines'",
    r"\bpackage (mirror|registry)\b": "a local package mirror",
    r"\bthis round\b": "'this round'",
    r"\bof mine\b": "a run of mine",
    r"\bthis session\b": "'this session'",
    r"\bthis change\b": "'this change'",
    r"\bcommit [0-9a-f]{7,40}\b": "a commit",
    r"\.\./shared\b": "a folder beside this checkout",
}
# An absolute path: a slash not inside a URL, a relative path, `~/`, `$VAR/` or `models:/`.
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~$@}\]>*-])/(?![/\s])[\w.*-]+(?:/[\w.*-]*)*")
CONTAINER_PATHS = ("/app",)  # the image's working directory, a path inside the container


def test_user_pages_carry_no_development_history_or_machine_paths():
    offenders = []
    for page in user_pages():
        for number, line in enumerate(page.read_text().splitlines(), 1):
            where = f"{page.relative_to(REPO)}:{number}"
            for pattern, what in HISTORY.items():
                for m in re.finditer(pattern, line, re.IGNORECASE):
                    if not (what == "an issue" and "label" in line[max(0, m.start() - 8):m.start()]):
                        offenders.append(f"{where}: {what}: {m.group()!r}")
            for m in ABSOLUTE_PATH.finditer(line):
                if m.group().split("/")[1] not in {p.strip("/") for p in CONTAINER_PATHS}:
                    offenders.append(f"{where}: an absolute path: {m.group()!r}")
    assert not offenders, "\n".join(offenders)


# --- Every README figure equals the JSON it comes from ----------------------------------------

PERF, INSTALL, EXTERNAL = "docs/performance.json", "docs/install.json", "docs/external.json"
# README phrase (one group per figure) -> the JSON file and, per group, its key path and format.
FIGURES = [
    (r"test accuracy, the sample's 4 test patients \(([\d,]+) cells\) \| "
     + r"(\d\.\d+) \(patient-bootstrap 95 % CI (\d\.\d+)–(\d\.\d+)\)", PERF,
     [("bf16.cells", "{:,}"), ("end_to_end.test.accuracy", "{:.3f}"),
      ("end_to_end.test.accuracy_ci_low", "{:.3f}"), ("end_to_end.test.accuracy_ci_high", "{:.3f}")]),
    (r"test ROC AUC \| (\d\.\d+) \((\d\.\d+)–(\d\.\d+)\)", PERF,
     [("end_to_end.test.roc_auc", "{:.3f}"), ("end_to_end.test.roc_auc_ci_low", "{:.3f}"),
      ("end_to_end.test.roc_auc_ci_high", "{:.3f}")]),
    (r"all 7 stages \((\d+)-core CPU, no GPU\) \| ([\d.]+) s", PERF,
     [("machine.cores", "{}"), ("end_to_end.repro_s", "{}")]),
    (r"a second `dvc repro`, nothing changed \| ([\d.]+) s", PERF, [("end_to_end.noop_repro_s", "{}")]),
    (r"downloads ([\d.]+) GB from PyPI and took (\d+) min (\d+) s on a (\d+)-core machine", INSTALL,
     [("downloaded_gb", "{}"), ("wall_s", lambda s: str(s // 60)), ("wall_s", lambda s: str(s % 60)),
      ("cores", "{}")]),
    (r"the venv is ([\d.]+) GB", INSTALL, [("venv_gb", "{}")]),
    *[(rf"seed {seed}: (\d\.\d+) \((\d\.\d+)–(\d\.\d+)\)", EXTERNAL,
       [(f"seeds.{seed}.cells_at_threshold.accuracy.{k}", "{:.3f}") for k in ("value", "ci_low", "ci_high")])
      for seed in (42, 43, 44)],
    (r"ROC AUC (\d\.\d+), (\d\.\d+), (\d\.\d+)\. Cells", EXTERNAL,
     [(f"seeds.{seed}.cells_at_threshold.roc_auc.value", "{:.3f}") for seed in (42, 43, 44)]),
    (r"the pool's report half, ([\d,]+) cells", EXTERNAL, [("seeds.42.cells", "{:,}")]),
    (r"at the operating point: " + ", ".join([r"(\d\.\d+) / (\d\.\d+)"] * 3) + r"\.", EXTERNAL,
     [(f"seeds.{seed}.cells_at_operating_point.{m}.value", "{:.3f}")
      for seed in (42, 43, 44) for m in ("sensitivity", "specificity")]),
]
# Properties of the published data, not measurements: they need no JSON.
DATA_FACTS = ("353 MB", "69.6 MB")
# What looks like a measurement: a decimal fraction, or a number with a unit of time, size or rate.
MEASURED = re.compile(r"(?<![\w.])(\d[\d,]*(?:\.\d+)?) ?(s|min|h|GB|MB|img/s|x|×)(?![\w/])|\b0\.\d+")


def json_value(path: str, keys: str):
    value = json.loads((REPO / path).read_text())
    for key in keys.split("."):
        value = value[key]
    return value


def blank_code(text: str) -> str:
    """``text`` with fenced blocks and inline code blanked (commands, not figures), same offsets."""
    def blank(m: re.Match) -> str:
        return re.sub(r"[^\n]", " ", m.group())

    return re.sub(r"`[^`\n]*`", blank, re.sub(r"^```.*?^```", blank, text, flags=re.DOTALL | re.MULTILINE))


def test_every_readme_figure_equals_its_json_source():
    readme = (REPO / "README.md").read_text()
    covered = []
    for phrase, source, keys in FIGURES:
        match = re.search(phrase, readme)
        assert match, f"the README no longer states {phrase!r}: update FIGURES in tests/test_docs.py"
        covered.append(match.span())
        for group, (key, fmt) in enumerate(keys, 1):
            value = json_value(source, key)
            expected = fmt(value) if callable(fmt) else fmt.format(value)
            assert match.group(group) == expected, f"README says {match.group(group)}, {source} {key} is {expected}"
    stray = [m.group() for m in MEASURED.finditer(blank_code(readme)) if m.group() not in DATA_FACTS
             and not any(start <= m.start() and m.end() <= end for start, end in covered)]
    assert not stray, f"README figures with no JSON source (add a FIGURES row or link the page): {stray}"
    assert "**External validation**" in readme  # the headline's place for docs/external.json


# --- Every command in README and docs/ runs as written ----------------------------------------

COMMAND_PAGES = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
DVC_COMMANDS = {("repro",), ("exp", "run"), ("exp", "show"), ("exp", "apply"), ("exp", "branch"),
                ("exp", "diff"), ("metrics", "show"), ("metrics", "diff"), ("plots", "show"),
                ("plots", "diff"), ("dag",), ("push",), ("pull",), ("remote", "add"),
                ("queue", "start"), ("queue", "status"), ("status",), ("params", "diff")}
# Folders and files the pipeline or `make install` creates: a command may name them before they exist.
PRODUCED = ("data/", "models/", "metrics/", "reports/", "plots/", "logs/", "dvc_plots/",
            "checkpoints/", "demo/", ".venv/", "mlflow.db")
OUTPUT_ARGS = {"out", "output", "dir", "work", "work_dir", "metrics"}
TRACKED_TOP = {"docs", "docker", "pipeline", "stages", "tests", "tools", "crossval", "validate", ".ci", ".dvc",
               "params.yaml", "dvc.yaml", "Makefile", "requirements.lock", "pyproject.toml"}
PLACEHOLDER = "PLACEHOLDER"
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;"}
# Other commands whose file arguments are checked (a fenced block also holds output and diagrams).
TOOLS = {"python", "docker", "kubectl", "bash", "source", "ray", "mlflow", "curl"}


def commands(text: str) -> list[tuple[list[str], bool]]:
    """(tokens, whole) of each shell command in ``text``: fenced bash/sh blocks are whole
    commands; inline code that starts with a command word is a mention (maybe partial)."""
    found = []
    for lang, block in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE):
        if lang in ("", "bash", "sh", "shell"):
            for line in block.replace("\\\n", " ").splitlines():
                found += [(c, True) for c in split_commands(line)]
    prose = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    for span in re.findall(r"`([^`\n]+)`", prose):
        if re.match(r"(pipeline|dvc|make|python -m pipeline[\w.]*)( |$)", span) and " " in span:
            found += [(c, False) for c in split_commands(span)]
    return found


def split_commands(line: str) -> list[list[str]]:
    """A shell line's simple commands, placeholders as one token, `bash -c "..."` opened up."""
    line = re.sub(r"<[^<>\n]+>|…|\.\.\.", PLACEHOLDER, line.strip().removeprefix("$ "))
    line = re.sub(r"\d?>&\d|\d?>>?\s*[\w./-]+", " ", line)  # redirections
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:  # an unfinished quote: prose, not a command
        return []
    out, current = [], []
    for token in tokens + [";"]:
        if token in SEPARATORS:
            if current:
                out.append(current)
            current = []
        else:
            current.append(token)
    result = []
    for cmd in out:
        while cmd and (re.match(r"^[A-Z_][A-Z0-9_]*=", cmd[0]) or cmd[0] in ("sudo", "time", "env")):
            cmd = cmd[1:]
        inner = next((i for i in range(len(cmd) - 2) if cmd[i:i + 2] == ["bash", "-c"]), None)
        if inner is not None:  # `... -- bash -c "<commands>"`: the prefix, then the commands
            result += [cmd[:inner]] if inner else []
            result += split_commands(cmd[inner + 2])
        elif cmd:
            result.append(cmd)
    return result


def is_path(token: str) -> bool:
    return ("/" in token or re.search(r"\.(ya?ml|zip|md|json|py|pt|csv|parquet|npz|sh|lock)$", token)
            ) and "://" not in token and not token.startswith(("models:/", "-"))


def path_problem(token: str, *, tracked_only: bool) -> str | None:
    """Why ``token`` is not a path a reader can use, or None."""
    if not is_path(token) or PLACEHOLDER in token or "$" in token or token.startswith(PRODUCED):
        return None
    if tracked_only and token.split("/")[0] not in TRACKED_TOP:
        return None
    return None if (REPO / token).exists() else f"{token} does not exist in the repository"


def pipeline_problems(tokens: list[str], whole: bool) -> list[str]:
    """`pipeline <sub> ...` (or `python -m pipeline[.module] ...`) against the real parser."""
    from pipeline.__main__ import build_parser

    if tokens[0] == "pipeline":
        args, parser = tokens[1:], build_parser()
    elif tokens[2] == "pipeline":
        args, parser = tokens[3:], build_parser()
    else:
        args, parser = tokens[3:], importlib.import_module(tokens[2]).parser()
        if not whole:
            return []
        return parse_problems(parser, args)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if not args or args[0] in parser._option_string_actions:
        return []
    if args[0] not in sub.choices:
        return [f"no subcommand {args[0]!r} (pipeline has {', '.join(sub.choices)})"]
    subparser = sub.choices[args[0]]
    if whole:
        return parse_problems(subparser, args[1:])
    options = set(subparser._option_string_actions)
    return [f"{args[0]} has no option {a.split('=')[0]}" for a in args[1:]
            if a.startswith("-") and a.split("=")[0] not in options]


def parse_problems(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            ns = parser.parse_args([a.replace(PLACEHOLDER, "x") if PLACEHOLDER in a else a for a in args])
    except SystemExit:
        return [err.getvalue().strip().splitlines()[-1]]
    return [p for dest, value in vars(ns).items() if dest not in OUTPUT_ARGS
            for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)
            for p in [path_problem(args[args.index(v)] if v in args else v, tracked_only=False)] if p]


def make_problems(tokens: list[str]) -> list[str]:
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.MULTILINE))
    problems = []
    for arg in tokens[1:]:
        if "=" in arg:
            var = arg.split("=")[0]
            if not re.search(rf"^{var} \??=|\$\({var}\)|\$\(or \$\({var}\)", makefile, re.MULTILINE):
                problems.append(f"the Makefile reads no variable {var}")
        elif not arg.startswith("-") and arg not in targets:
            problems.append(f"no make target {arg!r}")
    return problems


def params_key_exists(key: str) -> bool:
    value = yaml.safe_load((REPO / "params.yaml").read_text())
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    return True


def dvc_problems(tokens: list[str], whole: bool) -> list[str]:
    from dvc.cli import DvcParserError
    from dvc.cli.parser import get_main_parser

    words = [t for t in tokens[1:3] if not t.startswith("-")]
    command = tuple(words[:2]) if tuple(words[:2]) in DVC_COMMANDS else tuple(words[:1])
    if command not in DVC_COMMANDS:
        return [f"dvc {' '.join(words)} is not a DVC command these docs may use"]
    problems = []
    for flag, value in itertools.pairwise(tokens):
        if flag in ("-S", "--set-param") and PLACEHOLDER not in value:
            key = value.split("=")[0]
            if not params_key_exists(key):
                problems.append(f"-S {key}: no such key in params.yaml")
    problems += [p for t in tokens[1:] for p in [path_problem(t, tracked_only=not t.endswith((".yaml", ".yml")))]
                 if p]
    if whole:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                get_main_parser().parse_args([t.replace(PLACEHOLDER, "x") for t in tokens[1:]])
        except (SystemExit, DvcParserError):  # DVC's parser raises its own error after printing
            problems.append(err.getvalue().strip().splitlines()[-1] if err.getvalue() else "DVC refuses it")
    return problems


def command_problems(tokens: list[str], whole: bool) -> list[str]:
    if tokens[0] == "pipeline" or tokens[:3] == ["python", "-m", "pipeline"] or (
            tokens[:2] == ["python", "-m"] and len(tokens) > 2 and tokens[2].startswith("pipeline.")):
        return pipeline_problems(tokens, whole)
    if tokens[0] == "make":
        return make_problems(tokens)
    if tokens[0] == "dvc":
        return dvc_problems(tokens, whole)
    if tokens[0] in TOOLS:
        return [p for t in tokens[1:] for p in [path_problem(t, tracked_only=True)] if p]
    return []


def test_every_documented_command_exists_with_its_options_and_files():
    problems, checked = [], 0
    for page in COMMAND_PAGES:
        for tokens, whole in commands(page.read_text()):
            checked += tokens[0] in ("pipeline", "make", "dvc", "python")
            problems += [f"{page.relative_to(REPO)}: `{' '.join(tokens)}`: {p}"
                         for p in command_problems(tokens, whole)]
    assert checked >= 40
    assert not problems, "\n".join(problems)


def test_the_command_checker_catches_what_went_wrong_before():
    def problems(line: str, whole: bool = True) -> list[str]:
        return [p for c in split_commands(line) for p in command_problems(c, whole)]

    assert problems("pipeline sweep grid.yaml --raw data/raw/malaria.zip")  # the grid is in docs/sweeps/
    assert not problems("pipeline sweep docs/sweeps/grid.yaml --raw data/raw/malaria.zip")
    assert problems("pipeline score --model m --input x --output y --workers 2")
    assert problems("dvc exp run -S train.epoch=5") and problems("dvc exp frobnicate")
    assert problems("dvc exp run validate/dvc.yml") and problems("pipeline report regime")
    assert problems("make benchmark") and problems("make install PYTHN=python3")
    assert not problems("make install TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu")
    assert not problems('ray job submit -- bash -c "cd <project> && dvc exp run -S train.lr=0.1"')
    assert problems('ray job submit -- bash -c "cd <project> && dvc exp run -S train.rl=0.1"')


def click_problems(tokens: list[str]) -> list[str]:
    """`mlflow ...` / `ray ...` against their click command trees: each command and option exists
    (what follows `--` belongs to the job)."""
    import click
    from mlflow.cli import cli as mlflow_cli
    from ray.scripts.scripts import cli as ray_cli

    command = mlflow_cli if tokens[0] == "mlflow" else ray_cli
    args = tokens[1:tokens.index("--")] if "--" in tokens else tokens[1:]
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):
        sub = command.get_command(click.Context(command), args[0])
        if sub is None:
            return [f"{tokens[0]} has no command {args[0]!r}"]
        command, args = sub, args[1:]
    options = {o for p in command.params for o in p.opts + p.secondary_opts} | {"--help"}
    return [f"no option {a}" for a in args if a.startswith("-") and a.split("=")[0] not in options]


def test_documented_mlflow_and_ray_commands_have_their_options():
    assert click_problems(["mlflow", "ui", "--backend-store"]) and click_problems(["ray", "job", "tail"])
    problems, checked = [], 0
    for page in COMMAND_PAGES:
        for tokens, _ in commands(page.read_text()):
            if tokens[0] in ("mlflow", "ray"):
                checked += 1
                problems += [f"{page.name}: `{' '.join(tokens)}`: {p}" for p in click_problems(tokens)]
    assert checked >= 8
    assert not problems, "\n".join(problems)


def test_the_cpu_install_takes_torch_from_its_index_first_with_the_locked_pins():
    def install(*var: str) -> list[str]:
        out = subprocess.run(["make", "-n", "install", *var], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout
        return [line for line in out.splitlines() if " pip install " in line and "--upgrade" not in line]

    pins = re.findall(r"^(torch(?:vision)?==\S+)$", (REPO / "requirements.lock").read_text(), re.MULTILINE)
    assert len(pins) == 2
    assert install() == [".venv/bin/python -m pip install -c requirements.lock -e '.[dev,cluster]'"]
    cpu = install("TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu")
    assert cpu == [f".venv/bin/python -m pip install --index-url https://download.pytorch.org/whl/cpu {' '.join(pins)}",
                   install()[0]]


# --- Links and anchors ---------------------------------------------------------------------

def anchors(page) -> set[str]:
    """GitHub's anchors for the headings of ``page``."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.DOTALL | re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", text, re.MULTILINE)}


def test_every_link_and_anchor_in_the_docs_resolves():
    broken = []
    for page in COMMAND_PAGES + [REPO / "CHANGELOG.md", REPO / "docker" / "README.md"]:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            linked = (page.parent / target).resolve() if target else page
            if not linked.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} does not exist")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{page.relative_to(REPO)}: {target}#{anchor}: no such heading")
    assert not broken, "\n".join(broken)
    assert not (REPO / "docs" / "performance-notes.md").exists()
