"""Have exim4 4.96 write the -H and -D files in this directory again.

Run as root from the top of the repository, with exim4 (Debian's
exim4-daemon-heavy) and openssl installed:

    PYTHONPATH=. .venv/bin/python tests/data/spool/generate.py [case ...]

Each case (see SESSIONS in tests/test_spool.py) goes in a directory of its
own; ``rewritten-H`` is the same -H file after ``exim4 -Mf``.
"""

import sys
from pathlib import Path

from tests.test_spool import SESSIONS, generate


def main(names: list[str]) -> None:
    here = Path(__file__).parent
    for name in names or list(SESSIONS):
        generate(name, here / name)
        print(name, sorted(str(p.relative_to(here / name)) for p in (here / name).rglob("*-?")))


if __name__ == "__main__":
    main(sys.argv[1:])
