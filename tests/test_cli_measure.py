"""`catalog run` and `catalog bench` from the command line: JSON keys, knob errors, failing entries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from catalog import cli, cli_measure, measure
from catalog.cli_measure import RUN_KEYS, _config
from catalog.entries import load_all

REPO = Path(__file__).resolve().parents[1]
SMALL = ("--set", "depth=8", "--min-time", "0.05")  # a CIFAR ResNet-8: fast enough for a test


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "catalog", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def _entry(entry_id: str):
    entries, problems = load_all()
    assert not problems
    return next(e for e in entries if e.id == entry_id)


def test_run_json_has_the_documented_keys_and_consistent_ratios():
    result = run_cli("run", "branchynet", "--json", "--batch-size", "2", *SMALL)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert set(RUN_KEYS) <= set(doc)
    assert doc["id"] == "branchynet" and doc["batch_size"] == 2 and doc["device"] == "cpu"
    assert doc["config"]["depth"] == 8 and doc["operating_point"] == "first_exit"
    assert doc["macs_dynamic"] > 0 and doc["macs_dense"] > 0  # at depth 8 the exit branches outweigh the saving
    assert doc["mac_reduction"] == pytest.approx(doc["macs_dense"] / doc["macs_dynamic"], rel=1e-6)
    assert doc["realization"] == pytest.approx(doc["speedup"] / doc["mac_reduction"], rel=1e-3)
    for key in ("torch", "threads", "commit", "date", "device_name"):
        assert key in doc["environment"], key


def test_run_human_output_shows_the_table_and_the_decisions():
    result = run_cli("run", "branchynet", *SMALL)
    assert result.returncode == 0, result.stderr
    for text in ("dense vs dynamic", "MACs / sample", "realization", "decisions taken:",
                 "config (operating point first_exit)"):
        assert text in result.stdout, text


@pytest.mark.parametrize("args, message", [
    (("run", "branchynet", "--set", "nope=1"), "nope"),
    (("run", "branchynet", "--set", "depth=abc"), "depth"),
    (("run", "branchynet", "--set", "depth"), "--set 'depth': expected key=value"),
    (("run", "branchynet", "--point", "nope"), "known: first_exit"),
    (("run", "branchynet", "--batch-size", "0"), "--batch-size"),
    (("run", "branchynet", "--device", "tpu"), "--device"),
    (("run", "dds_net"), "status 'planned'"),
    (("run", "branchynett"), "closest: branchynet"),
    (("bench",), "give entry ids or --all"),
])
def test_bad_run_and_bench_arguments_exit_2_with_a_clear_message(args, message, capsys):
    assert cli.main(list(args)) == 2  # in process: the same entry point as `python -m catalog`
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_train_without_point_uses_the_default_config():
    entry = _entry("convnet_aig")
    module = measure.load_module(entry)
    cfg, point = _config(module, entry, None, ["width=4"], train=True)
    assert point is None and cfg == module.Config(width=4)
    cfg, point = _config(module, entry, None, [], train=False)
    assert point.name == entry.implementation.operating_points[0].name
    assert cfg.depth == entry.implementation.operating_points[0].knobs["depth"]


def test_bench_reports_a_failing_entry_and_goes_on(tmp_path, monkeypatch, capsys):
    written = []

    def fake_bench(entry, root, device, batch_sizes, seed, min_time):
        if entry.id == "branchynet":
            raise RuntimeError("boom in the forward pass")
        path = Path(root) / f"{entry.id}.json"
        path.write_text("{}")
        written.append(entry.id)
        return path

    monkeypatch.setattr(measure, "bench_entry", fake_bench)
    code = cli.main(["bench", "branchynet", "convnet_aig", "--in-process", "--results-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert written == ["convnet_aig"] and (tmp_path / "convnet_aig.json").exists()
    assert "branchynet: RuntimeError: boom in the forward pass" in err
    assert "1 of 2 entries failed" in err


def test_bench_of_several_entries_runs_each_in_its_own_process(tmp_path, monkeypatch, capsys):
    children = []

    def fake_child(entry_id, args):
        if entry_id == "branchynet":
            raise RuntimeError("RuntimeError: boom in the forward pass")
        children.append(entry_id)
        return tmp_path / f"{entry_id}.json"

    def not_here(*_args):
        raise AssertionError("bench_entry ran in the parent process")

    monkeypatch.setattr(cli_measure, "bench_in_child", fake_child)
    monkeypatch.setattr(measure, "bench_entry", not_here)
    code = cli.main(["bench", "branchynet", "convnet_aig", "--results-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 1 and children == ["convnet_aig"]
    assert f"wrote {tmp_path / 'convnet_aig.json'}" in out
    assert "branchynet: RuntimeError: boom in the forward pass" in err and "1 of 2 entries failed" in err


def test_bench_in_child_passes_the_arguments_and_reads_back_its_result(tmp_path, monkeypatch):
    args = cli_measure.argparse.Namespace(device="cpu", batch_sizes=[1, 8], seed=3, min_time=0.5,
                                          results_dir=str(tmp_path))
    cmd = cli_measure.child_command("dynconv", args)
    assert cmd[1:] == ["-m", "catalog", "bench", "dynconv", "--in-process", "--device", "cpu", "--batch-sizes",
                       "1", "8", "--seed", "3", "--min-time", "0.5", "--results-dir", str(tmp_path.resolve())]
    replies = iter([
        subprocess.CompletedProcess(cmd, 0, stdout=f"wrote {tmp_path}/dynconv/cpu.json\n", stderr=""),
        subprocess.CompletedProcess(cmd, 1, stdout="", stderr="FAILED dynconv: ValueError: bad\n"
                                    "1 of 1 entries failed:\n  dynconv: ValueError: bad knob\n"),
        subprocess.CompletedProcess(cmd, 1, stdout="", stderr="Killed\n"),
    ])
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: next(replies))
    assert cli_measure.bench_in_child("dynconv", args) == tmp_path / "dynconv" / "cpu.json"
    with pytest.raises(RuntimeError, match="^ValueError: bad knob$"):
        cli_measure.bench_in_child("dynconv", args)
    with pytest.raises(RuntimeError, match="^Killed$"):
        cli_measure.bench_in_child("dynconv", args)


@pytest.mark.parametrize("flag", [True, False])
def test_exact_fp32_turns_tf32_off_on_cuda_only_and_restores_it(flag):
    """Measuring on CUDA: dense cuDNN/cuBLAS may not use TF32 while the Triton kernels compute exact fp32."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    try:
        cudnn.allow_tf32 = matmul.allow_tf32 = flag
        with measure.exact_fp32(torch.device("cuda")):  # only flags are touched: no GPU needed
            assert not cudnn.allow_tf32 and not matmul.allow_tf32
        assert cudnn.allow_tf32 is flag and matmul.allow_tf32 is flag
        with measure.exact_fp32(torch.device("cpu")):
            assert cudnn.allow_tf32 is flag and matmul.allow_tf32 is flag
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved
