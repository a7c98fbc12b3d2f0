"""The fine-tune -> evaluate -> predict -> submit pipeline, fast, on the 'tiny' random model and fixture data.

The real thing (SmolLM2 on Polish fortunes) is tests/test_klej_demo.py; this file checks the same code paths in
seconds: the loss and its class weights against torch / scikit-learn, early stopping against the metrics log, a
resumed run against an uninterrupted one (bit for bit), a nine-task submission zip, and the command line on a full
precision and on an NF4 base.
"""
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight

import training
from klej import finetune as ft
from klej.__main__ import main
from klej.results import write_results
from klej.submit import make_submission, prediction_file, write_predictions
from klej.tasks import TASKS, load_task
from model import ModelArgs, Transformer

FIXTURES = Path(__file__).parent / "fixtures" / "klej"
BASE = {"model": "tiny (random)", "adapter": None, "dtype": "float32", "quantize": None}


class ByteTokenizer:
    """UTF-8 bytes as ids; 1 and 2 (bytes that never occur in text) are BOS and EOS. Fits the 'tiny' vocab of 256."""
    bos_id, eos_id, pad_id, vocab_size, add_bos, add_eos, stop_ids = 1, 2, None, 256, True, False, (2,)

    def encode(self, text: str, bos: bool | None = None, eos: bool | None = None) -> list[int]:
        bos, eos = self.add_bos if bos is None else bos, self.add_eos if eos is None else eos
        return [1] * bos + list(text.encode()) + [2] * eos


def _tiny_classifier(task, cfg: ft.FinetuneConfig) -> ft.SequenceHead:
    torch.manual_seed(0)                      # the same random base for every run of a test
    return ft.prepare_classifier(Transformer(ModelArgs.from_name("tiny")), task, cfg)


CFG = dict(batch_size=2, max_len=64, lr=1e-3)


def test_class_weights_match_sklearn_balanced():
    rng = np.random.default_rng(0)
    task = TASKS["nkjp-ner"]
    y = rng.choice(5, size=200, p=[0.5, 0.2, 0.15, 0.1, 0.05])          # class 5 never occurs
    weights = ft.target_weights(task, y)
    expected = compute_class_weight("balanced", classes=np.unique(y), y=y)
    np.testing.assert_allclose(weights[np.unique(y)], expected, rtol=1e-12)
    ar = ft.target_weights(TASKS["ar"], rng.integers(1, 6, size=100).astype(float))
    assert ar[0] == 0 and (ar[1:] > 0).all()
    np.testing.assert_array_equal(ft.target_weights(TASKS["cdsc-r"], rng.uniform(0, 5, size=30)), np.ones(6))


def test_weighted_losses_match_references():
    gen = torch.Generator().manual_seed(1)
    logits, y = torch.randn(9, 4, generator=gen), torch.randint(0, 4, (9,), generator=gen)
    w = torch.rand(4, generator=gen) + 0.1
    total, weight = ft.loss_terms(TASKS["polemo2.0-in"], logits, y, w)
    torch.testing.assert_close(total / weight, F.cross_entropy(logits, y, weight=w))
    out, stars = torch.rand(9, 1, generator=gen), torch.randint(1, 6, (9,), generator=gen).double()
    w = torch.rand(6, generator=gen, dtype=torch.float64)
    total, weight = ft.loss_terms(TASKS["ar"], out.double(), stars, w)
    per = [(float(o) - (float(s) - 1) / 4) ** 2 for o, s in zip(out[:, 0], stars)]
    ws = [float(w[int(s)]) for s in stars]
    assert (total / weight).item() == pytest.approx(sum(a * b for a, b in zip(per, ws)) / sum(ws), rel=1e-12)


def test_lapt_adapter_is_merged_before_the_task_lora(tmp_path):
    from lora import LoRAConfig, inject_lora, lora_modules, save_adapter
    torch.manual_seed(0)
    lapt = Transformer(ModelArgs.from_name("tiny"))
    base = {k: v.clone().double() for k, v in lapt.state_dict().items()}
    lapt_cfg = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("wq", "wk", "w2"))
    inject_lora(lapt, lapt_cfg)
    for m in lora_modules(lapt).values():
        torch.nn.init.normal_(m.lora_B)
    save_adapter(lapt, lapt_cfg, tmp_path / "lapt")
    expected = {name: base[f"{name}.weight"] + 2.0 * (m.lora_B.double() @ m.lora_A.double())
                for name, m in lora_modules(lapt).items()}

    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny"))
    head = ft.prepare_classifier(model, TASKS["cdsc-e"], ft.FinetuneConfig(), lapt_adapter=tmp_path / "lapt")
    task_lora = lora_modules(model)
    assert sorted({n.rpartition(".")[2] for n in task_lora}) == ["wq", "wv"]
    assert all(m.r == 2 and m.scale == 8 for m in task_lora.values())
    for name, weight in expected.items():              # LAPT merged: W + (alpha / r) B A, under the task LoRA
        module = model.get_submodule(name)
        merged = module.base.weight if name in task_lora else module.weight
        torch.testing.assert_close(merged.double(), weight, rtol=1e-6, atol=1e-6)
    trainable = {n for n, p in head.named_parameters() if p.requires_grad}
    assert trainable == {"score.weight"} | {f"model.{n}.lora_{x}" for n in task_lora for x in "AB"}


