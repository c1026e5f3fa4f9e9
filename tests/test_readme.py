"""The README's runnable commands work: every tool they call answers --help, every config they
name exists, and the two commands come first."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def runnable_blocks() -> list[str]:
    return re.findall(r"<!-- runnable -->\s*```bash\n(.*?)```", README, flags=re.S)


def commands() -> list[str]:
    text = "\n".join(runnable_blocks()).replace("\\\n", " ")
    return [line.split("#")[0].strip() for line in text.splitlines() if line.split("#")[0].strip()]


def test_readme_starts_with_make_demo_and_make_test():
    first_block = README.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block


def test_runnable_blocks_exist():
    assert len(runnable_blocks()) >= 4 and len(commands()) >= 8


def test_every_referenced_config_exists():
    paths = set(re.findall(r"configs/[\w/.-]+\.(?:yaml|json)", "\n".join(runnable_blocks())))
    assert paths
    for path in paths:
        assert os.path.exists(os.path.join(ROOT, path)), path


def test_every_tool_answers_help():
    seen = set()
    for cmd in commands():
        words = cmd.split()
        if words[0] == "python" and words[1] == "-m":
            target = ["-m", words[2]]
        elif words[0] == "python":
            target = [words[1]]
        elif words[0].startswith("launch_scripts/"):
            assert os.access(os.path.join(ROOT, words[0]), os.X_OK), words[0]
            continue
        else:
            continue
        if tuple(target) in seen:
            continue
        seen.add(tuple(target))
        proc = subprocess.run([sys.executable, *target, "--help"], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
        assert proc.returncode == 0 and "usage" in proc.stdout.lower(), (target, proc.stderr[-1500:])
    assert len(seen) >= 5
