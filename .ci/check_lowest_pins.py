"""requirements-lowest.txt pins exactly the lower bound of every requirement of requirements.txt."""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def requirements(name: str) -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines()]
    return {re.split(r"[<>=!~ ]", line)[0].lower(): line for line in lines if line}


def main() -> int:
    ranges, pins = requirements("requirements.txt"), requirements("requirements-lowest.txt")
    problems = []
    for package, line in ranges.items():
        low = re.search(r">=\s*([\w.]+)", line)
        pin = re.fullmatch(rf"{re.escape(package)}==([\w.]+)", pins.get(package, ""), flags=re.I)
        if not low:
            problems.append(f"{line}: no lower bound (>=)")
        elif not pin:
            problems.append(f"{package}: requirements-lowest.txt has {pins.get(package)!r}, not =={low[1]}")
        elif [int(p) for p in pin[1].split(".")] != [int(p) for p in low[1].split(".")] + [0] * (
                pin[1].count(".") - low[1].count(".")):
            problems.append(f"{package}: pinned {pin[1]}, but the lower bound is {low[1]}")
    problems += [f"{package}: pinned but not in requirements.txt" for package in set(pins) - set(ranges)]
    for problem in problems:
        print(f"requirements-lowest.txt: {problem}", file=sys.stderr)
    print("requirements-lowest.txt pins every lower bound" if not problems else "", end="\n" if not problems else "")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