def _trainable(head) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in head.named_parameters() if p.requires_grad}


# Dev scores that move: a new best at the 1st, 2nd and 4th evaluations, none at the 3rd, 5th, 6th and 7th, after which
# the patience of 3 has run out (the 8th is never reached). The fixture's 3 dev examples alone would score the same at
# every evaluation, and any checkpoint would pass for the best.
SCRIPTED_DEV = [0.2, 0.5, 0.3, 0.7, 0.4, 0.6, 0.5, 0.9]


def test_finetune_keeps_the_best_dev_weights_and_stops_early(tmp_path, monkeypatch):
    task = TASKS["cdsc-e"]
    cfg = ft.FinetuneConfig(**CFG, epochs=6, evals_per_epoch=4, patience=3)
    data = load_task(task, FIXTURES)
    head = _tiny_classifier(task, cfg)
    real_evaluate, seen = ft.evaluate, []

    def scripted(h, *args, **kwargs):   # the real evaluation (loss and all), its score replaced by the script's
        result = real_evaluate(h, *args, **kwargs)
        seen.append(_trainable(h))
        return {**result, task.metric: SCRIPTED_DEV[len(seen) - 1]}

    monkeypatch.setattr(ft, "evaluate", scripted)
    result = ft.finetune(head, ByteTokenizer(), task, data, tmp_path / task.name, cfg, BASE, progress=False)
    monkeypatch.setattr(ft, "evaluate", real_evaluate)

    records = [json.loads(line) for line in (tmp_path / task.name / "metrics.jsonl").read_text().splitlines()]
    scores = [(r["step"], r["dev_accuracy"]) for r in records if "dev_accuracy" in r]
    assert [score for _, score in scores] == SCRIPTED_DEV[:7]   # stopped after 3 evaluations without a new best
    best, best_step, bad = -1.0, None, 0
    for i, (step, score) in enumerate(scores):     # the stopping rule, replayed on the log
        if score > best:
            best, best_step, bad = score, step, 0
        else:
            bad += 1
            if bad == cfg.patience:
                assert i == len(scores) - 1, "training went on after the patience ran out"
    assert result["dev"] == best == 0.7 and result["best_step"] == best_step == scores[3][0]
    assert result["stopped_early"] and bad == cfg.patience
    # The weights of the 4th evaluation, not the last one's (training moved them since), are the ones saved in best/
    # and the ones the head holds on return.
    best_weights, last_weights = seen[3], seen[-1]
    assert any(not torch.equal(best_weights[n], last_weights[n]) for n in best_weights)
    for n, p in _trainable(head).items():
        assert torch.equal(p, best_weights[n]), n
    from model.safetensors import load_file
    saved = load_file(tmp_path / task.name / "best" / "score.safetensors")
    assert torch.equal(saved["score.weight"], best_weights["score.weight"])
    fresh = _tiny_classifier(task, cfg)
    ft.load_best(fresh, tmp_path / task.name / "best")
    for n, p in _trainable(fresh).items():
        assert torch.equal(p, best_weights[n]), n
    # Scoring dev afresh gives the loss logged at the best evaluation.
    dev = ft.evaluate(head, ByteTokenizer(), task, data.dev, cfg, ft.target_weights(task, data.train.y))
    logged = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert dev["loss"] == pytest.approx(logged[3], rel=1e-6) and logged[3] != pytest.approx(logged[-1], rel=1e-6)
    for name in ("run.json", "result.json", "checkpoint.pt", "loss.svg", "best/adapter.safetensors",
                 "best/score.safetensors"):
        assert (tmp_path / task.name / name).exists()


