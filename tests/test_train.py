"""train.py end to end on a tiny model: resume after kill -9 reproduces the losses bitwise, DDP equals one process,
a non-finite loss or gradient stops the run and keeps the last good checkpoint, a resume with other settings is
refused, --overwrite leaves nothing of the old run, float16 autocast scales the loss and resumes bitwise."""
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
import training
from model.args import ModelArgs
from model.transformer import Transformer

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("język polski należy do grupy zachodniosłowiańskich posługuje się nim około milionów ludzi głównie w "
         "Polsce stolicą jest Warszawa położona nad Wisłą katalog plik polecenie wyświetla zawartość opcja "
         "program użytkownik system zażółć gęślą jaźń źródło łańcuch znaków").split()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, mistral_tokenizer_path):
    """A tiny Mistral-layout checkpoint with the real Mistral tokenizer, and a few hundred lines of Polish words."""
    root = tmp_path_factory.mktemp("train")
    ckpt = root / "tiny"
    ckpt.mkdir()
    args = ModelArgs(dim=32, n_layers=2, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=32000,
                     sliding_window=16)
    torch.manual_seed(0)
    model = Transformer(args)
    torch.save(model.state_dict(), ckpt / "consolidated.00.pth")
    (ckpt / "params.json").write_text(json.dumps(args.to_params_json()))
    shutil.copy(mistral_tokenizer_path, ckpt / "tokenizer.model")
    rng = random.Random(0)
    for name, n in (("train.jsonl", 60), ("eval.jsonl", 6)):
        with open(root / name, "w") as f:
            for _ in range(n):
                f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80)))}) + "\n")
    return root


@pytest.fixture(scope="module")
def reference(workdir) -> Path:
    """The uninterrupted run (no evaluation) that the resumed ones must equal."""
    out = workdir / "reference"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINICURIE_CACHE", str(workdir / "cache"))
        train.main(common(workdir, out, "--no-eval"))
    return out


def common(workdir, out, *extra):
    return ["--model", str(workdir / "tiny"), "--data", str(workdir / "train.jsonl"),
            "--eval-data", str(workdir / "eval.jsonl"), "--out", str(out), "--seq-len", "32", "--micro-batch", "2",
            "--grad-accum", "2", "--steps", "8", "--warmup", "2", "--lr", "1e-2", "--lora-r", "4",
            "--lora-alpha", "8", "--save-interval", "1", "--eval-max-tokens", "400", "--eval-ctx", "64",
            "--eval-stride", "32", "--device", "cpu", *extra]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def env(workdir):
    return {**os.environ, "MINICURIE_CACHE": str(workdir / "cache"), "PYTHONPATH": str(ROOT)}


def resume_and_check(workdir, out: Path, reference: Path, capsys, *flags) -> int:
    """Resume the run in `out` and check that it really continued it: it starts at the checkpoint's step k > 0,
    runs only steps k+1.. (the metrics lines of steps <= k stay as the interrupted process wrote them, timings
    included: not rewritten by a fresh run from step 0), and ends with the uninterrupted run's losses and adapter,
    bit for bit. A --resume that restored nothing and began again at step 0 would reproduce the same losses (the run
    is deterministic): only the step it starts at and the untouched lines tell the two apart. -> k"""
    k = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    before = (out / "metrics.jsonl").read_text().splitlines()[:k]
    capsys.readouterr()
    train.main(common(workdir, out, *flags, "--resume"))
    assert f"resumed {out} at step {k}/" in capsys.readouterr().out
    assert k > 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert lines[:k] == before
    assert [json.loads(line)["step"] for line in lines] == list(range(1, len(losses(reference)) + 1))
    assert losses(out) == losses(reference)  # bitwise: same floats, same order
    from model.safetensors import load_file
    ours, theirs = (load_file(d / "adapter" / "adapter.safetensors") for d in (out, reference))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in ours)
    return k


