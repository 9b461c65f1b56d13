"""Every bad manifest in tests/bad_manifests/ fails with exactly its .expected diagnostics."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from batchflux.cli import main
from batchflux.errors import EXIT_DATAERR, ManifestError
from batchflux.manifest import load_job
from batchflux.plan import validate_command

CORPUS = Path(__file__).parent / "bad_manifests"
CASES = sorted(p.name for p in CORPUS.iterdir() if p.name != "data"
               and not p.name.endswith(".expected"))


def test_corpus_has_at_least_40_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", CASES)
def test_bad_manifest_reports_exact_diagnostics(name, monkeypatch):
    monkeypatch.chdir(CORPUS)
    expected = (CORPUS / (name.rsplit(".", 1)[0] + ".expected")).read_text(encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    assert validate_command([name], out=out, err=err) == EXIT_DATAERR
    assert err.getvalue() == expected
    assert out.getvalue() == ""
    with pytest.raises(ManifestError) as info:
        load_job(name)
    assert info.value.exit_code == EXIT_DATAERR
    assert [str(d) for d in info.value.diagnostics] == expected.splitlines()


def test_missing_file_is_a_diagnostic_not_a_traceback(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["validate", str(missing)]) == EXIT_DATAERR
    assert capsys.readouterr().err == f"{missing}:0:0: (root): no such file\n"


def test_plan_of_a_bad_manifest_exits_65_with_diagnostics_on_err(monkeypatch, capsys):
    monkeypatch.chdir(CORPUS)
    assert main(["plan", "zip-mismatch.yaml"]) == EXIT_DATAERR
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (CORPUS / "zip-mismatch.expected").read_text()


def test_validate_reports_every_file(monkeypatch):
    monkeypatch.chdir(CORPUS)
    out, err = io.StringIO(), io.StringIO()
    status = validate_command(["empty.yaml", "bad-model.yaml"], out=out, err=err)
    assert status == EXIT_DATAERR
    assert err.getvalue().splitlines()[0].startswith("empty.yaml:0:0:")
    assert err.getvalue().splitlines()[1].startswith("bad-model.yaml:1:8:")