def test_non_finite_gradient_stops_before_the_update(tmp_path, monkeypatch):
    # sqrt(0 * loss): 0 going forward, an infinite derivative back: a finite loss with NaN gradients at step 3.
    task = TASKS["cdsc-e"]
    cfg = ft.FinetuneConfig(**CFG, epochs=1, evals_per_epoch=1)
    real, calls = ft.loss_terms, {"n": 0}

    def poisoned(*a):
        total, weight = real(*a)
        calls["n"] += 1
        return (total + torch.sqrt(total * 0) if calls["n"] == 3 else total), weight

    monkeypatch.setattr(ft, "loss_terms", poisoned)
    head = _tiny_classifier(task, cfg)
    with pytest.raises(training.NonFiniteLoss, match="gradient norm nan at step 3"):
        ft.finetune(head, ByteTokenizer(), task, load_task(task, FIXTURES), tmp_path / task.name, cfg, BASE,
                    progress=False)
    assert all(torch.isfinite(p).all() for p in head.parameters())


@pytest.mark.parametrize("name", ["ar", "cbd"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch, name):
    task = TASKS[name]
    cfg = ft.FinetuneConfig(**CFG, epochs=2, evals_per_epoch=2, patience=100)
    data = load_task(task, FIXTURES)
    whole = _tiny_classifier(task, cfg)
    ft.finetune(whole, ByteTokenizer(), task, data, tmp_path / "whole", cfg, BASE, progress=False)

    real_save, saves = training.save_checkpoint, []

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        saves.append(args[4])
        if len(saves) == 2:
            raise KeyboardInterrupt("killed after the second checkpoint")
    monkeypatch.setattr(training, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(_tiny_classifier(task, cfg), ByteTokenizer(), task, data, tmp_path / "cut", cfg, BASE,
                    progress=False)
    monkeypatch.setattr(training, "save_checkpoint", real_save)
    with pytest.raises(FileExistsError, match="--resume"):
        ft.finetune(_tiny_classifier(task, cfg), ByteTokenizer(), task, data, tmp_path / "cut", cfg, BASE,
                    progress=False)
    other = ft.FinetuneConfig(**{**CFG, "lr": 5e-4}, epochs=2, evals_per_epoch=2, patience=100)
    with pytest.raises(ValueError, match="run.json: the checkpoint .* another config"):
        ft.finetune(_tiny_classifier(task, other), ByteTokenizer(), task, data, tmp_path / "cut", other, BASE,
                    resume=True, progress=False)
    resumed = _tiny_classifier(task, cfg)
    ft.finetune(resumed, ByteTokenizer(), task, data, tmp_path / "cut", cfg, BASE, resume=True, progress=False)

    assert 0 < saves[-1] < json.loads((tmp_path / "whole" / "result.json").read_text())["steps"]
    for (n, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n
    assert (tmp_path / "whole" / "metrics.jsonl").read_text() == (tmp_path / "cut" / "metrics.jsonl").read_text()


def test_submission_of_all_nine_fixture_tasks(tmp_path):
    pred_dir = tmp_path / "predictions"
    cfg = ft.FinetuneConfig(**CFG)
    for task in TASKS.values():
        head = _tiny_classifier(task, cfg)
        data = load_task(task, FIXTURES)
        write_predictions(task, ft.predict(head, ByteTokenizer(), task, data.test, cfg),
                          prediction_file(pred_dir, task))
    out = make_submission(pred_dir, tmp_path / "submission.zip", FIXTURES)
    with zipfile.ZipFile(out) as z:
        assert sorted(z.namelist()) == sorted(f"test_pred_{t}.tsv" for t in TASKS)
        for task in TASKS.values():
            lines = z.read(f"test_pred_{task.name}.tsv").decode().splitlines()
            features = (FIXTURES / task.folder / "test_features.tsv").read_text(encoding="utf-8").splitlines()
            assert lines[0] == "target" and len(lines) == len(features)
            for value in lines[1:]:
                assert "\t" not in value
                assert (0 <= float(value) <= 5) if task.is_regression else value in task.labels


def test_submission_checks_name_the_file_and_line(tmp_path):
    pred_dir = tmp_path / "p"
    for task in TASKS.values():
        n = len((FIXTURES / task.folder / "test_features.tsv").read_text(encoding="utf-8").splitlines()) - 1
        write_predictions(task, np.ones(n), prediction_file(pred_dir, task))
    make_submission(pred_dir, tmp_path / "ok.zip", FIXTURES)
    path = prediction_file(pred_dir, TASKS["cdsc-e"])
    path.write_text("target\nENTAILMENT\nMAYBE\nNEUTRAL\nNEUTRAL\n")
    with pytest.raises(ValueError, match=r"test_pred_cdsc-e\.tsv:3: unknown label 'MAYBE'"):
        make_submission(pred_dir, tmp_path / "bad.zip", FIXTURES)
    path.write_text("target\nENTAILMENT\n")
    with pytest.raises(ValueError, match="1 predictions, but test_features.tsv of cdsc-e has 4 rows"):
        make_submission(pred_dir, tmp_path / "bad.zip", FIXTURES)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="test_pred_cdsc-e.tsv"):
        make_submission(pred_dir, tmp_path / "bad.zip")
    assert not (tmp_path / "bad.zip").exists()


def _tiny_checkpoint(folder: Path, tokenizer_model: Path) -> Path:
    """A random 'tiny' model (with Mistral's 32000-token vocabulary) saved in Mistral's layout + its tokenizer."""
    from model.safetensors import save_file
    args = ModelArgs.from_name("tiny")
    args.vocab_size = 32000
    torch.manual_seed(0)
    model = Transformer(args)
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps(args.to_params_json()))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "consolidated.safetensors")
    shutil.copy(tokenizer_model, folder / "tokenizer.model")
    return folder


