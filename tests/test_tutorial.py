"""The README's kernel-lab tutorial runs as written: the code blocks of its "## Kernel lab" section are
extracted and run in order in a fresh directory, in subprocesses without TRITON_INTERPRET set (the blocks handle the
CPU themselves). A python block whose first line is `# NAME.py` is that file; other python blocks run as scripts;
bash blocks run in bash; blocks marked `gpu` (```bash gpu) run only with CUDA."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTION = "## Kernel lab"
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```\s*$", re.S | re.M)


def tutorial() -> str:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start:] if end < 0 else text[start:end]


def blocks():
    return [(lang, info.split(), code) for lang, info, code in FENCE.findall(tutorial())]


def run_tutorial(tmp_path, gpu: bool):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    ran = []
    for i, (lang, flags, code) in enumerate(blocks()):
        if "gpu" in flags and not gpu:
            continue
        first = code.splitlines()[0]
        if lang == "python" and re.fullmatch(r"# \w+\.py", first):
            (tmp_path / first[2:]).write_text(code)
            ran.append(first[2:])
            continue
        if lang == "python":
            script = tmp_path / f"block_{i}.py"
            script.write_text(code)
            cmd = [sys.executable, str(script)]
        elif lang == "bash":
            cmd = ["bash", "-euo", "pipefail", "-c", code.replace("python ", f"{sys.executable} ")]
        else:
            continue
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"block {i} ({lang}) failed:\n{code}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        ran.append(f"{lang} block {i}")
    return ran


def test_tutorial_runs_as_written_on_the_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the GPU variant runs every block")
    ran = run_tutorial(tmp_path, gpu=False)
    assert ran[0] == "my_rotary.py" and len(ran) == 4, ran
    assert (tmp_path / "rotary_naive.json").exists()  # written by the check-op block


@pytest.mark.gpu
def test_tutorial_runs_as_written_on_a_gpu(tmp_path):
    ran = run_tutorial(tmp_path, gpu=True)
    assert len(ran) == 5, ran
