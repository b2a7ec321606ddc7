"""Stored results cannot drift from the code: every stored MAC count is recomputed here."""

from __future__ import annotations

import pytest

from catalog import knobs, results
from catalog.entries import load_all
from catalog.measure import counts, load_module

DOCS = results.load()
CPU_DOCS = [doc for doc in DOCS if doc["environment"]["device"] == "cpu"]
REQUIRED = ("operating_point", "config", "batch_size", "seed", "macs_dense", "macs_dynamic", "mac_reduction",
            "params_dense", "params_dynamic", "latency_ms_dense", "latency_ms_dynamic", "speedup",
            "realization", "decisions", "dtype")
ENV = ("device", "device_name", "cpu_model", "threads", "python", "torch", "commit", "date")


def _groups():
    """One case per (document, operating point): every batch size of that configuration."""
    for doc in CPU_DOCS:
        by_config: dict[str, list[dict]] = {}
        for row in doc["measurements"]:
            by_config.setdefault(repr(sorted(row["config"].items())) + f"-seed{row['seed']}", []).append(row)
        for rows in by_config.values():
            yield pytest.param(doc, rows, id=f"{doc['id']}-{doc['environment']['device']}-{rows[0]['operating_point']}")


def test_results_exist_for_every_implemented_entry():
    entries, problems = load_all()
    assert not problems
    implemented = {e.id for e in entries if e.implementation.status != "planned"}
    stored = {doc["id"] for doc in DOCS}
    assert implemented <= stored, f"run `python -m catalog bench {' '.join(sorted(implemented - stored))}`"


@pytest.mark.parametrize("doc", DOCS, ids=[d["_path"] for d in DOCS])
def test_result_documents_carry_provenance(doc):
    assert doc["schema_version"] == results.SCHEMA_VERSION
    for key in ENV:
        assert doc["environment"].get(key) not in (None, ""), key
    for row in doc["measurements"]:
        for key in REQUIRED:
            assert key in row, key
        assert row["mac_reduction"] == pytest.approx(row["macs_dense"] / row["macs_dynamic"])
        assert row["speedup"] == pytest.approx(row["latency_ms_dense"] / row["latency_ms_dynamic"])
        assert row["realization"] == pytest.approx(row["speedup"] / row["mac_reduction"])


@pytest.mark.parametrize("doc, rows", list(_groups()))
def test_stored_macs_match_a_recount(doc, rows):
    """Every row is recounted on models built afresh under its seed, as `catalog bench` measured it
    (a model's decisions may depend on what it ran before, e.g. borderline halting sums)."""
    entries, _ = load_all()
    entry = next(e for e in entries if e.id == doc["id"])
    module = load_module(entry)
    cfg = knobs.apply(module.Config, rows[0]["config"])
    for row in rows:
        fresh = counts(module, cfg, row["batch_size"], "cpu", seed=row["seed"])
        where = f"{doc['_path']}: {row['operating_point']}, batch {row['batch_size']}"
        for key in ("macs_dense", "macs_dynamic", "params_dense", "params_dynamic"):
            assert fresh[key] == row[key], f"{where}: {key} stored {row[key]}, recounted {fresh[key]}"


@pytest.mark.parametrize("doc", [d for d in DOCS if d not in CPU_DOCS], ids=lambda d: d["_path"])
def test_other_devices_ran_the_recounted_networks(doc):
    """A result from another device (a GPU) is not recounted here: its executed MACs are what that
    device ran, and they legitimately differ from the CPU's (the kernels' dense fallback has a
    per-device break-even, and float differences flip borderline exits and halting sums). Its dense
    MACs and parameters must equal the recounted CPU result of the same operating point and batch."""
    cpu = {(r["operating_point"], r["batch_size"]): r
           for d in CPU_DOCS if d["id"] == doc["id"] for r in d["measurements"]}
    assert cpu, f"{doc['_path']}: no CPU result of {doc['id']} to compare with"
    for row in doc["measurements"]:
        ref = cpu.get((row["operating_point"], row["batch_size"]))
        assert ref is not None, f"{doc['_path']}: {row['operating_point']}, batch {row['batch_size']}: no CPU row"
        for key in ("macs_dense", "params_dense", "params_dynamic"):
            assert row[key] == ref[key], f"{doc['_path']}: {key} {row[key]} != CPU {ref[key]}"
        assert 0 < row["macs_dynamic"], doc["_path"]


def test_git_commit_ignores_result_files_but_not_code(tmp_path, monkeypatch) -> None:
    """A benchmark writing results one by one must not mark its later results dirty; a code edit must."""
    import subprocess  # noqa: PLC0415

    from catalog.env import git_commit  # noqa: PLC0415

    monkeypatch.delenv("DYNNET_COMMIT", raising=False)

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "catalog" / "results").mkdir(parents=True)
    (tmp_path / "catalog" / "results" / "m.json").write_text("{}\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "init")
    clean = git_commit(tmp_path)
    assert len(clean) == 40 and not clean.endswith("-dirty")
    (tmp_path / "catalog" / "results" / "m.json").write_text('{"new": 1}\n')
    assert git_commit(tmp_path) == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == clean + "-dirty"
