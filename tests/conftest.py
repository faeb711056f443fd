"""Shared test setup: Triton runs through its interpreter when no GPU is present, and GPU tests are marked."""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before the kernels are first imported so every @triton.jit kernel runs on CPU tensors (importing
    # them then also applies kernels/_common.py's interpreter fix).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running CPU test")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tokenizer_dir(synth, tmp_path_factory):
    """A BPE tokenizer trained on the requesting module's synthetic reports (its `synth` fixture) + the
    report model's instruction; a module may define its own instead."""
    from vision.data import load_annotation
    from vision.pipeline import build_tokenizer
    from vision.report_model import ReportConfig

    reports = [e["report"].lower() for e in load_annotation(synth / "annotation.json")["train"]]
    return str(build_tokenizer(reports + [ReportConfig().instruction], tmp_path_factory.mktemp("tok"), 512))


@pytest.fixture
def world_of_one():
    """No torchrun environment: load(tp=...) starts a world of one in this process (gloo, in-memory store)."""
    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
    yield
    os.environ.update(env)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
