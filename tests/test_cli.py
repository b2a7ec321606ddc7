"""The command line through subprocess: list, show, bibtex, new."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import bibtexparser

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, root: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "catalog", *args], cwd=root, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_list_json_has_every_entry_and_filters_combine():
    everything = json.loads(run_cli("list", "--json").stdout)
    assert len(everything) == 78
    depth = json.loads(run_cli("list", "--json", "--category", "depth").stdout)
    assert depth and all(row["category"] == "depth" for row in depth)
    video = json.loads(run_cli("list", "--json", "--tag", "VID").stdout)
    assert video and all("VID" in row["tags"] for row in video)
    both = json.loads(run_cli("list", "--json", "--category", "depth", "--granularity", "exit").stdout)
    assert {r["id"] for r in both} == {r["id"] for r in depth if r["granularity"] == "exit"}
    assert "branchynet" in {r["id"] for r in both}
    planned = json.loads(run_cli("list", "--json", "--status", "planned").stdout)
    assert len(planned) < len(everything) or all(r["status"] == "planned" for r in everything)


def test_also_in_entries_appear_under_both_categories():
    resolution = {r["id"] for r in json.loads(run_cli("list", "--json", "--category", "resolution").stdout)}
    assert "multi_dim_dynamic_sr" in resolution


def test_list_table_is_readable():
    result = run_cli("list", "--category", "moe")
    assert result.returncode == 0
    assert "sparsely_gated_moe" in result.stdout and "hydranets" in result.stdout


def test_show_json_round_trips_the_entry():
    result = run_cli("show", "branchynet", "--json")
    assert result.returncode == 0
    data = json.loads(result.stdout)
    assert data["id"] == "branchynet" and data["paper"]["arxiv"] == "1709.01686"
    human = run_cli("show", "branchynet")
    assert "BranchyNet" in human.stdout and "https://arxiv.org/abs/1709.01686" in human.stdout


def test_bibtex_parses_back_with_one_record_per_id():
    result = run_cli("bibtex")
    assert result.returncode == 0
    db = bibtexparser.loads(result.stdout)
    ids = [r["ID"] for r in db.entries]
    assert len(ids) == 78 and len(set(ids)) == 78
    some = run_cli("bibtex", "branchynet", "convnet_aig")
    parsed = bibtexparser.loads(some.stdout).entries
    assert [r["ID"] for r in parsed] == ["branchynet", "convnet_aig"]
    assert parsed[0]["year"] == "2016" and "Teerapittayanon" in parsed[0]["author"]


def test_bibtex_keys_are_stable_between_runs():
    assert run_cli("bibtex").stdout == run_cli("bibtex").stdout


def test_new_scaffolds_an_entry_that_validates_and_a_contract_module(tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(REPO / "catalog", root / "catalog", ignore=shutil.ignore_patterns("__pycache__", "results"))
    (root / "implementations").mkdir()
    result = run_cli("new", "my_gated_net", "--category", "channel", root=root)
    assert result.returncode == 0, result.stderr
    entry = root / "catalog" / "entries" / "channel" / "my_gated_net.yaml"
    module = root / "implementations" / "channel" / "my_gated_net.py"
    assert entry.exists() and module.exists()
    validated = run_cli("validate", str(entry), root=root)
    assert validated.returncode == 0, validated.stdout
    check = subprocess.run(
        [sys.executable, "-c",
         "import torch; from implementations.channel import my_gated_net as m; cfg = m.Config();"
         "out, info = m.build(cfg).eval()(m.example_input(cfg, 2)); assert out.shape == (2, cfg.num_classes);"
         "assert 'aux_loss' in info; m.build_baseline(cfg); print('ok')"],
        cwd=root, capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert check.stdout.strip() == "ok", check.stderr
    again = run_cli("new", "my_gated_net", "--category", "channel", root=root)
    assert again.returncode == 2 and "already exists" in again.stderr
