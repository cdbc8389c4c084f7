"""The mutation score per file, from mutmut's results (`make mutate`; docs/mutation.md).

    .venv/bin/python -m tests.mutation_report [--survivors FILE]

Reads `mutmut results --all true` (run from the project root, after `mutmut run`) and prints one
line per mutated file: mutants, killed, survived, no tests, timeout, suspicious, other, and the
score killed / (mutants - skipped). With --survivors, writes every mutant that was not killed to
FILE with its diff (`mutmut show`), grouped by file.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

STATUSES = ("killed", "survived", "no tests", "timeout", "suspicious")
HEADER = f"{'file':<28}{'mutants':>8}{'killed':>8}{'survived':>9}{'no tests':>9}{'timeout':>8}"
HEADER += f"{'suspicious':>11}{'other':>7}{'score':>8}"


def module_of(mutant: str) -> str:
    """service.broker.redis.xǁRedisBrokerǁpublish__mutmut_3 -> service.broker.redis"""
    parts = mutant.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].startswith(("x_", "xǁ")):
            return ".".join(parts[:i])
    raise ValueError(f"not a mutmut mutant name: {mutant}")


def file_of(module: str) -> str:
    path = Path(*module.split("."))
    return str(path.with_suffix(".py")) if path.with_suffix(".py").exists() else str(path / "__init__.py")


def parse(results: str) -> dict[str, dict[str, str]]:
    """File -> mutant -> status, from the lines `    <mutant>: <status>`."""
    by_file: dict[str, dict[str, str]] = defaultdict(dict)
    for line in results.splitlines():
        mutant, sep, status = line.strip().partition(": ")
        if sep and "__mutmut_" in mutant:
            by_file[file_of(module_of(mutant))][mutant] = status
    return dict(by_file)


def row(name: str, statuses: Counter[str]) -> str:
    total = sum(statuses.values())
    other = total - sum(statuses[s] for s in STATUSES)
    tested = total - statuses["skipped"]
    score = f"{100 * statuses['killed'] / tested:.1f}%" if tested else "-"
    counts = "".join(f"{statuses[s]:>{w}}" for s, w in zip(STATUSES, (8, 9, 9, 8, 11), strict=True))
    return f"{name:<28}{total:>8}{counts}{other:>7}{score:>8}"


def table(by_file: dict[str, dict[str, str]]) -> str:
    lines = [HEADER]
    overall: Counter[str] = Counter()
    for name in sorted(by_file):
        statuses = Counter(by_file[name].values())
        overall += statuses
        lines.append(row(name, statuses))
    lines.append(row("all", overall))
    others = sorted(set(overall) - set(STATUSES))
    if others:
        lines.append("other: " + ", ".join(f"{s} {overall[s]}" for s in others))
    return "\n".join(lines)


def mutmut(*args: str) -> str:
    """The output of mutmut's command line, the one installed beside this Python."""
    command = [str(Path(sys.executable).parent / "mutmut"), *args]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def survivors(by_file: dict[str, dict[str, str]]) -> str:
    out = []
    for name in sorted(by_file):
        for mutant, status in sorted(by_file[name].items()):
            if status == "killed":
                continue
            out.append(mutmut("show", mutant).rstrip() + "\n")  # `# <mutant>: <status>`, then the diff
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--survivors", type=Path, help="write the mutants not killed, with diffs, here")
    args = parser.parse_args()
    by_file = parse(mutmut("results", "--all", "true"))
    if not by_file:
        raise SystemExit("no mutmut results here: run `make mutate` (or `mutmut run`) first")
    print(table(by_file))
    if args.survivors:
        args.survivors.write_text(survivors(by_file))
        print(f"mutants not killed, with their diffs: {args.survivors}")


if __name__ == "__main__":
    main()
