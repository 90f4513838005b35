"""The old spelling of `dmsae ablate`: `python -m flows.ablation CONFIG ...` says so on stderr and forwards its
arguments unchanged to `dmsae ablate` (flows/ablate.py), exit code included."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from flows.cli import main as cli_main

    print("dmsae: note: `python -m flows.ablation` is now `dmsae ablate`; forwarding to it", file=sys.stderr,
          flush=True)
    return cli_main(["ablate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
