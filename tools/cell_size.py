"""Lines of vae_fashion.py by section: all lines and code lines (not blank, comment or docstring).

    python3 tools/cell_size.py [path]
"""

import ast
import io
import re
import sys
import tokenize
from pathlib import Path


def line_kinds(source):
    """Sets of line numbers that are docstrings and comments-only."""
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    code = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                              tokenize.DEDENT, tokenize.ENDMARKER):
            code.update(range(token.start[0], token.end[0] + 1))
    return docstrings, code - docstrings


def main(path="vae_fashion.py"):
    source = Path(path).read_text()
    lines = source.splitlines()
    docstrings, code = line_kinds(source)
    banners = [i + 1 for i, line in enumerate(lines) if re.match(r"# [0-9]\. ", line) and
               i > 0 and lines[i - 1].startswith("# ====")]
    starts = [1] + [b - 1 for b in banners] + [len(lines) + 1]
    names = ["header"] + [lines[b - 1][2:40] for b in banners]
    print(f"{'section':40} {'lines':>6} {'code':>6} {'doc':>5} {'blank':>6}")
    for name, lo, hi in zip(names, starts, starts[1:]):
        span = range(lo, hi)
        print(f"{name:40} {len(span):6} {sum(n in code for n in span):6} "
              f"{sum(n in docstrings for n in span):5} {sum(not lines[n - 1].strip() for n in span):6}")
    print(f"{'total':40} {len(lines):6} {len(code):6} {len(docstrings):5} "
          f"{sum(not line.strip() for line in lines):6}")


if __name__ == "__main__":
    main(*sys.argv[1:])
