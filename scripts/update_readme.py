"""Regenerate every command-output block of README.md from the command that produces it.

A block is written in README.md as

    <!-- output-of: kvmodel predict --gpu b200 --model 24b --ctx 128k -->
    ```text
    ...output...
    ```

This script runs each command (argv split with shlex, no shell) and replaces the fenced block under it.
``--check`` exits 1 if any block differs from what its command prints now (tests/test_packaging.py::test_readme_outputs_are_current uses it).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^(<!-- output-of: (?P<cmd>.+?) -->\n```(?P<lang>\w*)\n)(?P<body>(?:(?!```).*\n)*?)(```)$", re.M)


def run_command(cmd: str) -> str:
    argv = shlex.split(cmd)
    if argv[0] == "kvmodel":
        argv = [sys.executable, "-m", "kvmodel.cli"] + argv[1:]
    elif argv[0] == "python":
        argv[0] = sys.executable
    env = dict(os.environ, COLUMNS="120")
    res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    if res.returncode != 0:
        raise SystemExit(f"command failed ({res.returncode}): {cmd}\n{res.stderr}")
    return res.stdout.rstrip("\n")


def render(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + run_command(m.group("cmd")) + "\n" + m.group(5), text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date")
    args = ap.parse_args()
    path = ROOT / "README.md"
    old = path.read_text()
    new = render(old)
    if args.check:
        if new != old:
            print("README.md is out of date: run python scripts/update_readme.py", file=sys.stderr)
            return 1
        return 0
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
