"""uda.grid: the grid file, the plan (shared source models), skip-if-done and resume, the table's
mean +- std from known runs, and the plots."""
import argparse
import json
import shutil
import threading
import time

import pytest

from uda import grid as gridlib
from uda.errors import ConfigError
from uda.runlog import FINAL_MODEL, LAST_CHECKPOINT

GRID = """
name: toy
source: synth_market
target: synth_duke
pretrain_config: configs/pretrain/synth_market.yaml
adapt_config: configs/uda/synth_market2synth_duke.yaml
opts: [data.synth_preset=tiny]
adapt_opts: [adapt.iters=5]
variants:
  base: {documents: "82.8"}
  T=1.0: {opts: [model.temperature=1.0], documents: "31.7"}
  no_erasing: {pretrain_opts: [data.erasing_p=0]}
"""


@pytest.fixture
def grid_file(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text(GRID)
    return path


def test_plan_shares_a_source_model_between_variants_with_the_same_pretrain_opts(grid_file, tmp_path):
    grid = gridlib.load_grid(grid_file)
    runs = gridlib.plan(grid, [0, 1], tmp_path / "runs")
    stages = [(r.stage, r.folder.relative_to(tmp_path / "runs").as_posix()) for r in runs]
    key = gridlib.source_key(grid.variants[2])
    assert stages == [  # seed by seed: every variant's first seed before any second one
        ("pretrain", "toy/source/default/seed0"), ("adapt", "toy/base/seed0"), ("adapt", "toy/T=1.0/seed0"),
        ("pretrain", f"toy/source/{key}/seed0"), ("adapt", "toy/no_erasing/seed0"),
        ("pretrain", "toy/source/default/seed1"), ("adapt", "toy/base/seed1"), ("adapt", "toy/T=1.0/seed1"),
        ("pretrain", f"toy/source/{key}/seed1"), ("adapt", "toy/no_erasing/seed1"),
    ]
    t1 = runs[2].argv
    assert t1[-4:] == ["data.synth_preset=tiny", "adapt.iters=5", "model.temperature=1.0", "seed=0"]  # adapt_opts: adaptations only
    assert t1[t1.index("--init") + 1].endswith("toy/source/default/seed0/model_final.pth")
    assert runs[3].argv[-3:] == ["data.synth_preset=tiny", "data.erasing_p=0", "seed=0"]
    assert runs[2].after == runs[0].folder and runs[4].after == runs[3].folder


def test_finished_runs_are_skipped_and_cut_ones_resumed(grid_file, tmp_path):
    grid = gridlib.load_grid(grid_file)
    grid.variants = grid.variants[:1]
    runs_dir = tmp_path / "runs"
    done, cut = (runs_dir / "toy" / "source" / "default" / "seed0"), (runs_dir / "toy" / "base" / "seed0")
    done.mkdir(parents=True)
    (done / FINAL_MODEL).write_bytes(b"")  # a finished source model: skipped
    cut.mkdir(parents=True)
    (cut / LAST_CHECKPOINT).write_bytes(b"")  # an adaptation cut after a checkpoint: resumed
    ran, lines = [], []
    gridlib.run_grid(grid, [0], runs_dir, progress=lines.append, runner=lambda run, progress: ran.append((run.stage, run.started)))
    assert ran == [("adapt", True)]
    assert lines[0] == "grid toy: 2 runs, 1 done, 1 to run" and lines[1] == "[1/1] adapt base seed 0 (resumed)"


def test_jobs_run_stages_side_by_side_each_adaptation_after_its_source_model(grid_file, tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(gridlib.os, "cpu_count", lambda: 4)
    grid = gridlib.load_grid(grid_file)
    lock, events, live = threading.Lock(), [], []

    def fake(run, progress):
        with lock:
            events.append(("start", run.folder, run.threads))
            live.append(run.folder)
            most = len(live)
        time.sleep(0.05)
        with lock:
            live.remove(run.folder)
            events.append(("end", run.folder, most))

    runs = gridlib.run_grid(grid, [0, 1], tmp_path / "runs", progress=lambda line: None, runner=fake, jobs=2)
    order = [(kind, folder) for kind, folder, _ in events]
    for run in runs:
        assert ("start", run.folder) in order
        if run.after is not None:  # the adaptation starts only after its source model's stage ended
            assert order.index(("end", run.after)) < order.index(("start", run.folder))
    assert max(most for kind, _, most in events if kind == "end") == 2  # two at once, never more
    assert {threads for kind, _, threads in events if kind == "start"} == {2}  # 4 cores / 2 jobs
    assert gridlib.run_grid(grid, [0], tmp_path / "r1", progress=lambda line: None, runner=lambda run, progress: events.append(run.threads)) \
        and events[-1] is None  # one job: the stage inherits the thread count


def test_a_failed_run_stops_the_grid_with_its_message(grid_file, tmp_path):
    grid = gridlib.load_grid(grid_file)
    started = []

    def fail_first_source(run, progress):
        started.append(run.label)
        if run.label == "source default seed 0":
            raise ConfigError("pretrain of source default seed 0 failed (exit 1)")
        time.sleep(0.2)  # the others outlast the failure

    with pytest.raises(ConfigError, match="source default seed 0 failed"):
        gridlib.run_grid(grid, [0, 1], tmp_path / "runs", progress=lambda line: None, runner=fail_first_source, jobs=2)
    assert "base seed 0" not in started  # its source model failed: never started
    key = gridlib.source_key(grid.variants[2])
    assert started == ["source default seed 0", f"source {key} seed 0"]  # the two ready ones; nothing starts after the failure


def write_run(folder, direct, adapted_by_epoch, clusters=None):
    folder.mkdir(parents=True)
    (folder / FINAL_MODEL).write_bytes(b"")
    records = [{"epoch": 0, "synth_duke": dict(zip(gridlib.METRICS + ("mINP",), (direct, 0.1, 0.2, 0.3, 0.0)))}]
    for epoch, value in adapted_by_epoch.items():
        records.append({"epoch": epoch, "synth_duke": dict(zip(gridlib.METRICS + ("mINP",), (value, value, value, value, 0.0))),
                        "clusters": {"num_clusters": clusters or epoch * 10, "outlier_fraction": 0.1, "nmi": 0.5}})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def write_source(folder, on_source_by_epoch):
    folder.mkdir(parents=True)
    (folder / FINAL_MODEL).write_bytes(b"")
    records = [{"epoch": e, "synth_market": dict(zip(gridlib.METRICS, (v, v, v, v))), "synth_duke": dict(zip(gridlib.METRICS, (0.1,) * 4))}
               for e, v in on_source_by_epoch.items()]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_table_is_the_last_epochs_mean_and_sample_std(grid_file, tmp_path):
    grid = gridlib.load_grid(grid_file)
    runs_dir = tmp_path / "runs"
    write_run(runs_dir / "toy" / "base" / "seed0", 0.20, {1: 0.30, 2: 0.40})
    write_run(runs_dir / "toy" / "base" / "seed1", 0.22, {1: 0.10, 2: 0.50})
    write_run(runs_dir / "toy" / "T=1.0" / "seed0", 0.20, {2: 0.25})
    write_source(runs_dir / "toy" / "source" / "default" / "seed0", {5: 0.50, 10: 0.70})  # its last epoch: 0.70
    write_source(runs_dir / "toy" / "source" / "default" / "seed1", {10: 0.60})
    write_run(runs_dir / "toy" / "no_erasing" / "seed0", 0.20, {1: 0.90})
    (runs_dir / "toy" / "no_erasing" / "seed0" / FINAL_MODEL).unlink()  # cut after epoch 1: left out of the table, not refused
    rows = gridlib.summarise(grid, [0, 1], runs_dir)
    assert rows[0]["on_source"] == pytest.approx((0.65, 0.0707107), abs=1e-6)  # base and T=1.0 share the source models
    assert rows[1]["on_source"] == (0.70, 0.0)  # T=1.0 finished seed 0 only
    assert rows[0]["seeds"] == 2 and rows[0]["mAP"] == pytest.approx((0.45, 0.0707107), abs=1e-6)  # last epoch: 0.40, 0.50
    assert rows[0]["direct"] == pytest.approx((0.21, 0.0141421), abs=1e-6)
    assert rows[1]["seeds"] == 1 and rows[1]["mAP"] == (0.25, 0.0)  # one seed: no spread
    assert rows[1]["paired_map"] == pytest.approx((-0.15, 0.0, 1))  # paired with base's seed 0 (0.40) only
    assert rows[1]["paired_source"] == (0.0, 0.0, 1)  # base's source model: no difference
    assert rows[2] == {"name": "no_erasing", "documents": "", "seeds": 0}
    table = gridlib.markdown(grid, rows, "Machine: test.")
    assert rows[0]["per_seed"] == pytest.approx({0: 0.40, 1: 0.50}) and rows[1]["per_seed"] == {0: 0.25}
    # no_erasing trains its own source model: the table has a paired column for the source models too
    assert "| base | 2 | 65.0 +- 7.1 | - | 21.0 +- 1.4 | 45.0 +- 7.1 | - | 45.0 +- 7.1 | 45.0 +- 7.1 | 45.0 +- 7.1 | 0: 40.0, 1: 50.0 | 82.8 |" in table
    assert "| T=1.0 | 1 | 70.0 +- 0.0 | +0.0 +- 0.0 (1) | 20.0 +- 0.0 | 25.0 +- 0.0 | -15.0 +- 0.0 (1) |" in table and "| 0: 25.0 | 31.7 |" in table
    assert "| no_erasing | 0 | - | - | - | - | - | - | - | - | - | - |" in table and "Machine: test." in table
    assert "| mAP - base |" in table and "| source mAP - base |" in table
    assert "source model's mAP on synth_market" in table
    assert len({line.count("|") for line in table.splitlines() if line.startswith("|")}) == 1  # header, rule and rows align
    grid.variants = grid.variants[:2]  # no variant trains its own source model: no source column
    narrow = gridlib.markdown(grid, rows[:2])
    assert {line.count("|") for line in narrow.splitlines() if line.startswith("|")} == {12} and "source mAP - base" not in narrow
    assert "| T=1.0 | 1 | 70.0 +- 0.0 | 20.0 +- 0.0 | 25.0 +- 0.0 | -15.0 +- 0.0 (1) |" in narrow
    grid = gridlib.load_grid(grid_file)
    write_run(runs_dir / "toy" / "T=1.0" / "seed1", 0.22, {2: 0.45})  # differences -0.15, -0.05: the seeds' spread cancels
    assert gridlib.summarise(grid, [0, 1], runs_dir)[1]["paired_map"] == pytest.approx((-0.10, 0.0707107, 2), abs=1e-6)
    curves = gridlib.curves(grid, [0, 1], runs_dir)
    assert curves["base"]["mAP"] == pytest.approx({0: 0.21, 1: 0.20, 2: 0.45})
    assert curves["base"]["clusters"] == {1: 10.0, 2: 20.0}
    pictures = gridlib.plot(curves, tmp_path, "toy")
    assert [p.name for p in pictures] == ["toy_map.png", "toy_clusters.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pictures)


def test_a_cumulative_grid_pairs_each_row_with_the_row_above(grid_file, tmp_path):
    """paired: previous: each row's difference is its own step (mAP and the source model's), per seed."""
    grid_file.write_text(GRID.replace("variants:", "paired: previous\nvariants:").replace("T=1.0: {opts", "T=1.0: {pretrain_opts: [loss.center_weight=0], opts"))
    grid = gridlib.load_grid(grid_file)
    runs_dir = tmp_path / "runs"
    key = {v.name: gridlib.source_key(v) for v in grid.variants}
    for name, maps, source_maps in (("base", (0.40, 0.50), (0.60, 0.70)), ("T=1.0", (0.45, 0.50), (0.50, 0.64)), ("no_erasing", (0.55, 0.66), (0.55, 0.68))):
        for seed in (0, 1):
            write_run(runs_dir / "toy" / name / f"seed{seed}", 0.2, {3: maps[seed]})
            write_source(runs_dir / "toy" / "source" / key[name] / f"seed{seed}", {10: source_maps[seed]})
    rows = gridlib.summarise(grid, [0, 1], runs_dir)
    assert "paired_map" not in rows[0] and "paired_source" not in rows[0]
    assert rows[1]["paired_map"] == pytest.approx((0.025, 0.0353553, 2), abs=1e-6)  # +0.05, 0.00 from base
    assert rows[1]["paired_source"] == pytest.approx((-0.08, 0.0282843, 2), abs=1e-6)  # -0.10, -0.06
    assert rows[2]["paired_map"] == pytest.approx((0.13, 0.0424264, 2), abs=1e-6)  # +0.10, +0.16 from T=1.0, not base
    assert rows[2]["paired_source"] == pytest.approx((0.045, 0.0070711, 2), abs=1e-6)  # +0.05, +0.04
    table = gridlib.markdown(grid, rows)
    assert "| mAP - previous row |" in table and "| source mAP - previous row |" in table
    assert "| no_erasing | 2 | 61.5 +- 9.2 | +4.5 +- 0.7 (2) | 20.0 +- 0.0 | 60.5 +- 7.8 | +13.0 +- 4.2 (2) |" in table
    grid.paired = "first"  # the default: from base
    rows = gridlib.summarise(grid, [0, 1], runs_dir)
    assert rows[2]["paired_map"] == pytest.approx((0.155, 0.0070711, 2), abs=1e-6)
    assert rows[2]["paired_source"] == pytest.approx((-0.035, 0.0212132, 2), abs=1e-6)  # -0.05, -0.02 from base's source
    grid.paired = "previous"
    shutil.rmtree(runs_dir / "toy" / "T=1.0")  # the row above has no finished seed: no step to report
    rows = gridlib.summarise(grid, [0, 1], runs_dir)
    assert "paired_map" not in rows[2] and "paired_source" not in rows[2] and rows[2]["mAP"][0] == pytest.approx(0.605)


@pytest.mark.parametrize("text, message", [
    (GRID.replace("opts: [data.synth_preset=tiny]", "opt: []"), r"unknown keys \['opt'\]"),
    (GRID.replace("target: synth_duke\n", ""), r"missing keys \['target'\]"),
    (GRID.replace('documents: "31.7"', 'paper: "31.7"'), r"variant 'T=1.0' has unknown keys \['paper'\]"),
    (GRID.replace("no_erasing:", "no erasing:"), "must be letters, digits"),
    (GRID.replace("variants:", "paired: last\nvariants:"), r"paired must be one of \['first', 'previous'\]"),
    (GRID.replace("configs/uda/synth_market2synth_duke.yaml", "configs/uda/none.yaml"), "adapt_config .*configs/uda/none.yaml does not exist"),
    (GRID.replace("name: toy", "name: ../../etc"), "name '../../etc' must be letters, digits"),  # would write outside --runs-dir
    (GRID.replace("variants:", "variants: [\n"), "is not valid YAML"),
    (GRID.replace("  no_erasing:", "  T=1.0: {opts: [model.temperature=0.2]}\n  no_erasing:"),
     "grid file .*bad.yaml is not valid YAML: duplicate key 'T=1.0' at line 11 and again at line 12"),  # was: one variant dropped
    (GRID + "opts: [data.synth_preset=small]\n", "duplicate key 'opts' at line 7 and again at line 13"),
    ("- a list\n", "must hold a mapping"),
    (GRID.replace("opts: [data.synth_preset=tiny]", "opts: data.synth_preset=tiny"), "opts must be a list of key=value strings"),
    (GRID.replace("{opts: [model.temperature=1.0], documents: \"31.7\"}", "just a string"), "variant 'T=1.0' must be a mapping"),
    (GRID.replace("pretrain_opts: [data.erasing_p=0]", "pretrain_opts: [data.erasing_p]"), "variant 'no_erasing' pretrain_opts must be a list"),
])
def test_grid_file_errors_name_the_key(tmp_path, text, message):
    """One line each, naming the key or variant: a bad grid name could write outside --runs-dir, a bare string
    of opts would be split into characters, both only noticed hours in."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        gridlib.load_grid(path)


def test_a_given_source_model_is_adapted_from_by_every_seed_without_pretraining(grid_file, tmp_path):
    grid_file.write_text(GRID.replace("opts: [data.synth_preset=tiny]", "opts: [data.synth_preset=tiny]\nsource_model: /m/model_final.pth")
                         .replace("  no_erasing: {pretrain_opts: [data.erasing_p=0]}\n", ""))
    runs = gridlib.plan(gridlib.load_grid(grid_file), [0, 1], tmp_path)
    assert [r.stage for r in runs] == ["adapt"] * 4
    assert all(r.argv[r.argv.index("--init") + 1] == "/m/model_final.pth" for r in runs)
    grid_file.write_text(GRID.replace("opts: [data.synth_preset=tiny]", "opts: [data.synth_preset=tiny]\nsource_model: /m/model_final.pth"))
    with pytest.raises(ConfigError, match="needs its own source model"):
        gridlib.load_grid(grid_file)


@pytest.mark.parametrize("path", sorted((gridlib.REPO / "configs" / "ablations").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_grid_variant_passes_both_stages_config_checks(path):
    """A typo in a grid file's opts would otherwise surface hours into the grid."""
    from uda import adapt, build, pretrain, settings
    from uda.config import load_config

    grid = gridlib.load_grid(path)
    for variant in grid.variants:
        source_cfg = load_config(pretrain.DEFAULTS, gridlib.REPO / grid.pretrain_config, grid.opts + grid.pretrain_opts + variant.pretrain_opts)
        settings.check(source_cfg)
        cfg = load_config(adapt.DEFAULTS, gridlib.REPO / grid.adapt_config, grid.opts + grid.adapt_opts + variant.opts)
        settings.check(cfg)
        if not grid.source_model:  # the source model each variant's adaptation will load must fit it
            build.check_model_settings(cfg, {"config": source_cfg.to_dict()}, f"{variant.name}'s source model")


def test_a_tiny_grid_runs_end_to_end_then_skips_everything(synth_root, tmp_path, capsys):
    tiny = ["data.synth_preset=tiny", "device=cpu", "data.num_workers=0", "data.num_pids=4", "eval.batch_size=64"]
    (tmp_path / "tiny.yaml").write_text(f"""
name: tiny
source: synth_market
target: synth_duke
pretrain_config: configs/pretrain/synth_market.yaml
adapt_config: configs/uda/synth_market2synth_duke.yaml
opts: {tiny + [f"data.root={synth_root}"]}
pretrain_opts: [optim.epochs=4, optim.warmup_epochs=1, train.eval_every=4]
variants:
  base: {{opts: [optim.epochs=2, adapt.iters=4, cluster.k1=8, cluster.k2=3, cluster.min_samples=3]}}
  T=1.0: {{opts: [optim.epochs=2, adapt.iters=4, cluster.k1=8, cluster.k2=3, cluster.min_samples=3, model.temperature=1.0]}}
""")
    rows = gridlib.main([str(tmp_path / "tiny.yaml"), "--seeds", "1", "--runs-dir", str(tmp_path / "runs")])
    assert [(r["name"], r["seeds"]) for r in rows] == [("base", 1), ("T=1.0", 1)]
    assert rows[0]["direct"] == rows[1]["direct"]  # one source model for both
    assert 0 < rows[0]["mAP"][0] <= 1 and rows[0]["mAP"][1] == 0.0
    out = capsys.readouterr().out
    assert "grid tiny: 3 runs, 0 done, 3 to run" in out and "adapt T=1.0 seed 0: epoch 2/2" in out
    assert (tmp_path / "runs" / "tiny" / "tiny.md").read_text().startswith("# Grid tiny")
    assert "Machine: " in (tmp_path / "runs" / "tiny" / "tiny.md").read_text()
    gridlib.main([str(tmp_path / "tiny.yaml"), "--seeds", "1", "--runs-dir", str(tmp_path / "runs")])
    assert "grid tiny: 3 runs, 3 done, 0 to run" in capsys.readouterr().out


def test_a_run_made_with_other_settings_is_refused_not_summarised(grid_file, tmp_path):
    from uda.config import dump_config

    grid = gridlib.load_grid(grid_file)
    grid.variants = grid.variants[1:2]  # T=1.0
    runs = gridlib.plan(grid, [0], tmp_path / "runs")
    for run in runs:
        run.folder.mkdir(parents=True)
        dump_config(gridlib.planned_config(run), run.folder / "config.yaml")
        (run.folder / FINAL_MODEL).write_bytes(b"")
    gridlib.run_grid(grid, [0], tmp_path / "runs", progress=lambda line: None, runner=None)  # all done, all the same: nothing runs
    grid.variants[0].opts = ["model.temperature=0.5"]  # the grid file edited since
    with pytest.raises(ConfigError, match=r"adapt of T=1.0 seed 0: .*model.temperature: 1.0 -> 0.5.*delete .*T=1.0/seed0"):
        gridlib.run_grid(grid, [0], tmp_path / "runs", progress=lambda line: None, runner=None)


def test_seeds_are_a_count_or_a_range():
    assert gridlib.parse_seeds("3") == [0, 1, 2]
    assert gridlib.parse_seeds("1-2") == [1, 2]
    assert gridlib.parse_seeds("2-2") == [2]
    for bad in ("0", "2-1", "x", "-1", "1-"):
        with pytest.raises(argparse.ArgumentTypeError):
            gridlib.parse_seeds(bad)


def test_machine_line_names_only_the_finished_runs(grid_file, tmp_path):
    grid = gridlib.load_grid(grid_file)
    runs_dir = tmp_path / "runs"
    write_run(runs_dir / "toy" / "base" / "seed0", 0.2, {1: 0.3})
    (runs_dir / "toy" / "base" / "seed0" / "version.txt").write_text("commit: abc\nthreads: 1\ncpu: X\ngpu: none\n")
    cut = runs_dir / "toy" / "T=1.0" / "seed0"
    cut.mkdir(parents=True)
    (cut / "version.txt").write_text("commit: def\nthreads: 2\ncpu: Y\ngpu: none\n")  # stopped in its first epoch
    assert gridlib.machines(grid, [0], runs_dir) == "Machine: X, gpu none, threads 1, commit abc."
    (cut / FINAL_MODEL).write_bytes(b"")  # now finished, from a checkout with local changes and a full-length hash
    (cut / "version.txt").write_text(f"commit: {'d' * 40}+dirty\nthreads: 2\ncpu: Y\ngpu: none\n")
    assert gridlib.machines(grid, [0], runs_dir) == (
        "Machine: X, gpu none, threads 1, commit abc; Y, gpu none, threads 2, commit dddddddddddd+dirty.")


def test_a_bad_variant_setting_stops_the_grid_before_any_stage_runs(grid_file, tmp_path):
    """The last variant's typo (or value out of range) is found before the first source model trains."""
    ran = []
    for opt, message in (("model.temperatur=1.0", "adapt of T=1.0 seed 0: unknown config key 'model.temperatur'; did you mean 'model.temperature'"),
                         ("model.temperature=-1", "adapt of T=1.0 seed 1: model.temperature must be > 0")):
        grid = gridlib.load_grid(grid_file)
        grid.variants[1].opts = [opt]
        seeds = [0] if "temperatur=" in opt else [1]
        with pytest.raises(ConfigError, match=message):
            gridlib.run_grid(grid, seeds, tmp_path / "runs", progress=lambda line: None, runner=lambda run, progress: ran.append(run))
    grid_file.write_text(GRID.replace("opts: [data.synth_preset=tiny]", f"opts: [data.synth_preset=tiny]\nsource_model: {tmp_path / 'none.pth'}")
                         .replace("  no_erasing: {pretrain_opts: [data.erasing_p=0]}\n", ""))
    with pytest.raises(ConfigError, match="source_model .*none.pth does not exist; train it first"):
        gridlib.run_grid(gridlib.load_grid(grid_file), [0], tmp_path / "runs", progress=lambda line: None,
                         runner=lambda run, progress: ran.append(run))
    assert ran == []


def test_a_target_without_cameras_stops_a_grid_that_needs_them_before_any_stage_runs(grid_file, tmp_path):
    """adapt refuses it at its start, which in a grid came after the source models had trained."""
    for name in ("a.jpg", "q.jpg", "g.jpg"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "shop.csv").write_text("split,path,pid\ntrain,a.jpg,\nquery,q.jpg,1\ngallery,g.jpg,1\n")
    grid_file.write_text(GRID.replace("target: synth_duke", f"target: {tmp_path / 'shop.csv'}")
                         .replace("adapt_opts: [adapt.iters=5]",
                                  "adapt_opts: [adapt.iters=5, cluster.camera_normalize=false, adapt.classifier=separate]")
                         .replace("  no_erasing: {pretrain_opts: [data.erasing_p=0]}\n", ""))
    grid = gridlib.load_grid(grid_file)
    ran = []
    gridlib.run_grid(grid, [0], tmp_path / "runs", progress=lambda line: None, runner=lambda run, progress: ran.append(run))
    assert len(ran) == 3  # without camera normalisation or proxies the target needs no cameras
    grid.variants[1].opts.append("cluster.camera_normalize=true")
    ran.clear()
    with pytest.raises(ConfigError, match=r"grid toy, adapt of T=1.0 seed 1: cluster.camera_normalize=true needs camera ids, "
                                          r"and shop \(.*shop.csv\) has none"):
        gridlib.run_grid(grid, [1], tmp_path / "runs", progress=lambda line: None, runner=lambda run, progress: ran.append(run))
    assert ran == []
    grid.variants[1].opts[-1] = "adapt.classifier=proxies"  # a proxy per cluster and camera: the same refusal, adapt's words
    with pytest.raises(ConfigError, match=r"grid toy, adapt of T=1.0 seed 1: adapt.classifier=proxies keeps a proxy per cluster "
                                          r"and camera, and shop \(.*shop.csv\) has no camera ids"):
        gridlib.run_grid(grid, [1], tmp_path / "runs", progress=lambda line: None, runner=lambda run, progress: ran.append(run))
    assert ran == []
