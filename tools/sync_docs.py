"""Write what is made from the code: the settings (from Config) and the outputs (from OUTPUTS), as lists in
the notebook's markdown cells in vae_fashion.py and as tables in README.md, then regenerate vae_fashion.ipynb
with jupytext. The tests fail, naming this script, when one is stale.

    python3 tools/sync_docs.py
"""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import vae_fashion as vf  # noqa: E402

# marker name -> the list or table, in the notebook's markdown cells and in README.md
NOTEBOOK_TABLES = {"settings": vf.settings_list, "outputs": vf.outputs_list}
README_TABLES = {"settings": vf.settings_summary, "outputs": vf.outputs_table}


def replace_table(text: str, name: str, table: str, prefix: str) -> str:
    """The block after the marker line `<prefix><!-- <name> table -->`, up to the first blank line, is replaced
    by `table`."""
    marker = f"{prefix}<!-- {name} table -->\n"
    if marker not in text:
        raise SystemExit(f"no '{marker.strip()}' line to put the {name} table after")
    head, rest = text.split(marker, 1)
    old = re.match(rf"(?:{re.escape(prefix)}\S.*\n|{re.escape(prefix)}  .*\n)*", rest).group(0)  # up to a blank
    new = "".join(f"{prefix}{line}".rstrip() + "\n" for line in table.splitlines())
    return head + marker + new + rest[len(old):]


def main() -> None:
    script = ROOT / "vae_fashion.py"
    text = script.read_text(encoding="utf-8")
    for name, make in NOTEBOOK_TABLES.items():
        text = replace_table(text, name, make(), "# ")
    script.write_text(text, encoding="utf-8")
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    for name, make in README_TABLES.items():
        text = replace_table(text, name, make(), "")
    readme.write_text(text, encoding="utf-8")
    subprocess.run([sys.executable, "-m", "jupytext", "--to", "ipynb", "--update", str(script)], check=True, cwd=ROOT)


if __name__ == "__main__":
    main()
