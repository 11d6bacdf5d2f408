"""Record a real chat session for the README: `python scripts/readme_transcript.py > t.txt`.

Feeds `caa-local chat` its input on a pipe (the REPL echoes piped lines, so the output reads
as the terminal session would).
"""

from __future__ import annotations

import subprocess
import sys

STEPS = [
    "What do you think about rainy Mondays?",
    "/compare",
    "/scale sentiment -2",
    "/compare How was your weekend at the lake?",
    "/quit",
]


def main() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "caa_local.cli", "chat", "--vector", "sentiment", "--max-tokens", "48",
         "--temperature", "0", *sys.argv[1:]],
        input="\n".join(STEPS) + "\n", capture_output=True, text=True, timeout=600, check=True,
    )
    print(result.stdout)


if __name__ == "__main__":
    main()
