"""The LLaMA demo end to end on a tiny model and a tiny text: both runs train, the report is whole.

Eager (``--no-compile``) so that it runs in seconds: compiling the step twice with Inductor
takes about a minute on 2 cores. The compiled path is the demo's default and is covered by the
backend's own tests; here we check the script around it. One thread: on a busy 2-core machine
two OpenMP threads spin against other processes and a tiny step gets 10-50x slower.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "train_llama.py"

TEXT = (
    "Shall I compare thee to a summer's day?\n"
    "Thou art more lovely and more temperate:\n"
    "Rough winds do shake the darling buds of May,\n"
    "And summer's lease hath all too short a date.\n"
)


def load_script():
    spec = importlib.util.spec_from_file_location("train_llama", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_report_and_both_losses_fall(tmp_path):
    text = tmp_path / "sonnet.txt"
    text.write_text(TEXT * 40, encoding="utf-8")
    out = tmp_path / "out"
    argv = [
        "--text",
        str(text),
        "--out",
        str(out),
        "--no-compile",
        "--steps",
        "30",
        "--dim",
        "32",
        "--layers",
        "1",
        "--heads",
        "2",
        "--seq-len",
        "32",
        "--batch-size",
        "8",
        "--val-windows",
        "16",
        "--evals",
        "3",
        "--lr",
        "1e-2",
        "--threads",
        "1",
        "--budget",  # this tiny model's embedding and head (level 0) alone hold 15.7%
        "0.2",
    ]
    threads = torch.get_num_threads()
    try:
        load_script().main(argv)
    finally:
        torch.set_num_threads(threads)  # main() sets it process-wide

    report = json.loads((out / "report.json").read_text())
    assert {"adamw", "foam", "foam-int8"} <= report.keys()  # the default runs
    for name in ("adamw", "foam", "foam-int8"):
        run = report[name]
        for key in (
            "val_loss",
            "train_loss",
            "optimizer_state_bytes",
            "tokens_per_s",
            "config",
            "val_curve",
            "memory_report",
            "state_fraction",
        ):
            assert key in run, (name, key)
        curve = run["val_curve"]
        assert curve[0][0] == 0 and curve[-1][0] == 30
        assert run["val_loss"] == curve[-1][1]
        assert curve[-1][1] < curve[0][1] - 0.5, f"{name}: validation loss did not fall: {curve}"
    assert report["foam"]["config"]["level"] == 2 and report["adamw"]["config"]["level"] == 0
    # Level 2 folds the attention/MLP weights 4x; embeddings, head and norms stay full size.
    assert report["foam"]["optimizer_state_bytes"] < report["adamw"]["optimizer_state_bytes"]
    # int8 moments at levels the cost model picks within the budget (of the moments' bytes;
    # state_fraction also counts the step counters both optimizers keep)
    int8 = report["foam-int8"]
    assert int8["config"]["state_format"] == "int8" and int8["config"]["level"] == "auto"
    assert int8["state_fraction"] < report["foam"]["state_fraction"] < 1
    assert int8["config"]["budget"] == 0.2
    assert int8["moment_bytes"] <= 0.2 * report["adamw"]["moment_bytes"]
    assert report["adamw"]["state_fraction"] == 1
    rows = report["foam-int8"]["memory_report"]["rows"]
    assert (
        rows["optimizer state"]["bytes_per_param"]
        < rows["optimizer state"]["adamw_bytes_per_param"]
    )
    assert (out / "loss.png").stat().st_size > 0
    assert "| foam / AdamW | foam-int8 / AdamW |" in (out / "report.md").read_text()


def test_bf16_weights_with_correction_and_int8_state(tmp_path):
    """--dtype bf16 --master-weights int8 --state-format int8: one FOAM run beside AdamW."""
    text = tmp_path / "sonnet.txt"
    text.write_text(TEXT * 40, encoding="utf-8")
    out = tmp_path / "out"
    argv = ["--text", str(text), "--out", str(out), "--no-compile", "--steps", "30"]
    argv += ["--dim", "32", "--layers", "1", "--heads", "2", "--seq-len", "32"]
    argv += ["--batch-size", "8", "--val-windows", "16", "--evals", "3", "--threads", "1"]
    argv += ["--dtype", "bf16", "--master-weights", "int8", "--state-format", "int8"]
    threads = torch.get_num_threads()
    try:
        load_script().main(argv)
    finally:
        torch.set_num_threads(threads)
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"adamw", "foam-bf16-int8", "meta"}
    run = report["foam-bf16-int8"]
    assert run["config"]["dtype"] == "bf16" and run["config"]["master_weights"] == "int8"
    rows = run["memory_report"]["rows"]
    assert rows["weights"]["bytes_per_param"] == 2  # bfloat16
    assert rows["master weights"]["bytes_per_param"] == 1  # int8 correction bits
    assert report["adamw"]["config"]["dtype"] == "fp32"  # the reference stays float32
    curve = run["val_curve"]
    assert curve[-1][1] < curve[0][1] - 0.5, f"validation loss did not fall: {curve}"


def test_budget_without_an_auto_run_is_refused(capsys):
    script = load_script()
    with pytest.raises(SystemExit):
        script.parse_args(["--state-format", "int8", "--budget", "0.1"])
    assert "--budget is the budget of a level='auto' run" in capsys.readouterr().err
    assert script.parse_args(["--state-format", "int8", "--level", "auto"]).budget == 0.075
