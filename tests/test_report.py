"""``selfsup report`` and evaluation results in the run: a real short run, a run killed mid-epoch (a real SIGKILL),
several runs at once, every PNG opened, the HTML page loaded in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from cli_args import BATCHED_IN_MEMORY, TINY_MMCR
from kill_harness import pretrain_killed_at
from PIL import Image

from selfsup.cli import main, run_report
from selfsup.eval.results import find_run_dir, read_eval_results, write_eval_result
from selfsup.report import build_report
from selfsup.report.plots import HEIGHT, WIDTH
from selfsup.report.runs import read_metrics_csv

REPO = Path(__file__).resolve().parents[1]
RUN_ARGS = [
    *TINY_MMCR,
    "--data.dataset",
    "cifar10",
    "--data.batch_size",
    "20",
    *BATCHED_IN_MEMORY,
    "--trainer.logger",
    "csv",
    "--trainer.log_every_n_steps",
    "1",
    "--trainer.progress_bar",
    "false",
    "--monitor.every_n_epochs",
    "1",
    "--monitor.bank_size",
    "100",
    "--monitor.test_size",
    "50",
    "--monitor.k",
    "20",
    "--monitor.spectrum_every_n_steps",
    "2",
]
FINISHED_PNGS = {
    "loss-loss.png",
    "loss-global_nuc.png",
    "loss-local_nuc.png",
    "lr.png",
    "knn.png",
    "effective_rank.png",
    "alignment_uniformity.png",
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one intra-op thread


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cifar_slice) -> tuple[Path, Path]:
    """``(finished, killed)``: a real 2-epoch run (3 steps per epoch) with the CSV logger, kNN monitor and spectrum
    monitor on, and a second real run (5 steps per epoch, step checkpoints every 2) in a child process that SIGKILLs
    itself as step 8 starts, in the middle of its second epoch (after the step-8 checkpoint; the second epoch would end
    at step 10). The kill is the child's own at a fixed step: an outside thread polling for the checkpoint was late
    by a few steps under load, and the run was sometimes killed after its second epoch (a flaky test)."""
    base = tmp_path_factory.mktemp("report")
    finished, killed = base / "finished", base / "killed"
    assert (
        main(
            [
                "pretrain",
                *RUN_ARGS,
                "--data.root",
                str(cifar_slice),
                "--data.subset",
                "60",
                "--trainer.max_epochs",
                "2",
                "--trainer.out_dir",
                str(finished),
            ]
        )
        == 0
    )
    proc = pretrain_killed_at(
        8,
        [
            *RUN_ARGS,
            "--data.root",
            str(cifar_slice),
            "--data.subset",
            "100",
            "--trainer.max_epochs",
            "50",
            "--trainer.save_every_n_steps",
            "2",
            "--trainer.out_dir",
            str(killed),
        ],
        base,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (killed / "checkpoints" / "step00000008.ckpt").exists()
    return finished, killed


@pytest.fixture(scope="module")
def finished_run(runs) -> Path:
    return runs[0]


@pytest.fixture(scope="module")
def killed_run(runs) -> Path:
    return runs[1]


@pytest.fixture(scope="module")
def finished_report(finished_run) -> dict:
    """``selfsup knn`` on the finished run's last.ckpt (its result lands in RUN_DIR/eval/), then ``selfsup report``."""
    last = finished_run / "checkpoints" / "last.ckpt"
    assert main(["knn", "--checkpoint", str(last), "--data.num_workers", "0", "--k", "20"]) == 0
    return run_report([str(finished_run)])


def _pngs_ok(paths: list[str]) -> None:
    assert paths
    for p in paths:
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            im.load()
            assert im.format == "PNG" and im.size == (WIDTH, HEIGHT), (p, im.size)


def _html_ok(html: str, pngs: list[str]) -> None:
    assert html.count('src="data:image/png;base64,') == len(pngs)
    assert not re.search(r'(src|href)="(https?:|//)', html)  # self-contained: nothing fetched
    for p in pngs:
        assert f'data-file="{Path(p).name}"' in html


