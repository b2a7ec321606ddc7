"""Malformed entries and bad arguments: a message naming the file, the field and the reason; no traceback."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

VALID = {
    "id": "toy_method",
    "title": "A Toy Method for Tests",
    "authors": ["Ada Lovelace"],
    "year": 2020,
    "venue": "CVPR 2020",
    "paper": {"arxiv": "2001.00001", "url": "https://arxiv.org/abs/2001.00001"},
    "code": [{"url": "https://github.com/example/toy", "official": True, "framework": "pytorch"}],
    "taxonomy": {"category": "depth", "granularity": "layer", "decision": "gate", "training": ["gumbel_softmax"]},
    "summary": "A gate before every residual block decides per image whether the block runs; the gates are "
               "trained with a relaxation and a compute target.",
    "real_speedup_reported": {"status": "no"},
    "verification": {"confidence": "high", "sources": ["https://arxiv.org/abs/2001.00001"]},
    "implementation": {"status": "planned"},
}


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "catalog", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def write_entry(root: Path, data: dict | str, category: str = "depth", stem: str = "toy_method") -> Path:
    path = root / "entries" / category / f"{stem}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def mutated(**changes) -> dict:
    data = copy.deepcopy(VALID)
    for dotted, value in changes.items():
        target = data
        *parents, last = dotted.split("__")
        for key in parents:
            target = target[key]
        if value is DELETE:
            del target[last]
        else:
            target[last] = value
    return data


DELETE = object()

CASES = {
    "bad_yaml": ("title: [unclosed\nid: toy_method\n", "<yaml>", "invalid YAML"),
    "missing_field": (mutated(title=DELETE), "title", "required field is missing"),
    "mistyped_field": (mutated(year="twenty"), "year", "integer"),
    "unknown_field": (mutated(titel="x"), "titel", "unknown field"),
    "unknown_vocabulary": (mutated(taxonomy__granularity="voxel"), "taxonomy.granularity", "'voxel' is not allowed"),
    "bad_arxiv": (mutated(paper__arxiv="arXiv:17-11"), "paper.arxiv", "not an arXiv id"),
    "arxiv_as_number": (mutated(paper__arxiv=1711.11503), "paper.arxiv", "quoted string"),
    "non_http_url": (mutated(code=[{"url": "ftp://example.org/x", "official": True, "framework": "pytorch"}]),
                     "code[0].url", "http(s)"),
    "javascript_url": (mutated(paper__url="javascript:alert(1)"), "paper.url", "http(s)"),
    "module_outside_implementations": (
        mutated(implementation={"status": "runs", "module": "../../etc/evil.py",
                                "operating_points": [{"name": "paper", "knobs": {"k": 1}, "source": "x"}]}),
        "implementation.module", "inside implementations/"),
    "html_in_summary": (mutated(summary="<script>alert('x')</script> and a long enough summary text to pass "
                                        "the minimum length check of the schema."), "summary", "HTML"),
    "pipe_in_title": (mutated(title="Breaks | the table"), "title", "'|'"),
    "id_not_stem": (mutated(id="other_name"), "id", "file name stem"),
    "category_not_folder": (mutated(taxonomy__category="channel", taxonomy__granularity="channel"),
                            "taxonomy.category", "folder name"),
    "year_out_of_range": (mutated(year=1850), "year", "greater than or equal"),
    "bad_doi": (mutated(paper__doi="doi.org/abc"), "paper.doi", "not a DOI"),
    "duplicate_key": (yaml.safe_dump(VALID, sort_keys=False) + "year: 2021\n", "<yaml>", "duplicate key 'year'"),
    "not_a_mapping": ("- just\n- a list\n", "<entry>", "mapping"),
    "runs_without_module": (mutated(implementation={"status": "runs"}), "implementation", "needs a module path"),
    "no_paper_link": (mutated(paper={}), "paper", "needs an arxiv id or a url"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_entry_is_reported_with_file_field_and_reason(tmp_path, case):
    data, field, reason = CASES[case]
    path = write_entry(tmp_path, data)
    result = run_cli("validate", str(path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith(str(path))]
    assert any(f": {field}: " in line and reason in line for line in lines), result.stdout


def test_python_object_tag_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    text = yaml.safe_dump(VALID, sort_keys=False) + f"extra: !!python/object/apply:os.system ['touch {marker}']\n"
    path = write_entry(tmp_path, text)
    result = run_cli("validate", str(path))
    assert result.returncode == 1
    assert f"{path}: <yaml>: YAML tag" in result.stdout and "not allowed" in result.stdout
    assert "Traceback" not in result.stderr
    assert not marker.exists()


def test_duplicate_ids_across_files(tmp_path):
    write_entry(tmp_path, VALID)
    dup = write_entry(tmp_path, VALID, category="depth", stem="toy_method_copy")
    result = run_cli("validate", str(tmp_path / "entries"))
    assert result.returncode == 1
    assert f"{dup}: id: " in result.stdout


def test_every_problem_of_every_file_at_once(tmp_path):
    first = write_entry(tmp_path, mutated(year="x", venue=DELETE, taxonomy__decision="magic"))
    second = write_entry(tmp_path, mutated(id="second", paper__arxiv="bad"), stem="second")
    result = run_cli("validate", str(tmp_path / "entries"))
    assert result.returncode == 1
    out = result.stdout
    for expected in (f"{first}: year:", f"{first}: venue:", f"{first}: taxonomy.decision:", f"{second}: paper.arxiv:"):
        assert expected in out, out
    assert "4 problem(s) in 2 of 2 file(s)" in result.stderr


def test_valid_entry_passes(tmp_path):
    path = write_entry(tmp_path, VALID)
    result = run_cli("validate", str(path))
    assert result.returncode == 0, result.stdout
    assert "1 entries valid" in result.stdout


def test_missing_path_is_reported(tmp_path):
    result = run_cli("validate", str(tmp_path / "nope.yaml"))
    assert result.returncode == 1 and "no such file" in result.stdout


@pytest.mark.parametrize("args, message", [
    (("show", "convnet_ai"), "unknown id 'convnet_ai'; closest: convnet_aig"),
    (("bibtex", "branchynet", "nope_nope"), "unknown id 'nope_nope'"),
    (("list", "--category", "nope"), "invalid choice: 'nope'"),
    (("new", "Bad-Id", "--category", "depth"), "must be snake_case"),
    (("new", "branchynet", "--category", "depth"), "already exists"),
    (("frobnicate",), "invalid choice"),
])
def test_bad_arguments_exit_2_with_a_clear_message(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