def _check_reloaded_run(run_dir: Path, data_dir: Path) -> None:
    """The run rebuilt from its folder holds the best weights: trained ones (not the fresh initialisation), whose
    dev loss is the one logged at the best evaluation. (Its dev score alone proves little: a few fixture examples
    score the same whatever the weights.)"""
    head, tokenizer, task, cfg = ft.open_run(run_dir)
    result = json.loads((run_dir / "result.json").read_text())
    fresh = ft.prepare_classifier(ft.load_base(json.loads((run_dir / "run.json").read_text())["base"]["model"])[0],
                                  task, cfg)
    trained, initial = _trainable(head), _trainable(fresh)
    assert any(not torch.equal(trained[n], initial[n]) for n in trained)
    data = load_task(task, data_dir, seed=cfg.seed)
    dev = ft.evaluate(head, tokenizer, task, data.dev, cfg, ft.target_weights(task, data.train.y))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r["eval_loss"] for r in records if "eval_loss" in r and r["step"] == result["best_step"]]
    assert dev["loss"] == pytest.approx(logged[-1], rel=1e-5)
    assert dev[task.metric] == pytest.approx(result["dev"])


def test_command_line_finetune_evaluate_predict_results(tmp_path, mistral_tokenizer_path, capsys):
    checkpoint = _tiny_checkpoint(tmp_path / "tiny", mistral_tokenizer_path)
    out = tmp_path / "runs"
    common = ["--data-dir", str(FIXTURES), "--out", str(out), "--device", "cpu"]
    for name in ("cdsc-e", "psc"):
        main(["finetune", "--task", name, "--model", str(checkpoint), "--epochs", "1", "--batch-size", "4",
              "--max-len", "48", *common])
        main(["evaluate", "--task", name, *common])
        main(["predict", "--task", name, *common])
    printed = capsys.readouterr().out
    result = json.loads((out / "psc" / "result.json").read_text())
    assert f"psc: dev binary_f1 {result['dev']:.4f}" in printed       # the reloaded run scores what training saw
    for name in ("cdsc-e", "psc"):
        _check_reloaded_run(out / name, FIXTURES)
    assert prediction_file(out / "predictions", TASKS["cdsc-e"]).exists()
    table, path = write_results(out)
    assert set(json.loads(path.read_text())) == {"cdsc-e", "psc"}
    assert "cdsc-e" in table and "over 2 task(s)" in table
    with pytest.raises(FileNotFoundError, match="test_pred_nkjp-ner.tsv"):
        main(["submit", "--out", str(out)])


def test_command_line_finetune_evaluate_on_an_nf4_base(tmp_path, mistral_tokenizer_path, capsys):
    from lora import lora_modules
    from model.nf4 import NF4Linear
    checkpoint = _tiny_checkpoint(tmp_path / "tiny", mistral_tokenizer_path)
    model, _ = ft.load_base(checkpoint, "cpu", quantize="nf4")
    blocks = {n: type(m).__name__ for n, m in model.named_modules()
              if n.startswith("layers.") and isinstance(m, (torch.nn.Linear, NF4Linear))}
    assert len(blocks) == 7 * 3 and set(blocks.values()) == {"NF4Linear"}, blocks   # 7 projections, 3 blocks

    out = tmp_path / "runs"
    common = ["--task", "cdsc-e", "--data-dir", str(FIXTURES), "--out", str(out), "--device", "cpu"]
    main(["finetune", "--model", str(checkpoint), "--quantize", "nf4", "--epochs", "1", "--batch-size", "4",
          "--max-len", "48", *common])
    main(["evaluate", *common])
    result = json.loads((out / "cdsc-e" / "result.json").read_text())
    assert f"cdsc-e: dev accuracy {result['dev']:.4f}" in capsys.readouterr().out
    # The reloaded run is rebuilt on the NF4 base, as run.json records it: the task LoRA wraps 4-bit layers.
    head, *_ = ft.open_run(out / "cdsc-e")
    wrapped = lora_modules(head.model)
    assert wrapped and all(isinstance(m.base, NF4Linear) for m in wrapped.values())