# -------------------------------------------------------------------------------------- eval results
def test_eval_results_land_in_the_run_and_are_never_overwritten(finished_run, finished_report, tmp_path):
    last = finished_run / "checkpoints" / "last.ckpt"
    assert find_run_dir(last) == finished_run.resolve()
    assert main(["knn", "--checkpoint", str(last), "--data.num_workers", "0", "--k", "20"]) == 0  # the fixture's + 1
    files = sorted(p.name for p in (finished_run / "eval").iterdir())
    assert files == ["knn-last-1.json", "knn-last.json"]
    a, b = (json.loads((finished_run / "eval" / f).read_text()) for f in files)
    assert a["top1"] == b["top1"] and a["kind"] == "knn" and a["checkpoint"] == str(last)
    assert [r["kind"] for _, r in read_eval_results(finished_run)] == ["knn", "knn"]
    # A checkpoint outside a run directory: nothing is written beside it, write_eval_result names it.
    loose = tmp_path / "loose" / "x.ckpt"
    loose.parent.mkdir()
    shutil.copy(last, loose)
    assert find_run_dir(loose) is None
    assert main(["knn", "--checkpoint", str(loose), "--data.num_workers", "0", "--k", "20"]) == 0
    assert sorted(p.name for p in loose.parent.iterdir()) == ["x.ckpt"]
    with pytest.raises(ValueError, match="x.ckpt' is not inside a run directory"):
        write_eval_result(loose, "knn", {"top1": 1.0})
    # The run directory itself as the target: <kind>.json, then <kind>-1.json.
    assert write_eval_result(finished_run, "fewshot", {"top1": 50.0}).name == "fewshot.json"
    assert write_eval_result(finished_run, "fewshot", {"top1": 51.0}).name == "fewshot-1.json"


# -------------------------------------------------------------------------------------------- report
def test_report_of_a_finished_run(finished_run, finished_report):
    res = finished_report
    assert Path(res["html"]) == finished_run / "report" / "report.html"  # the default place
    names = {Path(p).name for p in res["pngs"]}
    assert names == FINISHED_PNGS | {"spectrum-finished.png"}
    _pngs_ok(res["pngs"])
    html = Path(res["html"]).read_text()
    _html_ok(html, res["pngs"])
    assert "trainer.max_epochs" in html and "method.init_args.projector" in html  # the resolved config
    assert "knn-last.json" in html  # the evaluation results found in eval/
    assert res["notes"]["finished"] == []  # nothing missing or skipped


def test_report_of_a_run_killed_mid_epoch(killed_run, tmp_path):
    assert not (killed_run / "checkpoints" / "epoch0001.ckpt").exists()  # killed before its second epoch ended
    res = build_report([killed_run], tmp_path / "rep")
    assert {Path(p).name for p in res["pngs"]} >= FINISHED_PNGS
    _pngs_ok(res["pngs"])
    _html_ok(Path(res["html"]).read_text(), res["pngs"])
    # A kill during a write: cut the last line of both logs in half; the report still builds and says so.
    for name in ("logs/metrics.csv", "spectrum.jsonl"):
        p = killed_run / name
        text = p.read_text()
        p.write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])
    res = build_report([killed_run], tmp_path / "rep2")
    _pngs_ok(res["pngs"])
    notes = " ".join(res["notes"]["killed"])
    assert "metrics.csv: last line cut short" in notes and "spectrum.jsonl: 1 unreadable line" in notes


def test_report_of_several_runs_overlays_them(finished_run, killed_run, tmp_path):
    res = build_report([finished_run, killed_run], tmp_path / "cmp")
    names = {Path(p).name for p in res["pngs"]}
    assert FINISHED_PNGS | {"spectrum-finished.png", "spectrum-killed.png", "spectrum-latest.png"} <= names
    _pngs_ok(res["pngs"])
    html = Path(res["html"]).read_text()
    _html_ok(html, res["pngs"])
    results = html.split('<h2 id="results">')[1].split("</table>")[0]
    assert results.count("<tr>") == 3 and "finished" in results and "killed" in results  # header + one row per run


def test_cli_report_bad_run_dirs(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"selfsup report: error: run directory '{tmp_path / 'nope'}' does not exist"]
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a run directory" in err[0] and str(tmp_path / "empty") in err[0]


def test_metrics_csv_reader_hand_case(tmp_path):
    p = tmp_path / "metrics.csv"
    p.write_text(
        "epoch,knn/top1,loss,step,train/loss\n"
        "0,,1.5,0,1.5\n"
        "0,,1.25,1,1.25\n"
        "0,oops,,2\n"  # wrong field count: skipped
        "0,12.5,,1,\n"  # kNN on step 1
        "0,,1.0,2,1.0\n"
        "0,,0.7,3,0."
    )  # cut short by a kill: skipped
    metrics, notes = read_metrics_csv(p)
    assert metrics == {"knn/top1": [(1, 12.5)], "train/loss": [(0, 1.5), (1, 1.25), (2, 1.0)]}
    assert any("cut short" in n for n in notes) and any("1 malformed" in n for n in notes)


def test_report_page_loads_in_headless_chromium(finished_report, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium); only the headless-browser check is skipped")
    res = finished_report
    out = subprocess.run(
        [
            browser,
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--enable-logging=stderr",
            "--v=0",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            Path(res["html"]).as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    console = [ln for ln in out.stderr.splitlines() if ":CONSOLE" in ln]
    assert console == [], console  # no JavaScript error or console message
    dom = out.stdout
    n = len(res["pngs"])
    assert f'data-images-loaded="{n}"' in dom and f'data-images-total="{n}"' in dom  # every image decoded
    assert '<h2 id="results">Results</h2>' in dom and "trainer.max_epochs" in dom