def test_full_run_writes_the_run_folder_and_lowers_perplexity(workdir, monkeypatch):
    monkeypatch.setenv("MINICURIE_CACHE", str(workdir / "cache"))
    out = workdir / "full"
    result = train.main(common(workdir, out))
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "loss.svg").read_text().startswith("<svg")
    assert len(losses(out)) == 8
    assert result["after"]["perplexity"] < result["before"]["perplexity"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["perplexity_drop"] == pytest.approx(result["perplexity_drop"])


def test_kill_9_and_resume_reproduces_losses_bitwise(workdir, reference, monkeypatch, capsys):
    monkeypatch.setenv("MINICURIE_CACHE", str(workdir / "cache"))
    out = workdir / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *common(workdir, out, "--no-eval")],
                            env=env(workdir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill it mid-run, once a few steps are checkpointed
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()
    resume_and_check(workdir, out, reference, capsys, "--no-eval")


def test_existing_run_is_not_overwritten_by_accident(workdir, monkeypatch):
    monkeypatch.setenv("MINICURIE_CACHE", str(workdir / "cache"))
    out = workdir / "twice"
    train.main(common(workdir, out, "--no-eval", "--steps", "2"))
    with pytest.raises(SystemExit, match="--resume"):
        train.main(common(workdir, out, "--no-eval", "--steps", "2"))
    # Its checkpoint gone, the run's adapter still guards the folder, for a plain start and for --resume alike.
    (out / "checkpoint.pt").unlink()
    for flag in ((), ("--resume",)):
        with pytest.raises(SystemExit, match=r"adapter.*--overwrite"):
            train.main(common(workdir, out, "--no-eval", "--steps", "2", *flag))
    assert (out / "adapter" / "adapter.safetensors").exists()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one_process(workdir, monkeypatch, mode):
    # DDP also evaluates before and after, each rank scoring half of the windows: the same perplexities.
    monkeypatch.setenv("MINICURIE_CACHE", str(workdir / "cache"))
    single = workdir / f"single-{mode}"
    no_eval = ["--no-eval"] if mode == "fsdp" else []
    single_result = train.main(common(workdir, single, *no_eval, "--lora-dropout", "0", "--steps", "4"))
    out = workdir / mode
    args = common(workdir, out, *no_eval, "--lora-dropout", "0", "--steps", "4")
    args[args.index("--grad-accum") + 1] = "1"  # 2 processes x 1 micro-batch = 1 process x 2 accumulated
    if mode == "fsdp":
        args.append("--fsdp")
    # --standalone: the rendezvous takes a free port of the OS's choosing. A fixed port can be busy (another run on
    # a shared machine, a socket not yet released): with --master_port=29517 this test once failed in a full run and
    # passed when repeated. The output is kept, so that a failure says why.
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "train.py"), *args], env=env(workdir), timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, f"torchrun failed:\n{run.stderr[-4000:]}"
    assert losses(out) == pytest.approx(losses(single), abs=1e-5)
    from model.safetensors import load_file
    ours, theirs = (load_file(d / "adapter" / "adapter.safetensors") for d in (out, single))
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-5) for k in ours)
    if mode == "ddp":
        summary = json.loads((out / "summary.json").read_text())
        for when in ("before", "after"):
            assert summary[when]["tokens"] == single_result[when]["tokens"]
            assert summary[when]["perplexity"] == pytest.approx(single_result[when]["perplexity"], rel=1e-5)


# The 9th micro-batch (step 5) goes wrong: its loss is NaN, or (sqrt(0 * loss): 0 going forward, an infinite
# derivative back) its loss is finite and its gradients are NaN, which one AdamW step would spread to every adapter.
POISONS = {"loss": (lambda loss: loss * float("nan"), "loss is nan at step 5"),
           "gradient": (lambda loss: loss + torch.sqrt(loss * 0), "gradient norm is nan at step 5")}


@pytest.mark.parametrize("what", POISONS)
def test_non_finite_loss_or_gradient_stops_and_keeps_last_good_checkpoint(workdir, monkeypatch, what):
    monkeypatch.setenv("MINICURIE_CACHE", str(workdir / "cache"))
    out = workdir / f"nan-{what}"
    import model.kernels
    real = model.kernels.linear_cross_entropy   # the loss Transformer.forward(tokens, targets=...) computes
    poison, message = POISONS[what]
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return poison(loss) if calls["n"] == 9 else loss

    monkeypatch.setattr(model.kernels, "linear_cross_entropy", poisoned)
    with pytest.raises(train.training.NonFiniteLoss, match=message):
        train.main(common(workdir, out, "--no-eval"))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4
    assert all(torch.isfinite(t).all() for t in ckpt["trainable"].values())
    assert all(math.isfinite(json.loads(line)["loss"]) for line in (out / "metrics.jsonl").read_text().splitlines())


