"""Data-parallel training of the report model (vision/distributed.py) on the CPU: gloo, 2 ranks under torchrun,
against one process with the same global batch.

Two torchrun jobs:
  worker   this file as a torchrun script: one DDP step (LoRA, every trained tensor's gradient and the next-step
           loss), one FSDP2 step (full fine-tuning: gradients, next-step loss, the gathered checkpoint), an FSDP2
           model resumed from a one-process checkpoint, validation generated over both ranks under FSDP2, full
           fine-tuning in bf16 with float32 master weights (precision bf16-mixed) under DDP and under FSDP2 (its
           gathered checkpoint, and a one-process one resumed sharded),
           `vision.train` resumed at world size 2 from a world-1 checkpoint, bench/ddp_train.py --tiny, and last
           a rank that raises while the other waits in an all-reduce.
  cli      `torchrun -m vision.train` on a tiny synthetic set: its per-step losses against a one-process run, and
           its checkpoint resumed at world size 1.
The two ranks hold different numbers of report tokens, so a plain average of per-rank means would not give one
process's gradients (checked here too): the exact global token mean is what makes them equal.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "tests"):  # run as a torchrun worker script
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from stablelm.lora import LoRALinear, make_optimizer  # noqa: E402
from test_parallel import torchrun  # noqa: E402  (2 ranks, free port, OMP_NUM_THREADS=1, 60 s timeout)
from vision import distributed, pipeline, synthetic  # noqa: E402
from vision import train as train_script  # noqa: E402
from vision.data import ReportDataset, collate_reports, load_annotation  # noqa: E402
from vision.report_model import ReportConfig, report_generation  # noqa: E402

WORLD = 2
B = 2  # studies per rank; the one-process reference takes WORLD * B
LR = 1e-3
TOL = dict(rtol=1e-4, atol=1e-5)
TRAIN = ["--batch-size", str(WORLD * B), "--max-length", "48", "--num-beams", "1", "--min-new-tokens", "0",
         "--max-new-tokens", "3", "--device", "cpu", "--lm-mode", "lora", "--lora-dropout", "0",
         "--encoder-mode", "lora", "--vis-lora-dropout", "0"]


def spec(tokenizer_dir: str, lm_mode: str, precision: str = "fp32") -> dict:
    report = ReportConfig(max_length=48, lm_mode=lm_mode, lora_dropout=0.0, encoder_mode="lora",
                          vis_lora_dropout=0.0,
                          generation=report_generation().replace(num_beams=1, min_new_tokens=0, max_new_tokens=3))
    return {"lm": None, "lm_preset": "tiny", "encoder": None, "encoder_preset": "tiny", "tokenizer": tokenizer_dir,
            "seed": 0, "report": report.to_dict(), "dataset": "iu_xray", "precision": precision}


def build(model_spec: dict):
    torch.manual_seed(0)
    model = pipeline.build_model(model_spec, "cpu", model_spec["precision"])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero, which would leave A without a gradient
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0.0, 0.02, generator=gen)
    return model


def batches(data: Path, share: slice = slice(None)) -> list[dict]:
    """Two global batches of WORLD * B training studies (or a rank's share of each)."""
    dataset = ReportDataset(load_annotation(data / "annotation.json"), data / "images", "train")
    return [collate_reports([dataset[i] for i in range(k * WORLD * B, (k + 1) * WORLD * B)][share]) for k in (0, 1)]


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def one_step(model_spec: dict, steps: list[dict], ranks: distributed.Ranks, mode: str = "auto") -> dict:
    """What train() does for one step (wrap, step_loss, backward, clip, AdamW, schedule), the gradients kept, then
    the loss of the next batch. The same code for one process (ranks not distributed) and for each rank."""
    model = build(model_spec)
    wrapped = distributed.wrap(model, ranks, mode)
    optimizer, scheduler = make_optimizer(model, LR, 0.05, 10)
    model.train()
    loss, logged = distributed.step_loss(wrapped, model, steps[0], ranks)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: full(p.grad).clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    scheduler.step()
    return {"loss": logged.item(), "grads": grads, "next": next_loss(wrapped, model, steps[1], ranks),
            "count": distributed.label_count(model, steps[0]["reports"]), "model": model, "wrapped": wrapped,
            "optimizer": optimizer, "scheduler": scheduler}


def next_loss(wrapped, model, batch, ranks) -> float:
    with torch.no_grad():
        return distributed.step_loss(wrapped, model, batch, ranks)[1].item()


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- worker (run by torchrun)
def worker(spec_path: str) -> None:
    job = json.loads(Path(spec_path).read_text())
    out, data = Path(job["out"]), Path(job["data"])
    ranks = distributed.setup("cpu")
    assert ranks.world == WORLD
    share = slice(ranks.rank * B, (ranks.rank + 1) * B)
    mine = batches(data, share)
    result = {}

    # DDP, LoRA on the LM and the encoder.
    step = one_step(job["lora"], mine, ranks)
    assert ranks.mode == "ddp"
    result["ddp"] = {k: step[k] for k in ("loss", "grads", "next", "count")}

    # FSDP2 full fine-tuning (auto for lm_mode full): the step, then its checkpoint gathered onto rank 0.
    step = one_step(job["full"], mine, ranks)
    assert ranks.mode == "fsdp" and type(step["model"].lm.layers[0].mlp.down.weight).__name__ == "DTensor"
    result["fsdp"] = {k: step[k] for k in ("loss", "grads", "next")}
    pipeline.save_run_checkpoint_rank0(ranks, out / "fsdp_ckpt", step["model"], job["full"], 0, 1, None,
                                       step["optimizer"], step["scheduler"])
    # Validation split over the ranks (rank 0's share is empty: 1 study), parameters gathered for it.
    val = ReportDataset(load_annotation(data / "annotation.json"), data / "images", "val")
    loader = torch.utils.data.DataLoader(distributed.validation_share(val, ranks), batch_size=B,
                                         collate_fn=collate_reports)
    with distributed.full_parameters(step["model"], ranks):
        result["val"] = pipeline.evaluate(step["model"], loader, "cpu")
    assert type(step["model"].lm.layers[0].mlp.down.weight).__name__ == "DTensor"  # sharded again
    result["after_val_next"] = next_loss(step["wrapped"], step["model"], mine[1], ranks)

    # A one-process checkpoint resumed under FSDP2.
    model = build(job["full"])
    distributed.wrap(model, ranks)
    optimizer, scheduler = make_optimizer(model, LR, 0.05, 10)
    pipeline.restore_training(pipeline.load_run_checkpoint(job["single_ckpt"]), model, optimizer, scheduler)
    result["resumed_next"] = next_loss(model, model, mine[1], ranks)
    # Full fine-tuning in bf16 with float32 master weights (precision bf16-mixed) under DDP.
    mixed = one_step(job["full_mixed"], mine, ranks, "ddp")
    assert ranks.mode == "ddp" and mixed["model"].lm.layers[0].mlp.down.weight.dtype == torch.bfloat16
    result["ddp_mixed"] = {k: mixed[k] for k in ("loss", "grads", "next")}
    del mixed
    # The same under FSDP2 (auto for lm_mode full): masters and moments sharded like the parameters, gathered into
    # the checkpoint; and a one-process bf16-mixed checkpoint resumed sharded.
    mixed = one_step(job["full_mixed"], mine, ranks)
    weight = mixed["model"].lm.layers[0].mlp.down.weight
    assert ranks.mode == "fsdp" and type(weight).__name__ == "DTensor" and weight.dtype == torch.bfloat16
    assert type(mixed["optimizer"].state[weight]["master"]).__name__ == "DTensor"
    result["fsdp_mixed"] = {k: mixed[k] for k in ("loss", "grads", "next")}
    pipeline.save_run_checkpoint_rank0(ranks, out / "fsdp_mixed_ckpt", mixed["model"], job["full_mixed"], 0, 1, None,
                                       mixed["optimizer"], mixed["scheduler"])
    del mixed
    model = build(job["full_mixed"])
    distributed.wrap(model, ranks)
    optimizer, scheduler = make_optimizer(model, LR, 0.05, 10)
    pipeline.restore_training(pipeline.load_run_checkpoint(job["single_mixed_ckpt"]), model, optimizer, scheduler)
    result["mixed_resumed_next"] = next_loss(model, model, mine[1], ranks)
    torch.save(result, out / f"rank{ranks.rank}.pt")

    # vision.train resumed at world size 2 from a checkpoint written by one process.
    train_script.main(job["resume_argv"])
    # The benchmark's CPU mode at this world size.
    from bench import ddp_train
    ddp_train.main(["--tiny", "--out", str(out / "bench.json")])

    ranks.barrier()  # everything above is written before the failure below
    if ranks.rank == 1:
        (out / "failed_at").write_text(str(time.time()))
        raise RuntimeError("rank 1 fails on purpose")
    torch.distributed.all_reduce(torch.ones(1))
    print("rank 0 passed the all-reduce", flush=True)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    data = tmp / "data"
    synthetic.main([str(data), "--studies", "11", "--views", "2", "--size", "64", "--seed", "2"])  # 8 train, 1 val
    texts = [e["report"].lower() for e in load_annotation(data / "annotation.json")["train"]]
    tokenizer = str(pipeline.build_tokenizer(texts + [ReportConfig().instruction], tmp / "tok", 512))
    return tmp, data, {"lora": spec(tokenizer, "lora"), "full": spec(tokenizer, "full"),
                       "full_mixed": spec(tokenizer, "full", "bf16-mixed")}


def train_argv(data: Path, out: Path, *extra) -> list[str]:
    return list(map(str, ["--annotation", data / "annotation.json", "--image-dir", data / "images", "--out", out,
                          "--tokenizer", data.parent / "tok", *TRAIN, *extra]))


@pytest.fixture(scope="module")
def single(setup):
    """One process, global batch WORLD * B: a DDP-mode (LoRA), a full-mode and a bf16-mixed full-mode step, and a
    full-mode checkpoint."""
    tmp, data, specs = setup
    steps = batches(data)
    ref = {mode: one_step(specs[mode], steps, distributed.Ranks()) for mode in ("lora", "full", "full_mixed")}
    for mode, name in (("full", "single_ckpt"), ("full_mixed", "single_mixed_ckpt")):
        s = ref[mode]
        pipeline.save_run_checkpoint(tmp / name, s["model"], specs[mode], 0, 1, None, s["optimizer"], s["scheduler"])
    return ref


@pytest.fixture(scope="module")
def single_run(setup):
    """`vision.train` in one process: 2 epochs (the curve to match), then resumed for a third."""
    tmp, data, _ = setup
    straight = train_script.main(train_argv(data, tmp / "single_run", "--epochs", "2"))
    resumed = train_script.main(train_argv(data, tmp / "single_resumed", "--epochs", "3", "--resume",
                                           tmp / "single_run" / "last"))
    return straight, resumed


@pytest.fixture(scope="module")
def worker_job(setup, single, single_run):
    tmp, data, specs = setup
    out = tmp / "worker"
    out.mkdir()
    job = tmp / "job.json"
    job.write_text(json.dumps({
        "out": str(out), "data": str(data), **specs, "single_ckpt": str(tmp / "single_ckpt"),
        "single_mixed_ckpt": str(tmp / "single_mixed_ckpt"),
        "resume_argv": train_argv(data, tmp / "resumed_at_2", "--epochs", "3", "--resume",
                                  tmp / "single_run" / "last")}))
    r = torchrun(__file__, "worker", str(job), timeout=300)
    ended = time.time()
    missing = [i for i in range(WORLD) if not (out / f"rank{i}.pt").exists()]
    assert not missing, f"ranks {missing} wrote no results:\n" + r.stdout[-3000:] + r.stderr[-6000:]
    return r, ended, out, [torch.load(out / f"rank{i}.pt") for i in range(WORLD)]


@pytest.fixture(scope="module")
def cli_run(setup):
    tmp, data, _ = setup
    out = tmp / "cli_run"
    r = torchrun("-m", "vision.train", *train_argv(data, out, "--epochs", "2"), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r, out


# ---------------------------------------------------------------- (a) DDP step == one process with the global batch
def test_ddp_gradients_and_next_loss_equal_one_process(worker_job, single, setup):
    _, _, _, ranks = worker_job
    ref = single["lora"]
    counts = [got["ddp"]["count"] for got in ranks]
    assert counts[0] != counts[1]  # unequal token counts: the case a plain mean of rank means gets wrong
    assert sum(counts) == ref["count"]
    assert set(ranks[0]["ddp"]["grads"]) == set(ref["grads"])
    assert any(".lora_A" in n for n in ref["grads"]) and any("encoder." in n for n in ref["grads"])
    for r, got in enumerate(ranks):
        for name, g in ref["grads"].items():
            assert g.abs().max() > 0, name
            torch.testing.assert_close(got["ddp"]["grads"][name], g, **TOL, msg=lambda m: f"rank {r} {name}: {m}")
        assert got["ddp"]["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert got["ddp"]["next"] == pytest.approx(ref["next"], rel=1e-5)
        assert got["ddp"]["next"] != pytest.approx(ref["loss"], rel=1e-5)  # the step changed something


def test_plain_mean_of_rank_means_would_differ(setup, single):
    """The exactness above is not luck: averaging each half's mean-loss gradient misses one process's."""
    _, data, specs = setup
    ref = single["lora"]
    halves = []
    for r in range(WORLD):
        model = build(specs["lora"])
        half = batches(data, slice(r * B, (r + 1) * B))[0]
        model(half["images"], half["reports"], half["image_mask"]).backward()
        halves.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    diff = max((sum(h[n] for h in halves) / WORLD - g).abs().max().item() for n, g in ref["grads"].items())
    assert diff > 1e-4


def test_label_count_is_the_losses_token_count(setup):
    _, data, specs = setup
    model = build(specs["lora"])
    b = batches(data)[0]
    _, labels, _ = model.training_inputs(b["images"], b["reports"], b["image_mask"])
    assert distributed.label_count(model, b["reports"]) == int((labels[:, 1:] != -100).sum())


# ---------------------------------------------------------------- (c) FSDP2 full fine-tuning
def test_fsdp_full_finetuning_step_equals_one_process(worker_job, single):
    _, _, _, ranks = worker_job
    ref = single["full"]
    assert any(n.startswith("lm.layers.") for n in ref["grads"]) and "lm.embed.weight" in ref["grads"]
    for r, got in enumerate(ranks):
        assert set(got["fsdp"]["grads"]) == set(ref["grads"])
        for name, g in ref["grads"].items():
            torch.testing.assert_close(got["fsdp"]["grads"][name], g, **TOL, msg=lambda m: f"rank {r} {name}: {m}")
        assert got["fsdp"]["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert got["fsdp"]["next"] == pytest.approx(ref["next"], rel=1e-5)
        # Validation (full parameters gathered, then sharded again) leaves training where it was.
        assert got["after_val_next"] == pytest.approx(ref["next"], rel=1e-5)
        # A checkpoint written by one process resumes under FSDP2 at world size 2.
        assert got["resumed_next"] == pytest.approx(ref["next"], rel=1e-5)


@pytest.mark.parametrize("mode", ["ddp_mixed", "fsdp_mixed"])
def test_bf16_mixed_full_finetuning_step_equals_one_process(worker_job, single, mode):
    """bf16 weights and gradients under DDP and FSDP2 (the all-reduce / reduce-scatter averages bf16 gradients):
    one process's gradients within bf16 rounding, and the next loss after MasterAdamW's step within bf16 rounding
    too; a one-process checkpoint resumed under FSDP2 takes the same next step."""
    _, _, _, ranks = worker_job
    ref = single["full_mixed"]
    assert "lm.embed.weight" in ref["grads"] and all(g.dtype == torch.bfloat16 for g in ref["grads"].values())
    for r, got in enumerate(ranks):
        assert set(got[mode]["grads"]) == set(ref["grads"])
        for name, g in ref["grads"].items():
            torch.testing.assert_close(got[mode]["grads"][name].float(), g.float(), rtol=3e-2,
                                       atol=3e-2 * g.abs().max().item(), msg=lambda m: f"rank {r} {name}: {m}")
        assert got[mode]["loss"] == pytest.approx(ref["loss"], rel=1e-2)
        assert got[mode]["next"] == pytest.approx(ref["next"], rel=1e-2)
        assert got[mode]["next"] != pytest.approx(ref["loss"], rel=1e-3)  # the step changed something
        assert got["mixed_resumed_next"] == pytest.approx(ref["next"], rel=1e-2)


def test_fsdp_bf16_mixed_checkpoint_gathers_float32_masters(worker_job, single, setup):
    """The checkpoint FSDP2 ranks write holds every master weight whole, in float32, near one process's (the
    gradients differ by bf16 rounding, AdamW's first step moves each weight by about lr), and resumes in one
    process."""
    _, _, out, _ = worker_job
    _, data, specs = setup
    ref = single["full_mixed"]
    run = pipeline.load_run_checkpoint(out / "fsdp_mixed_ckpt")
    ref_state = pipeline.named_optimizer_state(ref["model"], ref["optimizer"])["state"]
    assert set(run.optimizer["state"]) == set(ref_state)
    for name, values in ref_state.items():
        master = run.optimizer["state"][name]["master"]
        assert master.dtype == torch.float32 and master.shape == values["master"].shape, name
        # float32 bits, not a bf16 value widened (a master rounded on its way through the gather would be)
        assert (master != master.bfloat16().float()).float().mean() > 0.5, name
        # shards in their places: weights misplaced by a shard would differ by their own size (~0.02), not lr
        torch.testing.assert_close(master, values["master"], rtol=0, atol=2.5 * LR, msg=name)
    model = build(specs["full_mixed"])
    optimizer, scheduler = make_optimizer(model, LR, 0.05, 10)
    pipeline.restore_training(run, model, optimizer, scheduler)
    assert next_loss(model, model, batches(data)[1], distributed.Ranks()) == pytest.approx(ref["next"], rel=1e-2)


def test_fsdp_checkpoint_is_gathered_and_resumes_in_one_process(worker_job, single, setup):
    _, _, out, _ = worker_job
    _, _, specs = setup
    ref = single["full"]
    run = pipeline.load_run_checkpoint(out / "fsdp_ckpt")
    expected = ref["model"].trainable_state_dict()
    assert set(run.trained) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(run.trained[name], value, **TOL)
    ref_state = pipeline.named_optimizer_state(ref["model"], ref["optimizer"])["state"]
    assert set(run.optimizer["state"]) == set(ref_state)
    for name, values in ref_state.items():
        torch.testing.assert_close(run.optimizer["state"][name]["exp_avg_sq"], values["exp_avg_sq"], rtol=1e-4,
                                   atol=1e-9)
    model = build(specs["full"])
    optimizer, scheduler = make_optimizer(model, LR, 0.05, 10)
    pipeline.restore_training(run, model, optimizer, scheduler)
    assert next_loss(model, model, batches(setup[1])[1], distributed.Ranks()) == pytest.approx(ref["next"], rel=1e-5)


def test_validation_over_ranks_gathers_every_study(worker_job, setup):
    _, _, _, ranks = worker_job
    _, data, _ = setup
    val_ids = [e["id"] for e in load_annotation(data / "annotation.json")["val"]]
    for got in ranks:  # the same samples and scores on every rank, scored once by rank 0
        assert [s["id"] for s in got["val"]["samples"]] == val_ids
        assert got["val"] == ranks[0]["val"] and set(got["val"]["scores"]) >= {"BLEU_4", "CIDEr"}


# ---------------------------------------------------------------- (b) torchrun -m vision.train
def test_torchrun_training_matches_one_process_curve(cli_run, single_run):
    r, out = cli_run
    tmp = out.parent
    one, two = read_log(tmp / "single_run"), read_log(out)
    assert [e["step"] for e in two] == [e["step"] for e in one] == list(range(1, 5))  # 8 studies / 4, 2 epochs
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6) and b["lr"] == pytest.approx(a["lr"])
    assert len({e["loss"] for e in one}) == len(one)
    results = json.loads((out / "results.json").read_text())
    assert [e["world_size"] for e in results["epochs"]] == [2, 2]
    # Rank 0 alone prints: one summary line per epoch.
    assert r.stdout.count('"train_loss"') == 2 and r.stdout.count("trainable parameters") == 1
    assert (out / "best" / "model.safetensors").is_file() and not list(out.glob(".*tmp*"))


def test_world2_checkpoint_resumes_at_world1_and_world1_at_world2(cli_run, single_run, worker_job, setup):
    tmp, data, _ = setup
    _, out = cli_run
    resumed_at_1 = train_script.main(train_argv(data, tmp / "w2_resumed_at_1", "--epochs", "3", "--resume",
                                                out / "last"))
    # Each resumed run has its own directory, so its log holds the third epoch only.
    ref = read_log(tmp / "single_resumed")  # the one-process run resumed in one process
    assert [e["step"] for e in ref] == [5, 6]
    for got in (read_log(tmp / "w2_resumed_at_1"), read_log(tmp / "resumed_at_2")):
        assert [e["step"] for e in got] == [5, 6]
        for a, b in zip(ref, got):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
    assert resumed_at_1["epochs"][-1]["world_size"] == 1
    assert json.loads((tmp / "resumed_at_2" / "results.json").read_text())["epochs"][-1]["world_size"] == 2


# ---------------------------------------------------------------- bench, failure
def test_bench_tiny_at_world_2(worker_job):
    _, _, out, _ = worker_job
    payload = json.loads((out / "bench.json").read_text())
    rows = {r["row"]: r for r in payload["rows"]}
    assert set(rows) == {"lora-ddp", "full-fsdp", "full-ddp"}
    assert all(r["world"] == WORLD and r["samples_per_s"] > 0 and r["step_ms"] > 0 for r in rows.values())


def test_rank_failure_exits_nonzero_without_hanging(worker_job):
    r, ended, out, _ = worker_job
    assert (out / "failed_at").exists(), r.stderr[-6000:]  # it got as far as the deliberate failure
    assert r.returncode != 0
    assert "rank 1 fails on purpose" in r.stderr
    assert "passed the all-reduce" not in r.stdout
    # The collective timeout is 60 s here (STABLELM_DIST_TIMEOUT); torchrun brings rank 0 down well before it.
    assert ended - float((out / "failed_at").read_text()) < 45


def test_global_batch_must_divide_by_the_world_size():
    with pytest.raises(ValueError, match="global batch"):
        distributed.per_rank_batch(5, distributed.Ranks(world=2))
    assert distributed.per_rank_batch(8, distributed.Ranks(world=4)) == 2
    assert distributed.resolve_mode("auto", "full") == "fsdp" and distributed.resolve_mode("auto", "lora") == "ddp"


# ---------------------------------------------------------------- GPU
def gpu_worker(out_path: str) -> None:
    """Under torchrun --nproc-per-node 1 on a GPU: DDP over NCCL (world of one) against the plain step."""
    import tempfile

    ranks = distributed.setup("cuda")
    assert torch.distributed.get_backend() == "nccl"
    data = Path(tempfile.mkdtemp())
    synthetic.main([str(data / "d"), "--studies", "11", "--views", "2", "--size", "64", "--seed", "2"])
    texts = [e["report"].lower() for e in load_annotation(data / "d" / "annotation.json")["train"]]
    model_spec = spec(str(pipeline.build_tokenizer(texts, data / "tok", 512)), "lora")
    steps = batches(data / "d")

    def step(r):
        model = build(model_spec).cuda()
        wrapped = distributed.wrap(model, r)
        loss, logged = distributed.step_loss(wrapped, model, steps[0], r)
        loss.backward()
        return logged.item(), {n: p.grad.cpu() for n, p in model.named_parameters() if p.requires_grad}

    plain = step(distributed.Ranks(device=ranks.device))
    ddp = step(ranks)
    assert ranks.mode == "ddp"
    torch.save({"plain": plain, "ddp": ddp}, out_path)


@pytest.mark.gpu
def test_ddp_world_of_one_over_nccl_equals_plain_step(tmp_path):
    import subprocess

    out = tmp_path / "gpu.pt"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port",
                        str(__import__("test_parallel").free_port()), __file__, "gpu", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    got = torch.load(out)
    assert got["ddp"][0] == pytest.approx(got["plain"][0], rel=1e-6)
    for name, g in got["plain"][1].items():
        torch.testing.assert_close(got["ddp"][1][name], g, **TOL)  # CUDA kernels may sum in another order


if __name__ == "__main__":
    {"worker": worker, "gpu": gpu_worker}[sys.argv[1]](sys.argv[2])
