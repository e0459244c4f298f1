"""Measure the two installs and write the figures into the README.

    .venv/bin/python tests/install_sizes.py            # measure, print, and update README.md
    .venv/bin/python tests/install_sizes.py --print    # measure and print only

1. A serving install: a new virtual environment with `pip install .` (this
   checkout, no extras), as `make run` and `pip install /path/to/checkout` make it.
   Checked to hold no torch, transformers or optimum.
2. The export toolchain that environment makes on its first pull, in a
   throw-away cache directory, through streamgen's own code
   (streamgen.models.toolchain.ensure), PyTorch's CPU index included where
   no GPU is present.

Sizes are of the files on disk (`du`), in MiB. It takes a few minutes: both
environments are really installed (from pip's cache after the first time).
The README part sits between `<!-- measured: install-sizes -->` markers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_docs import replace_block  # noqa: E402

from streamgen.models.toolchain import disk_usage  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NOT_SERVING = ("torch", "transformers", "optimum", "optimum-onnx", "gguf", "accelerate")


def serving_install(where: Path) -> Path:
    """A new venv with this checkout installed, no extras; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    python = where / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(ROOT)],
                   check=True, stdin=subprocess.DEVNULL)
    return python


def installed(python: Path) -> dict[str, str]:
    listing = subprocess.run([str(python), "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
                             check=True, capture_output=True, text=True).stdout
    return {p["name"].lower(): p["version"] for p in json.loads(listing)}


def make_toolchain(python: Path, home: Path) -> Path:
    """The toolchain, made by the serving install's own streamgen; returns its directory."""
    code = ("import sys; from pathlib import Path; from streamgen.models import toolchain; "
            "print(toolchain.ensure(Path(sys.argv[1])).python)")
    subprocess.run([str(python), "-c", code, str(home)], check=True, stdin=subprocess.DEVNULL)
    return home / "toolchain"


def largest(site: Path, n: int = 4) -> list[tuple[str, int]]:
    sizes = [(p.name, disk_usage(p)) for p in site.iterdir() if p.is_dir() and not p.name.endswith("-info")]
    return sorted(sizes, key=lambda x: -x[1])[:n]


def _site(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def measure() -> str:
    with tempfile.TemporaryDirectory(prefix="streamgen-sizes-") as tmp:
        serve = Path(tmp) / "serve"
        print("installing the serving environment ...", file=sys.stderr, flush=True)
        python = serving_install(serve)
        packages = installed(python)
        leaked = sorted(set(NOT_SERVING) & set(packages))
        if leaked:
            raise SystemExit(f"the serving install holds export tools: {', '.join(leaked)}")
        serve_mib = disk_usage(serve) / 2**20
        print("making the export toolchain ...", file=sys.stderr, flush=True)
        tools = make_toolchain(python, Path(tmp) / "home")
        tools_packages = installed(tools / "bin" / "python")
        tools_mib = disk_usage(tools) / 2**20

        def top(venv: Path) -> str:
            return ", ".join(f"{name} {size / 2**20:.0f}" for name, size in largest(_site(venv)))

        return "\n".join([
            "| environment | what it holds | size (MiB) | largest packages (MiB) |",
            "|---|---|---|---|",
            f"| serving (`pip install .` from the checkout, `make run`) | {len(packages)} packages, no torch | "
            f"{serve_mib:.0f} | {top(serve)} |",
            f"| export toolchain (`$STREAMGEN_HOME/toolchain`, made on the first pull) | torch "
            f"{tools_packages.get('torch', '?')}, transformers {tools_packages.get('transformers', '?')}, optimum "
            f"{tools_packages.get('optimum', '?')} | {tools_mib:.0f} | {top(tools)} |",
        ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--print", action="store_true", help="print the table without touching README.md")
    args = parser.parse_args()
    table = measure()
    print(table)
    if not args.print:
        README.write_text(replace_block(README.read_text(), "measured", "install-sizes", table))
        print("README.md: measured install-sizes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
