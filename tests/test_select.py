"""``selfsup select``: checkpoints scored on held-out train (never the test split), the pick unchanged when every
test label is wrong, the test scores of the pick and of last.ckpt reported, best-on-test only as a diagnostic."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from cli_args import BATCHED_IN_MEMORY, QUIET, TINY_MMCR
from conftest import make_cifar_slice
from torch.utils.data import DataLoader

from selfsup.cli import main

RUN_ARGS = [
    *TINY_MMCR,
    "--data.dataset",
    "cifar10",
    "--data.batch_size",
    "20",
    *BATCHED_IN_MEMORY,
    "--optim.lr",
    "0.01",
    *QUIET,
    "--trainer.max_epochs",
    "5",
    "--trainer.max_steps",
    "6",
    "--trainer.save_every_n_steps",
    "2",
]
SELECT = ["--data.num_workers", "0", "--data.in_memory", "true", "--k", "20"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one intra-op thread


@pytest.fixture(scope="module")
def small_slice(tmp_path_factory) -> Path:
    """100 train / 50 test real CIFAR-10 images (10 / 5 per class) of the shipped sample."""
    return make_cifar_slice(tmp_path_factory.mktemp("select") / "slice.zip", 10, 5)


@pytest.fixture(scope="module")
def run(tmp_path_factory, small_slice) -> Path:
    """A real run on 100 CIFAR-10 images: checkpoints at steps 2, 4 and 6 (+ last.ckpt)."""
    out = tmp_path_factory.mktemp("select") / "run"
    assert main(["pretrain", *RUN_ARGS, "--data.root", str(small_slice), "--trainer.out_dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def wrong_test_labels(tmp_path_factory, small_slice) -> Path:
    """The same images, but every test image moved to the next class folder: every test label is wrong."""
    out = tmp_path_factory.mktemp("select") / "wrong_test_labels.zip"
    with zipfile.ZipFile(small_slice) as src:
        classes = sorted({n.split("/")[2] for n in src.namelist() if n.count("/") == 3 and "/test/" in n})
        shift = {c: classes[(i + 1) % len(classes)] for i, c in enumerate(classes)}
        with zipfile.ZipFile(out, "w") as dst:
            for name in src.namelist():
                parts = name.split("/")
                if len(parts) == 4 and parts[1] == "test":
                    name_out = "/".join([parts[0], "test", shift[parts[2]], parts[3]])
                else:
                    name_out = name
                dst.writestr(name_out, src.read(name))
    return out


def _select(run: Path, *args: str) -> dict:
    before = set((run / "eval").glob("select-*.json")) if (run / "eval").is_dir() else set()
    assert main(["select", str(run), *SELECT, *args]) == 0
    (new,) = set((run / "eval").glob("select-*.json")) - before  # a new file every time, nothing overwritten
    return json.loads(new.read_text())


@pytest.fixture(scope="module")
def selected(run, wrong_test_labels):
    """``get(by, wrong)``: the result of ``selfsup select --by <by>`` on the run, on the true data or on the copy whose
    test labels are all wrong; each computed once."""
    cache: dict[tuple[str, bool], dict] = {}
    extra = {"knn": [], "linear": ["--epochs", "30", "--lrs", "[0.3]"], "rankme": ["--rankme_images", "60"]}

    def get(by: str, wrong: bool = False) -> dict:
        if (by, wrong) not in cache:
            root = ["--data.root", str(wrong_test_labels)] if wrong else []
            cache[by, wrong] = _select(run, "--by", by, *extra[by], *root)
        return cache[by, wrong]

    return get


def _choice(res: dict) -> tuple:
    return res["pick"]["checkpoint"], [(r["checkpoint"], r["score"]) for r in res["scores"]]


@pytest.mark.parametrize("by", ["knn", "linear", "rankme"])
def test_wrong_test_labels_give_the_same_pick(selected, by):
    res, bad = selected(by), selected(by, wrong=True)
    assert _choice(bad) == _choice(res)  # same scores, same pick: the test split played no part
    names = [r["checkpoint"] for r in res["scores"]]
    assert {"step00000002.ckpt", "step00000004.ckpt", "step00000006.ckpt", "last.ckpt"} <= set(names)
    assert res["last"]["checkpoint"] == "last.ckpt" and res["last"]["step"] == 6
    assert res["pick"]["score"] == max(r["score"] for r in res["scores"])
    # The test scores are reported side by side, and they do read the (here corrupted) test labels.
    for key in ("pick", "last"):
        assert 0.0 <= res[key]["test_top1"] <= 100.0
    tests = [(r[k]["test_top1"], r[k]["test_top5"]) for r in (res, bad) for k in ("pick", "last")]
    assert tests[:2] != tests[2:]
    assert "diagnostic_best_on_test" not in res
    if by == "knn":
        assert res["selection_split"]["n_heldout"] == 10 and res["selection_split"]["n_bank"] == 90


def test_rankme_score_is_rankme_of_the_train_subset_features(run, selected):
    from selfsup.cli import EvalData, eval_data_config
    from selfsup.data.build import build_eval_dataset
    from selfsup.eval.features import extract_features
    from selfsup.eval.load import checkpoint_meta, load_backbone
    from selfsup.losses.spectrum import rankme

    res = selected("rankme")
    ckpt = run / "checkpoints" / "step00000004.ckpt"
    data = eval_data_config(EvalData(in_memory=True, num_workers=0), checkpoint_meta(ckpt), str(ckpt))
    f, _ = extract_features(load_backbone(ckpt)[0], DataLoader(build_eval_dataset(data, "train", limit=60), 64))
    (row,) = [r for r in res["scores"] if r["checkpoint"] == ckpt.name]
    assert row["score"] == pytest.approx(rankme(f).item(), rel=1e-5)


def test_the_test_split_is_opened_only_after_the_pick(run, selected, monkeypatch):
    import selfsup.data.build as build
    from selfsup.cli import EvalData, eval_data_config
    from selfsup.eval import select
    from selfsup.eval.load import checkpoint_meta

    events: list[str] = []
    real_build, real_score = build.build_eval_dataset, select._Scorer.select_score
    monkeypatch.setattr(
        build,
        "build_eval_dataset",
        lambda cfg, split, *a, **k: (events.append(f"open {split}"), real_build(cfg, split, *a, **k))[1],
    )
    monkeypatch.setattr(
        select._Scorer, "select_score", lambda self, b: (events.append("score"), real_score(self, b))[1]
    )
    last = run / "checkpoints" / "last.ckpt"
    data = eval_data_config(EvalData(in_memory=True, num_workers=0), checkpoint_meta(last), str(last))
    res = select.select_checkpoint(run, data, select.SelectOptions(by="knn", k=20, diagnostic_best_on_test=True))
    first_test = events.index("open test")
    assert "score" in events and "score" not in events[first_test:]  # every selection score came before
    diag = res["diagnostic_best_on_test"]
    assert diag["note"].startswith("DIAGNOSTIC ONLY") and len(diag["all"]) == len(res["scores"])
    assert diag["test_top1"] == max(r["test_top1"] for r in diag["all"])
    assert _choice(res) == _choice(selected("knn"))  # the diagnostic never moves the pick


def test_bad_run_dirs_are_one_line_errors(tmp_path, capsys):
    assert main(["select", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"selfsup select: error: run directory '{tmp_path / 'nope'}' does not exist"
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text("{}")
    assert main(["select", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no checkpoints" in err[0] and str(tmp_path / "r") in err[0]
    (tmp_path / "r" / "checkpoints").mkdir()
    (tmp_path / "r" / "checkpoints" / "last.ckpt").write_bytes(b"cut short")
    assert main(["select", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read checkpoint" in err[0] and "last.ckpt" in err[0]


def test_report_shows_the_selection(run, selected):
    from selfsup.report import build_report

    res = selected("knn")
    report = build_report([run], run / "report")
    assert [Path(p).name for p in report["pngs"]] == ["knn.png"]  # no CSV log, no spectrum: only select's kNN curve
    html = Path(report["html"]).read_text()
    assert f"pick {res['pick']['checkpoint']}" in html and "select-knn" in html