def test_resume_refuses_other_settings(workdir, reference, monkeypatch, capsys):
    monkeypatch.setenv("MINICURIE_CACHE", str(workdir / "cache"))
    out = workdir / "settings"
    train.main(common(workdir, out, "--no-eval", "--max-steps-this-run", "2"))
    # Another schedule (--steps) or adapter scale grafted onto the run's first steps would be neither run.
    with pytest.raises(ValueError, match=r"--steps was 8, now 9; --lora-alpha was 8\.0, now 16\.0"):
        train.main(common(workdir, out, "--no-eval", "--resume", "--steps", "9", "--lora-alpha", "16"))
    # Intervals may change; the same settings continue the run, from step 2, to the uninterrupted run's end.
    assert resume_and_check(workdir, out, reference, capsys, "--no-eval", "--save-interval", "3") == 2


def test_overwrite_removes_the_old_run_first(workdir, monkeypatch):
    monkeypatch.setenv("MINICURIE_CACHE", str(workdir / "cache"))
    out = workdir / "overwritten"
    train.main(common(workdir, out, "--no-eval", "--steps", "2"))
    assert (out / "checkpoint.pt").exists() and (out / "adapter").exists()
    args = common(workdir, out, "--no-eval", "--steps", "2", "--overwrite")
    args[args.index("--data") + 1] = str(workdir / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):   # the new run fails before its first step
        train.main(args)
    # ... and leaves nothing of the old one that --resume could continue or a reader take for the new one's.
    assert not any((out / name).exists() for name in ("checkpoint.pt", "adapter", "metrics.jsonl", "summary.json"))


def test_float16_autocast_scales_the_loss_and_resumes_bitwise(workdir, monkeypatch, capsys):
    monkeypatch.setenv("MINICURIE_CACHE", str(workdir / "cache"))
    reference, out = workdir / "fp16-reference", workdir / "fp16-resumed"
    flags = ("--no-eval", "--autocast", "float16", "--steps", "4", "--eval-interval", "3")
    train.main(common(workdir, reference, *flags))
    train.main(common(workdir, out, *flags, "--max-steps-this-run", "2"))
    assert torch.load(out / "checkpoint.pt", weights_only=True)["extra"]["scaler"]["scale"] == 2.0 ** 16
    assert resume_and_check(workdir, out, reference, capsys, *flags) == 2
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) and r["loss_scale"] == 2.0 ** 16 and not r["skipped"] for r in records)
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 4]   # every 3 steps, and at the last one


def test_float16_overflow_skips_the_step_and_a_lasting_one_stops_the_run(workdir, monkeypatch):
    # From the 9th micro-batch (step 5) on, every gradient is NaN (sqrt(0 * loss), as above). Loss scaling takes
    # each such step for an overflow: skipped, adapters untouched, scale halved; once the scale is below 1 that
    # explanation no longer holds and the run stops: 2^16 halved at steps 5..21 is 0.5.
    monkeypatch.setenv("MINICURIE_CACHE", str(workdir / "cache"))
    flags = ("--no-eval", "--autocast", "float16", "--steps", "30")
    four = workdir / "fp16-four-steps"
    train.main(common(workdir, four, *flags, "--max-steps-this-run", "4"))
    import model.kernels
    real, calls = model.kernels.linear_cross_entropy, {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss + torch.sqrt(loss * 0) if calls["n"] >= 9 else loss

    monkeypatch.setattr(model.kernels, "linear_cross_entropy", poisoned)
    out = workdir / "fp16-overflow"
    with pytest.raises(train.training.NonFiniteLoss, match=r"step 21 .*scale is down to 0\.5"):
        train.main(common(workdir, out, *flags))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [False] * 4 + [True] * 16
    assert [r["loss_scale"] for r in records[4:]] == [2.0 ** (16 - i) for i in range(16)]
    last, after_four = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (out, four))
    assert last["step"] == 20
    assert all(torch.equal(last["trainable"][k], after_four["trainable"][k]) for k in after_four["trainable"])


