#!/usr/bin/env python
"""Fill .whl/ with the wheels the GPU check machine needs: it has Python 3.12 with its own CUDA torch and
triton, and no package index (`make gpu-wheels`; benchmarks/gpu/README.md).

    python benchmarks/gpu/wheels.py [--dest .whl] [--python-version 3.12] [--skip-requirements torch triton ...]

The pinned requirements.txt less --skip-requirements (written to .whl/requirements.txt for check.sh), with every dependency except those the device's torch
brings (--skip-deps), as cp312 manylinux x86_64 or pure-Python wheels. deepspeed ships only an sdist: its wheel
is built here first (pure Python, no ops). Nothing of torch or CUDA is downloaded.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# tensorboard and transformers are optional at run time (megatron-core and the trainer import them only when
# asked for), and with their dependencies they are 45 MB of the 75.
SKIP_REQUIREMENTS = ("torch", "triton", "tensorboard", "transformers")
SKIP_DEPS = r"torch|triton|nvidia-.*|cuda-.*|sympy|mpmath|networkx|jinja2|markupsafe"  # the device's torch has them
BUILD = ("setuptools", "wheel")  # a Python 3.12 venv has neither; the editable build needs setuptools


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dest", default=str(ROOT / ".whl"))
    p.add_argument("--requirements", default=str(ROOT / "requirements.txt"))
    p.add_argument("--python-version", default="3.12")
    p.add_argument("--skip-requirements", nargs="*", default=list(SKIP_REQUIREMENTS))
    p.add_argument("--skip-deps", default=SKIP_DEPS, help="regex of distribution names never downloaded")
    return p.parse_args(argv)


def name_of(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def requirements(path: str, skip: list[str]) -> list[str]:
    lines = [ln.split("#")[0].strip() for ln in Path(path).read_text().splitlines()]
    skipped = {s.lower() for s in skip}
    return [ln for ln in lines if ln and name_of(ln) not in skipped]


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def target(python_version: str) -> list[str]:
    abi = "cp" + python_version.replace(".", "")
    plats = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_12_x86_64", "manylinux2010_x86_64")
    return ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp", "--abi", abi,
            *[x for p in plats for x in ("--platform", p)]]


def main(argv=None) -> int:
    args = parse_args(argv)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    reqs = requirements(args.requirements, args.skip_requirements)
    sdists = [r for r in reqs if name_of(r) == "deepspeed"]
    if sdists:  # setup.py of deepspeed imports torch: build against the torch of this environment
        pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest), *sdists)
    skip = re.compile(rf"^({args.skip_deps})$", re.IGNORECASE)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        # the resolution for 3.12 (metadata only); torch's own closure is dropped below
        pip("install", "-q", "--dry-run", "--ignore-installed", "--report", str(report), *target(args.python_version),
            "--find-links", str(dest), *reqs, *BUILD)
        chosen = [(i["metadata"]["name"], i["metadata"]["version"]) for i in json.loads(report.read_text())["install"]]
    pins = [f"{n}=={v}" for n, v in chosen if not skip.match(name_of(n)) and name_of(n) != "deepspeed"]
    pip("download", "-q", "--no-deps", "-d", str(dest), *target(args.python_version), *pins)
    # what check.sh installs: pip resolves the rest from this folder, and from the device's own packages
    (dest / "requirements.txt").write_text("\n".join(reqs + list(BUILD)) + "\n")
    wheels = sorted(dest.glob("*.whl"), key=lambda p: -p.stat().st_size)
    total = sum(p.stat().st_size for p in wheels)
    for p in wheels:
        print(f"{p.stat().st_size / 2**20:8.2f} MiB  {p.name}")
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
