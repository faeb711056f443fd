"""vision.train / vision.evaluate as a user runs them (subprocesses where the behaviour is the command line's):
run checkpoints never unpickle, truncated or foreign checkpoint files are errors naming the file, bad data and
flags stop a run before its first step with `error: ...` and exit 2, `~` paths work, a moved run evaluates, a
failing validation keeps its epoch, and a resumed run trains exactly as an uninterrupted one."""
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vision import pipeline, synthetic
from vision import train as train_script

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--epochs", "1", "--batch-size", "4", "--max-length", "16", "--num-beams", "1", "--min-new-tokens", "0",
        "--max-new-tokens", "4", "--val-limit", "2", "--device", "cpu"]


def run_cli(module, *args, home=None, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if home is not None:
        env["HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "error: " in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr[-2000:])


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A fake HOME with a small synthetic dataset in ~/data and one trained run in ~/runs/a (paths given as ~)."""
    home = tmp_path_factory.mktemp("home")
    synthetic.main([str(home / "data"), "--studies", "16", "--views", "2", "--size", "64", "--seed", "2"])
    proc = run_cli("vision.train", "--annotation", "~/data/annotation.json", "--image-dir", "~/data/images",
                   "--out", "~/runs/a", *FAST, home=home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return home


def train_args(data: Path, out: Path, *extra):
    return ["--annotation", data / "annotation.json", "--image-dir", data / "images", "--out", out, *FAST, *extra]


class Payload:
    """Unpickling this creates `marker`: what a crafted checkpoint could do with torch.load(weights_only=False)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_checkpoint_layout_and_moved_run_evaluates_from_elsewhere(home, tmp_path):
    run = home / "runs" / "a"
    for name in ("last", "best"):
        assert {"model.safetensors", "state.json", "tokenizer"} <= {p.name for p in (run / name).iterdir()}
    assert (run / "last" / "optimizer.safetensors").is_file()
    state = json.loads((run / "last" / "state.json").read_text())
    assert state["format"] == "report-run" and state["epoch"] == 0
    assert Path(state["spec"]["tokenizer"]).is_absolute() and "~" not in state["spec"]["tokenizer"]
    assert not list(run.parent.glob(".*tmp*")) and not list(run.glob(".*tmp*"))
    # Move the run and delete the tokenizer it was trained with: the checkpoint's own copy is used.
    moved = home / "elsewhere" / "b"
    shutil.copytree(run, moved)
    shutil.rmtree(moved / "tokenizer")
    proc = run_cli("vision.evaluate", "--checkpoint", "~/elsewhere/b/best", "--annotation", "~/data/annotation.json",
                   "--image-dir", "~/data/images", "--split", "val", "--max-new-tokens", "4", "--device", "cpu",
                   "--out", "~/elsewhere/val.json", home=home, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((home / "elsewhere" / "val.json").read_text())
    assert result["epoch"] == 0 and result["generation"]["max_new_tokens"] == 4 and result["samples"]


def test_pickled_checkpoint_is_refused_and_never_runs(home, tmp_path):
    live = tmp_path / "live-marker"
    pickle.loads(pickle.dumps(Payload(live)))
    assert live.exists()  # the payload really runs when unpickled

    marker = tmp_path / "marker"
    evil_file = tmp_path / "last.pt"
    evil_file.write_bytes(pickle.dumps({"trained": Payload(marker)}))
    # A checkpoint directory whose tensor files are pickles.
    evil_dir = tmp_path / "evil"
    shutil.copytree(home / "runs" / "a" / "last", evil_dir)
    for name in ("model.safetensors", "optimizer.safetensors"):
        (evil_dir / name).write_bytes(pickle.dumps(Payload(marker)))
    data = home / "data"
    evaluate = ["--annotation", data / "annotation.json", "--image-dir", data / "images", "--device", "cpu",
                "--out", tmp_path / "out.json"]
    assert_user_error(run_cli("vision.evaluate", "--checkpoint", evil_file, *evaluate), str(evil_file),
                      "not a run checkpoint directory")
    assert_user_error(run_cli("vision.evaluate", "--checkpoint", evil_dir, *evaluate),
                      str(evil_dir / "model.safetensors"))
    assert_user_error(run_cli("vision.train", *train_args(data, tmp_path / "run", "--resume", evil_file)),
                      str(evil_file))
    assert not marker.exists() and not (tmp_path / "run" / "last").exists()


def test_loading_never_calls_torch_load(home, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", refuse)
    run = pipeline.load_run_checkpoint(home / "runs" / "a" / "last")
    assert run.optimizer["state"] and "cpu" in run.rng and run.epoch == 0


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "state.json"])
def test_truncated_checkpoint_file_is_named(home, tmp_path, name):
    ckpt = tmp_path / "last"
    shutil.copytree(home / "runs" / "a" / "last", ckpt)
    data = (ckpt / name).read_bytes()
    (ckpt / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(pipeline.CheckpointError, match=str(ckpt / name)):
        pipeline.load_run_checkpoint(ckpt)
    if name == "model.safetensors":  # and from the command line
        proc = run_cli("vision.evaluate", "--checkpoint", ckpt, "--annotation", home / "data" / "annotation.json",
                       "--image-dir", home / "data" / "images", "--device", "cpu", "--out", tmp_path / "o.json")
        assert_user_error(proc, str(ckpt / name))


def test_foreign_checkpoint_directories_are_refused(home, tmp_path):
    foreign = tmp_path / "foreign"
    shutil.copytree(home / "runs" / "a" / "last", foreign)
    state = json.loads((foreign / "state.json").read_text())
    (foreign / "state.json").write_text(json.dumps({**state, "format": "stablelm"}))
    with pytest.raises(pipeline.CheckpointError, match="format 'stablelm'"):
        pipeline.load_run_checkpoint(foreign)
    (foreign / "state.json").write_text(json.dumps(state))
    (foreign / "model.safetensors").unlink()
    with pytest.raises(pipeline.CheckpointError, match="no model.safetensors"):
        pipeline.load_run_checkpoint(foreign)


def _broken_copy(home, tmp_path, how):
    data = tmp_path / "data"
    shutil.copytree(home / "data", data)
    annotation = json.loads((data / "annotation.json").read_text())
    image = data / "images" / annotation["val"][0]["image_path"][0]
    if how == "missing":
        image.unlink()
    else:
        image.write_bytes(b"not an image at all")
    return data, image


@pytest.mark.parametrize("case", ["score_weights", "lm_preset", "num_beams", "epochs", "missing_image",
                                  "unreadable_image", "cuda"])
def test_bad_flags_and_data_stop_before_the_first_step(home, tmp_path, case):
    data, out = home / "data", tmp_path / "run"
    expect = []
    extra = []
    if case == "score_weights":
        extra, expect = ["--score-weights", "BLEU_4=0.5,CIDER=0.5"], ["CIDER", "CIDEr", "BLEU_4", "ROUGE_L"]
    elif case == "lm_preset":
        extra, expect = ["--lm-preset", "stablelm-9b"], ["--lm-preset", "stablelm-9b", "tiny"]
    elif case == "num_beams":
        extra, expect = ["--num-beams", "0"], ["num_beams"]
    elif case == "epochs":
        extra, expect = ["--epochs", "0"], ["epochs"]
    elif case == "cuda":
        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
        extra, expect = ["--device", "cuda"], ["CUDA is not available"]
    else:
        data, image = _broken_copy(home, tmp_path, case.split("_")[0])
        expect = [str(image), "not found" if case == "missing_image" else "not a readable image"]
    proc = run_cli("vision.train", *train_args(data, out), *extra)
    assert_user_error(proc, *expect)
    assert not (out / "last").exists() and "trainable parameters" not in proc.stdout


def test_help_shows_defaults_and_the_module_name():
    for module in ("vision.train", "vision.evaluate"):
        proc = run_cli(module, "--help")
        assert proc.returncode == 0 and f"usage: python -m {module}" in proc.stdout
        assert "__main__" not in proc.stdout
    train_help = run_cli("vision.train", "--help").stdout
    for flag in ("--vis-lora-r", "--vis-lora-alpha", "--vis-lora-dropout", "--num-beams", "--score-weights"):
        assert flag in train_help
    assert "(default: 3)" in train_help and "(default: BLEU_4=0.5,CIDEr=0.5)" in train_help


def test_failed_validation_keeps_the_epoch_and_resume_matches_an_uninterrupted_run(home, tmp_path, monkeypatch):
    data = home / "data"
    two = ["--epochs", "2", "--lm-mode", "lora"]  # LoRA dropout on: the resumed RNG state matters
    straight = train_script.main(list(map(str, train_args(data, tmp_path / "straight", *two))))

    real_evaluate = pipeline.evaluate

    def broken(*args, **kwargs):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(pipeline, "evaluate", broken)
    out = tmp_path / "broken"
    with pytest.raises(pipeline.ValidationFailed, match="decoder exploded") as failure:
        train_script.main(list(map(str, train_args(data, out, *two))))
    assert str(out / "last") in str(failure.value)
    assert json.loads((out / "last" / "state.json").read_text())["epoch"] == 0
    assert "decoder exploded" in json.loads((out / "results.json").read_text())["epochs"][0]["val_error"]

    monkeypatch.setattr(pipeline, "evaluate", real_evaluate)
    resumed = train_script.main(list(map(str, train_args(data, out, *two, "--resume", out / "last"))))
    assert [e["epoch"] for e in resumed["epochs"]] == [0, 1]
    assert resumed["epochs"][1]["train_loss"] == straight["epochs"][1]["train_loss"]
    assert resumed["epochs"][1]["step"] == straight["epochs"][1]["step"]


def test_bf16_mixed_full_fine_tuning_from_the_command_line(home, tmp_path):
    """`--precision bf16-mixed --lm-mode full` in a subprocess: the run trains the LM in bf16, its checkpoint holds
    the trained bf16 weights and, for resuming, their float32 master weights."""
    out = tmp_path / "mixed"
    proc = run_cli("vision.train", *map(str, train_args(home / "data", out, "--precision", "bf16-mixed",
                                                         "--lm-mode", "full")), home=home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors import safe_open
    with safe_open(str(out / "last" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        lm_weights = [k for k in f.keys() if k.startswith("lm.")]
    with safe_open(str(out / "last" / "optimizer.safetensors"), "pt") as f:
        masters = {k.removeprefix("master/") for k in f.keys() if k.startswith("master/")}
        assert {f.get_slice(f"master/{k}").get_dtype() for k in masters} == {"F32"}
    assert lm_weights and set(lm_weights) <= masters
    assert json.loads((out / "last" / "state.json").read_text())["spec"]["precision"] == "bf16-mixed"
