"""The main command end to end: all seven chapters at micro size through pipeline.py, the same
code path as `bash run.sh` (each chapter a subprocess, as a reader runs it), then report.md."""
import importlib
import json

import pytest

pipeline = importlib.import_module("pipeline")
UserError = importlib.import_module("01_tokenizer").UserError


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smoke")
    timings = pipeline.main(["--smoke", "--run-dir", str(run_dir)])
    return run_dir, timings


def test_every_stage_writes_its_checkpoint_metrics_and_figures(smoke_run):
    run_dir, timings = smoke_run
    assert sorted(timings) == sorted(pipeline.STAGES)
    for name, (script, title, outputs) in pipeline.STAGES.items():
        for f in outputs:
            assert (run_dir / f).is_file() and (run_dir / f).stat().st_size > 0, (name, f)
        for f in outputs:
            if f.endswith(".json"):
                json.loads((run_dir / f).read_text())
            if f.endswith(".png"):
                assert (run_dir / f).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((run_dir / "pipeline.json").read_text()).keys() == timings.keys()


def test_report_has_every_chapter_filled_in(smoke_run):
    run_dir, _ = smoke_run
    report = (run_dir / "report.md").read_text()
    for name, (script, title, outputs) in pipeline.STAGES.items():
        assert f"## {name} {title}" in report
    assert "not run yet" not in report and "could not read" not in report
    for png in [f for _, _, outputs in pipeline.STAGES.values() for f in outputs if f.endswith(".png")]:
        assert f"({png})" in report, png   # every figure is shown


def test_finished_stages_are_skipped_and_rerun_on_request(smoke_run, capsys):
    run_dir, _ = smoke_run
    before = {f: (run_dir / f).stat().st_mtime_ns for f in ("tokenizer.json", "model.json", "sft.json")}
    pipeline.main(["--smoke", "--run-dir", str(run_dir), "--rerun", "02", "--only", "01", "02"])
    out = capsys.readouterr().out
    assert "01 Tokenizer (Sec. 2.2): outputs present, skipped" in out
    assert (run_dir / "tokenizer.json").stat().st_mtime_ns == before["tokenizer.json"]
    assert (run_dir / "model.json").stat().st_mtime_ns > before["model.json"]
    pipeline.main(["--run-dir", str(run_dir), "--report-only"])
    assert (run_dir / "sft.json").stat().st_mtime_ns == before["sft.json"]


def test_a_failing_stage_is_one_line_and_names_the_stage(tmp_path):
    with pytest.raises(UserError, match="stage 04"):
        pipeline.main(["--smoke", "--run-dir", str(tmp_path), "--only", "04"])   # no tokenizer there
    with pytest.raises(UserError, match="no stage 9"):
        pipeline.main(["--rerun", "9"])
