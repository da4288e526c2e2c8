"""Run README's own commands, as a newcomer on Debian or Ubuntu would, so that README and CI cannot drift.

The blocks are the ```bash blocks that follow the lines `<!-- ci: run -->` and `<!-- ci: test -->` in
README.md. They run in order, in one bash session, in a copy of the checkout, with the system Python
(/usr/bin first on PATH, where it exists) and without any VAE_* variable but those given here: the run
command gets VAE_EPOCHS / VAE_TRAIN_SAMPLES / VAE_TEST_SAMPLES from the environment of this script
(CI shortens the run that way; README's command stays as written).

    python3 .ci/readme_commands.py            # prints each block, then runs them all
    python3 .ci/readme_commands.py --print    # only prints them
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def blocks(readme: str) -> dict[str, str]:
    found = dict(re.findall(r"<!-- ci: (\w+) -->\n```bash\n(.*?)```", readme, flags=re.S))
    missing = {"run", "test"} - set(found)
    if missing:
        raise SystemExit(f"README.md has no ```bash block after <!-- ci: {sorted(missing)[0]} -->")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--print", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args()
    commands = blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    for name in ("run", "test"):
        print(f"--- README's {name} command:\n{commands[name]}", flush=True)
    if args.print:
        return 0
    work = Path(tempfile.mkdtemp(prefix="readme-")) / "vae-fashion"
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.split()
    for name in tracked:
        if (ROOT / name).is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, work / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAE_", "PYTHON", "VIRTUAL_ENV"))}
    env.update({k: v for k, v in os.environ.items() if k in ("VAE_EPOCHS", "VAE_TRAIN_SAMPLES", "VAE_TEST_SAMPLES")})
    if Path("/usr/bin/python3").exists():
        env["PATH"] = "/usr/bin:/bin:" + env.get("PATH", "")
    script = "set -euo pipefail\n" + commands["run"] + commands["test"]
    print(f"--- running them in {work} with {shutil.which('python3', path=env['PATH'])}", flush=True)
    return subprocess.run(["bash", "-c", script], cwd=work, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
