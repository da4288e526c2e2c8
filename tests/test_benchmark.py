"""The benchmark script runs end to end and its last line is what the README promises."""

import importlib.util
import re
import sys

from conftest import ROOT

LAST_LINE = re.compile(r"^throughput: (\d+) img/s, reference (\d+) img/s, ratio (\d+\.\d\d)$")


def test_benchmark_prints_both_throughputs_and_their_ratio(monkeypatch, capsys):
    # its main() in this process, as `python3 benchmarks/bench_training.py --images 768 --rounds 3` runs it
    spec = importlib.util.spec_from_file_location("bench_training", ROOT / "benchmarks" / "bench_training.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["bench_training.py", "--images", "768", "--rounds", "3"])
    bench.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert sum(line.startswith("round ") for line in lines) == 3
    match = LAST_LINE.match(lines[-1])
    assert match, lines[-1]
    ours, reference, ratio = int(match[1]), int(match[2]), float(match[3])
    assert ours > 0 and reference > 0
    per_round = next(line for line in lines if line.startswith("per-round ratio"))
    assert f"(median {ratio:.2f}," in per_round