def test_curie_style_run_nf4_bf16_checkpointing_neftune(workdir, monkeypatch):
    # The paper's combination on the tiny model: NF4 base, bf16 weights and autocast, activation checkpointing,
    # NEFTune noise, the fused LoRA head + loss. It trains (finite, falling losses) and saves the adapter.
    monkeypatch.setenv("MINICURIE_CACHE", str(workdir / "cache"))
    out = workdir / "curie-style"
    train.main(common(workdir, out, "--no-eval", "--quantize", "nf4", "--dtype", "bfloat16", "--autocast",
                      "bfloat16", "--grad-checkpointing", "--neftune-alpha", "2", "--steps", "6"))
    curve = losses(out)
    assert len(curve) == 6 and all(map(math.isfinite, curve))
    assert min(curve[-2:]) < curve[0]
    assert (out / "adapter" / "adapter.safetensors").exists()


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    # A write that dies half-way (a kill, a full disk) leaves the previous checkpoint whole under its name.
    path = tmp_path / "checkpoint.pt"
    training.atomic_torch_save({"step": 1, "w": torch.arange(1000.0)}, path)
    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04" + bytes(100))   # the start of a file, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space"):
        training.atomic_torch_save({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.arange(1000.0))
    # The same for text files (config.json, summary.json, a rewritten metrics log).
    text = tmp_path / "summary.json"
    training.atomic_write_text(text, "old")
    monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: (open(self, "w").write("ne"), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        training.atomic_write_text(text, "new")
    assert text.read_text() == "old"


def test_metrics_log_resumed_at_a_step_drops_the_records_after_it(tmp_path):
    # A run killed after logging step 5 but checkpointing step 3 repeats steps 4 and 5 when resumed: their first
    # records go, so that the log tells the run's story once. A fresh run (no resume step) starts an empty log.
    path = tmp_path / "metrics.jsonl"
    log = training.MetricsLog(path)
    for step in range(1, 6):
        log.log({"step": step, "loss": 1.0 / step})
    lines = path.read_text().splitlines()
    resumed = training.MetricsLog(path, resume_step=3)
    assert [r["step"] for r in resumed.records] == [1, 2, 3]
    assert path.read_text().splitlines() == lines[:3]
    resumed.log({"step": 4, "loss": 0.0})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    assert training.MetricsLog(path).records == [] and path.read_text() == ""


@pytest.mark.parametrize("flags, native", [("fpu avx2 avx512f avx512_bf16 sse", True), ("fpu amx_bf16 amx_tile", True),
                                           ("fpu avx2 avx512f avx512bw", False), ("fpu avx2 fma", False)])
def test_autocast_auto_is_bfloat16_only_where_the_cpu_multiplies_bf16(tmp_path, monkeypatch, flags, native):
    # /proc/cpuinfo as Linux writes it: one "flags" line per core; "avx512_bf16" must match as a whole word only.
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("".join(f"processor\t: {i}\nmodel name\t: x\nflags\t\t: {flags}\n\n" for i in range(2)))
    real_path = training.Path
    monkeypatch.setattr(training, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
    assert training.cpu_has_bf16() is native
    assert training.resolve_autocast("auto", "cpu") == ("bfloat16" if native else None)
    # An explicit choice wins whatever the hardware; "none" is the base's dtype.
    for choice, resolved in (("bfloat16", "bfloat16"), ("float16", "float16"), ("none", None)):
        assert training.resolve_autocast(choice, "cpu") == resolved
    args = train.parse_args(["--device", "cpu"])
    assert args.autocast == ("bfloat16" if native else None)     # the presets' default is auto
    assert train.parse_args(["--device", "cpu", "--autocast", "none"]).autocast is None
    assert train.run_settings(args, 1)["autocast"] == args.autocast   # the resolved choice is what a resume checks


def test_autocast_auto_on_cuda_asks_for_native_bf16(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for native in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True, n=native: calls.append(including_emulation) or n)
        assert training.resolve_autocast("auto", "cuda:1") == ("bfloat16" if native else None)
    assert calls == [False, False]   # emulated bf16 (pre-Ampere) is not native
