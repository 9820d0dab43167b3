"""An ablation grid: every variant x seed of an experiment, run (or skipped when done, resumed when cut),
then summarised as mean +- std of the last epoch next to the source documents' figure for each row.

    python scripts/run_grid.py configs/ablations/<grid>.yaml --seeds 3|A-B [--runs-dir runs/grid] [--only NAME ...] [--jobs N]

A grid file:

    name: temperature
    source: synth_market               # the stages' --source / --target
    target: synth_duke
    pretrain_config: configs/pretrain/synth_market.yaml
    adapt_config: configs/uda/synth_market2synth_duke.yaml
    opts: [data.synth_preset=small]    # --opts of both stages, every variant
    pretrain_opts: [optim.epochs=10]   # optional: --opts of the source stage only / of the adaptation only
    adapt_opts: [optim.epochs=3]
    source_model: PATH                 # optional: every seed adapts from this model (no pretraining;
                                       # the seed then varies the adaptation only)
    paired: previous                   # optional: the paired columns are differences from the row above
                                       # (a cumulative grid: each row's own step), not the first (default)
    variants:                          # in table order; opts / pretrain_opts add to the shared ones
      T=0.1: {opts: [model.temperature=0.1], documents: "82.8 mAP (the documents' best)"}
      T=1.0: {opts: [model.temperature=1.0], documents: "31.7 mAP"}

Each seed has one source model per distinct `pretrain_opts` (shared by the variants that agree on them),
under <runs-dir>/<name>/source/<key>/seed<s>; each variant's adaptation under <runs-dir>/<name>/<variant>/seed<s>.
Every stage runs in its own process (`python uda/<stage>.py`), as a user would run it. `--jobs N` runs N
at once, each with OMP_NUM_THREADS = cores / N (or the OMP_NUM_THREADS given), an adaptation only once
its source model is done: small runs use a CPU's threads poorly, so several side by side at one thread
each can finish a grid sooner than one after another at all threads. The thread count changes the
numbers (BENCHMARKS.md), so one grid keeps one thread count (the table's machine line lists each one found).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from uda import settings
from uda.cli import config_overrides, output_folder, positive_int, stage_parser
from uda.config import read_yaml
from uda.errors import ConfigError, UdaError
from uda.report import collect, evaluation
from uda.runlog import FINAL_MODEL, LAST_CHECKPOINT, check_resumable, read_metrics

REPO = Path(__file__).resolve().parents[1]
GRID_KEYS = {"name", "source", "target", "pretrain_config", "adapt_config", "opts", "pretrain_opts", "adapt_opts", "variants",
             "description", "source_model", "paired"}
PAIRED = ("first", "previous")  # what a row's paired difference is from: the first row, or the row above
VARIANT_KEYS = {"opts", "pretrain_opts", "documents"}
METRICS = ("mAP", "rank1", "rank5", "rank10")
NAME = re.compile(r"[\w.=+-]+")  # a grid's or variant's name: it names a folder, so no path separators


@dataclass
class Variant:
    name: str
    opts: list[str] = field(default_factory=list)  # adapt --opts beyond the grid's
    pretrain_opts: list[str] = field(default_factory=list)  # pretrain --opts beyond the grid's (its own source model)
    documents: str = ""  # the source documents' figure for this row, as text


@dataclass
class Grid:
    name: str
    source: str
    target: str
    pretrain_config: str
    adapt_config: str
    opts: list[str]
    pretrain_opts: list[str]
    variants: list[Variant]
    description: str = ""
    source_model: str | None = None
    adapt_opts: list[str] = field(default_factory=list)  # adapt --opts of every variant, after the shared ones
    paired: str = "first"  # one of PAIRED


def load_grid(path: str | Path) -> Grid:
    """Parse and check a grid file (unknown keys and missing ones named, with the file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file {path} does not exist; see configs/ablations/")
    data = read_yaml(path, "grid file") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"grid file {path} must hold a mapping (name, source, target, ...), not {type(data).__name__}")
    unknown = set(data) - GRID_KEYS
    missing = {"name", "source", "target", "pretrain_config", "adapt_config", "variants"} - set(data)
    if unknown or missing:
        raise ConfigError(f"{path}: " + "; ".join(
            ([f"unknown keys {sorted(unknown)} (known: {sorted(GRID_KEYS)})"] if unknown else [])
            + ([f"missing keys {sorted(missing)}"] if missing else [])))
    if not isinstance(data["variants"], dict) or not data["variants"]:
        raise ConfigError(f"{path}: variants must be a mapping of name -> {{opts, pretrain_opts, documents}}")
    if not NAME.fullmatch(str(data["name"])):
        raise ConfigError(f"{path}: name {data['name']!r} must be letters, digits and . = + - _ (it names the grid's folder and files)")
    for key in ("opts", "pretrain_opts", "adapt_opts"):
        check_opts(data.get(key, []), f"{path}: {key}")
    variants = []
    for name, spec in data["variants"].items():
        spec = spec or {}
        if not isinstance(spec, dict):
            raise ConfigError(f"{path}: variant {name!r} must be a mapping {{opts: [...], documents: ...}}, not {spec!r}")
        if set(spec) - VARIANT_KEYS:
            raise ConfigError(f"{path}: variant {name!r} has unknown keys {sorted(set(spec) - VARIANT_KEYS)} (known: {sorted(VARIANT_KEYS)})")
        if not NAME.fullmatch(str(name)):
            raise ConfigError(f"{path}: variant name {name!r} must be letters, digits and . = + - _ (it names a folder)")
        for key in ("opts", "pretrain_opts"):
            check_opts(spec.get(key, []), f"{path}: variant {name!r} {key}")
        variants.append(Variant(str(name), list(spec.get("opts", [])), list(spec.get("pretrain_opts", [])), str(spec.get("documents", ""))))
    for key in ("pretrain_config", "adapt_config", "source_model"):
        if data.get(key):
            data[key] = resolve(data[key])
            if key != "source_model" and not Path(data[key]).is_file():
                raise ConfigError(f"{path}: {key} {data[key]} does not exist")
    paired = data.get("paired", "first")
    if paired not in PAIRED:
        raise ConfigError(f"{path}: paired must be one of {list(PAIRED)} (the row a paired difference is from), not {paired!r}")
    if data.get("source_model") and any(v.pretrain_opts for v in variants):
        raise ConfigError(f"{path}: a variant with pretrain_opts needs its own source model; remove source_model or those pretrain_opts")
    return Grid(data["name"], data["source"], data["target"], data["pretrain_config"], data["adapt_config"],
                list(data.get("opts", [])), list(data.get("pretrain_opts", [])), variants, str(data.get("description", "")),
                data.get("source_model"), list(data.get("adapt_opts", [])), paired)


def check_opts(opts, where: str) -> None:
    """A grid file's opts must be a YAML list of key=value strings: a bare string would be split into
    characters, which the stages would reject only when they start, maybe hours into the grid."""
    if not isinstance(opts, list) or not all(isinstance(opt, str) and "=" in opt for opt in opts):
        raise ConfigError(f"{where} must be a list of key=value strings, e.g. [optim.epochs=3], not {opts!r}")


def resolve(value: str) -> str:
    """A grid file's path as an absolute one: as given when it exists from here, else from the repository
    (the stages run with the repository as their working directory)."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    return str((Path.cwd() / path).absolute() if (Path.cwd() / path).exists() else REPO / path)


def source_key(variant: Variant) -> str:
    """The folder name of a variant's source model: variants with the same pretrain_opts share one."""
    if not variant.pretrain_opts:
        return "default"
    return hashlib.sha1(" ".join(sorted(variant.pretrain_opts)).encode()).hexdigest()[:10]


@dataclass
class Run:
    """One stage of one seed: what to run and where its folder is."""

    stage: str  # pretrain | adapt
    folder: Path
    argv: list[str]
    label: str  # for progress lines: "<variant> seed <s>"
    after: Path | None = None  # the source model's folder, when this grid trains it: run only once that is done
    threads: int | None = None  # OMP_NUM_THREADS of its process (None: inherited)

    @property
    def done(self) -> bool:
        return (self.folder / FINAL_MODEL).is_file()

    @property
    def started(self) -> bool:
        return (self.folder / LAST_CHECKPOINT).is_file()


def source_folder(grid: Grid, variant: Variant, seed: int, runs_dir: Path) -> Path:
    """Where the source model a variant's seed adapts from is trained (unless the grid gives source_model)."""
    return runs_dir / grid.name / "source" / source_key(variant) / f"seed{seed}"


def adapt_folder(grid: Grid, variant: Variant, seed: int, runs_dir: Path) -> Path:
    """Where a variant's adaptation of one seed runs (and the table, plots and machine line read it)."""
    return runs_dir / grid.name / variant.name / f"seed{seed}"


def plan(grid: Grid, seeds: list[int], runs_dir: Path) -> list[Run]:
    """Every stage to run, in order: seed by seed (a grid cut short still has every variant at its first
    seeds), each source model before the adaptations that start from it."""
    runs: list[Run] = []
    planned: set[Path] = set()
    for seed in seeds:
        for variant in grid.variants:
            source_dir = source_folder(grid, variant, seed, runs_dir)
            init = Path(grid.source_model) if grid.source_model else source_dir / FINAL_MODEL
            if not grid.source_model and source_dir not in planned:
                planned.add(source_dir)
                runs.append(Run("pretrain", source_dir, [
                    "--config", grid.pretrain_config, "--source", grid.source, "--target", grid.target,
                    "--output-dir", str(source_dir), "--opts", *grid.opts, *grid.pretrain_opts, *variant.pretrain_opts, f"seed={seed}",
                ], f"source {source_key(variant)} seed {seed}"))
            adapt_dir = adapt_folder(grid, variant, seed, runs_dir)
            runs.append(Run("adapt", adapt_dir, [
                "--config", grid.adapt_config, "--source", grid.source, "--target", grid.target,
                "--init", str(init), "--output-dir", str(adapt_dir),
                "--opts", *grid.opts, *grid.adapt_opts, *variant.opts, f"seed={seed}",
            ], f"{variant.name} seed {seed}", after=None if grid.source_model else source_dir))
    return runs


def planned_config(run: Run):
    """The config the run's stage builds from its planned argv (what its config.yaml must say)."""
    parser = stage_parser(run.stage)  # the stages' own flags, read as the stages read them
    parser.add_argument("--init")
    args = parser.parse_args(run.argv)
    return settings.load(run.stage, args.config, config_overrides(args))


def check_same_settings(run: Run) -> None:
    """A run folder already there must hold this variant's run: a grid file edited since (other opts) is
    refused with the differences, not summarised from the old results."""
    try:
        changes = check_resumable(run.folder, planned_config(run))
        trained = {key: change for key, change in changes.items() if key in settings.CHANGE_RESULTS}
        if run.done and trained:  # a finished run's numbers depend on these too
            raise UdaError(f"{run.folder} was run with " + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(trained.items())))
    except UdaError as exc:
        raise ConfigError(f"{run.stage} of {run.label}: {exc}; the grid file changed since that run: delete {run.folder} "
                          "to run it again, or restore the grid file") from None


def check_planned(grid: Grid, todo: list[Run]) -> None:
    """Every stage still to run gets a config its stage accepts, and a given source model exists: a
    typo in one variant's opts fails now, not when that variant starts hours into the grid. So does a setting
    your own target data cannot serve, such as camera normalisation or proxies without cameras (adapt's check)."""
    if grid.source_model and any(run.stage == "adapt" for run in todo) and not Path(grid.source_model).is_file():
        raise ConfigError(f"grid {grid.name}: source_model {grid.source_model} does not exist; train it first "
                          "(the grid file's header names the command)")
    from uda.adapt import check_target
    from uda.data.splits import load_named_dataset
    from uda.datasets import KNOWN_DATASETS
    from uda.datasets.custom import is_custom_dataset

    targets = {}  # your own target data, parsed (file names only) once, from where the stages run
    for run in todo:
        try:
            cfg = planned_config(run)
            if run.stage == "adapt":
                name = cfg.data.target  # the built-in datasets all have cameras
                if name not in KNOWN_DATASETS and is_custom_dataset(name):
                    if name not in targets:
                        targets[name] = load_named_dataset(str(REPO / Path(name).expanduser()), cfg, "target")
                    check_target(cfg, targets[name])
        except ConfigError as exc:
            raise ConfigError(f"grid {grid.name}, {run.stage} of {run.label}: {exc}") from None


EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+) ")


def run_stage(run: Run, progress: Callable[[str], None]) -> None:
    """Run one stage in its own process (resuming a cut one), relaying a progress line per epoch."""
    argv = [sys.executable, str(REPO / "uda" / f"{run.stage}.py"), *run.argv] + (["--resume"] if run.started else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(run.threads)} if run.threads else None
    start = time.perf_counter()
    process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    first_epoch = None  # a resumed run starts past epoch 1: its ETA counts the epochs this process ran
    for line in process.stdout:
        tail = (tail + [line])[-20:]
        match = EPOCH_LINE.search(line)
        if match:
            epoch, epochs = int(match.group(1)), int(match.group(2))
            first_epoch = epoch if first_epoch is None else first_epoch
            eta = (time.perf_counter() - start) / (epoch - first_epoch + 1) * (epochs - epoch)
            progress(f"{run.stage} {run.label}: epoch {epoch}/{epochs}, this run ETA {eta / 60:.1f} min")
    if process.wait() != 0:
        raise ConfigError(f"{run.stage} of {run.label} failed (exit {process.returncode}); its last lines:\n" + "".join(tail[-8:]))


def run_grid(grid: Grid, seeds: list[int], runs_dir: Path, progress: Callable[[str], None] = partial(print, flush=True),
             runner: Callable[[Run, Callable[[str], None]], None] = run_stage, jobs: int = 1) -> list[Run]:
    """Run every stage not yet done (skipped when its model_final.pth exists, resumed when it has a
    last.pth), `jobs` at a time, with a progress line per run and an ETA for the grid from the runs' mean
    time so far. A failed run stops new ones from starting; those running finish first."""
    runs = plan(grid, seeds, runs_dir)
    for run in runs:
        if run.done or run.started:
            check_same_settings(run)
    todo = [r for r in runs if not r.done]
    check_planned(grid, todo)
    progress(f"grid {grid.name}: {len(runs)} runs, {len(runs) - len(todo)} done, {len(todo)} to run"
             + (f", {jobs} at a time" if jobs > 1 else ""))
    if jobs > 1:
        threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // jobs))
        for run in todo:
            run.threads = threads
    times: list[float] = []
    waiting, running = list(todo), {}  # running: future -> (run, start time)
    with ThreadPoolExecutor(jobs) as pool:
        while waiting or running:
            unfinished = {r.folder for r in waiting} | {r.folder for r, _ in running.values()}
            for run in [r for r in waiting if r.after not in unfinished][:jobs - len(running)]:
                waiting.remove(run)
                index = len(todo) - len(waiting)
                eta = f", grid ETA {np.mean(times) * (len(waiting) + 1) / jobs / 60:.0f} min" if times else ""
                progress(f"[{index}/{len(todo)}] {run.stage} {run.label}{' (resumed)' if run.started else ''}{eta}")
                running[pool.submit(runner, run, progress)] = (run, time.perf_counter())
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in finished:
                _, start = running.pop(future)
                times.append(time.perf_counter() - start)
                failure = future.exception()
                if failure is not None:
                    waiting.clear()  # start nothing new; the with-block waits for the running ones
                    raise failure
    return runs


# ------------------------------------------------------------------------------------------ summary


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def paired_difference(values: dict[int, float], reference: dict[int, float]) -> tuple[float, float, int] | None:
    """(mean, std, count) of values[s] - reference[s] over the seeds both have; None when they share none."""
    both = sorted(set(values) & set(reference))
    return (*mean_std([values[s] - reference[s] for s in both]), len(both)) if both else None


def summarise(grid: Grid, seeds: list[int], runs_dir: Path) -> list[dict]:
    """One row per variant: the last epoch's target metrics (and direct transfer) over the seeds whose
    adaptation finished, as {name, documents, seeds, direct: (mean, std), <metric>: (mean, std)}, with the
    source models' own last mAP on the source test set (on_source: (mean, std), when the grid trained
    them: a source-side variant such as a BoT trick shows its effect there first), and for every row
    after the first its paired mAP difference from the reference row (the first, or under `paired:
    previous` the row above): paired_map: (mean, std, seeds). The variants of one seed share its data order
    (and its source model, unless their pretrain_opts differ), so the seed's noise largely cancels in
    their difference, which a comparison of two rows' means would carry twice. paired_source: the same
    difference of the source models' own mAP (exactly 0 for a row sharing the reference's). per_seed:
    {seed: mAP}, for a reader to see that noise and to combine seeds run on other machines."""
    rows, reference = [], None  # reference: the reference row's (mAP per seed, source model's mAP per seed)
    for variant in grid.variants:
        folders = {s: adapt_folder(grid, variant, s, runs_dir) for s in seeds}
        results = {s: collect(folder, grid.target) for s, folder in folders.items() if (folder / FINAL_MODEL).is_file()}
        row = {"name": variant.name, "documents": variant.documents, "seeds": len(results)}
        maps = {s: r["adapted"]["mAP"] for s, r in results.items()}
        source_maps: dict[int, float] = {}
        if results:
            row["per_seed"] = maps
            row["direct"] = mean_std([r["direct"]["mAP"] for r in results.values()])
            sources = {s: source_folder(grid, variant, s, runs_dir) for s in results}
            if not grid.source_model and all((folder / "metrics.jsonl").is_file() for folder in sources.values()):
                on_source = {s: evaluation(folder, grid.source, "last") for s, folder in sources.items()}
                if all(on_source.values()):
                    source_maps = {s: e["mAP"] for s, e in on_source.items()}
                    row["on_source"] = mean_std(list(source_maps.values()))
            row.update({metric: mean_std([r["adapted"][metric] for r in results.values()]) for metric in METRICS})
        if reference is not None:
            for key, values, reference_values in (("paired_map", maps, reference[0]), ("paired_source", source_maps, reference[1])):
                if difference := paired_difference(values, reference_values):
                    row[key] = difference
        if reference is None or grid.paired == "previous":
            reference = (maps, source_maps)
        rows.append(row)
    return rows


def markdown(grid: Grid, rows: list[dict], machine: str = "") -> str:
    """The grid's table: mean +- std (in %) of the last epoch per variant, beside the documents' figure;
    with a paired column for the source models' own mAP when some variant trains its own (pretrain_opts)."""
    def cell(value: tuple[float, float] | None) -> str:
        return "-" if value is None else f"{100 * value[0]:.1f} +- {100 * value[1]:.1f}"

    def paired(value: tuple[float, float, int] | None) -> str:
        return "-" if value is None else f"{100 * value[0]:+.1f} +- {100 * value[1]:.1f} ({value[2]})"

    def per_seed(maps: dict[int, float] | None) -> str:
        return ", ".join(f"{seed}: {100 * value:.1f}" for seed, value in sorted(maps.items())) if maps else "-"

    reference = "previous row" if grid.paired == "previous" else (rows[0]["name"] if rows else "first")
    with_source = not grid.source_model and any(v.pretrain_opts for v in grid.variants)
    header = (["variant", "seeds", f"source model's mAP on {grid.source}"] + ([f"source mAP - {reference}"] if with_source else [])
              + ["direct mAP", "mAP", f"mAP - {reference}", "rank-1", "rank-5", "rank-10", "mAP per seed", "source documents"])
    lines = [f"# Grid {grid.name}", ""]
    if grid.description:
        lines += [grid.description, ""]
    lines += [f"{grid.source} -> {grid.target}; target test set, last epoch; mean +- sample std over seeds."
              + (f" {machine}" if machine else ""), "",
              f"mAP - {reference}: the paired difference per seed (mean +- std over the seeds both finished, their count)."
              + (f" Source mAP - {reference}: the same for the source models' own mAP on {grid.source}." if with_source else ""), "",
              "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for row in rows:
        lines.append(f"| {row['name']} | {row['seeds']} | {cell(row.get('on_source'))} | "
                     + (f"{paired(row.get('paired_source'))} | " if with_source else "")
                     + f"{cell(row.get('direct'))} | {cell(row.get('mAP'))} | {paired(row.get('paired_map'))} | "
                     + " | ".join(cell(row.get(m)) for m in METRICS[1:]) + f" | {per_seed(row.get('per_seed'))} | {row['documents'] or '-'} |")
    return "\n".join(lines) + "\n"


def curves(grid: Grid, seeds: list[int], runs_dir: Path) -> dict[str, dict[str, dict[int, float]]]:
    """Per variant, the seeds' mean per epoch of: target mAP (evaluated epochs), cluster count and NMI."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    for variant in grid.variants:
        series: dict[str, dict[int, list[float]]] = {"mAP": {}, "clusters": {}, "nmi": {}}
        for seed in seeds:
            path = adapt_folder(grid, variant, seed, runs_dir) / "metrics.jsonl"
            for record in read_metrics(path) if path.is_file() else []:
                epoch = record["epoch"]
                if grid.target in record:
                    series["mAP"].setdefault(epoch, []).append(record[grid.target]["mAP"])
                if "clusters" in record:
                    series["clusters"].setdefault(epoch, []).append(record["clusters"]["num_clusters"])
                    if "nmi" in record["clusters"]:
                        series["nmi"].setdefault(epoch, []).append(record["clusters"]["nmi"])
        out[variant.name] = {key: {e: float(np.mean(v)) for e, v in sorted(s.items())} for key, s in series.items()}
    return out


def plot(curves_by_variant: dict, out_dir: Path, name: str) -> list[Path]:
    """<name>_map.png (target mAP per epoch) and <name>_clusters.png (cluster count and NMI per epoch)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    paths = []
    panels = [("map", [("mAP", "target mAP")]), ("clusters", [("clusters", "clusters"), ("nmi", "NMI vs true ids (diagnostic)")])]
    for suffix, keys in panels:
        fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
        for axis, (key, title) in zip(axes[0], keys):
            for variant, series in curves_by_variant.items():
                points = series[key]
                if points:
                    axis.plot(list(points), list(points.values()), marker="o", label=variant)
            axis.set_xlabel("epoch")
            axis.set_title(title)
            axis.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{name}_{suffix}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def machines(grid: Grid, seeds: list[int], runs_dir: Path) -> str:
    """Where the finished adaptations ran (the table's runs), from their version.txt: CPU, GPU, threads,
    commit (each distinct one, short, keeping '+dirty': such a run had changes the commit does not hold)."""
    seen = []
    for variant in grid.variants:
        for seed in seeds:
            path = adapt_folder(grid, variant, seed, runs_dir) / "version.txt"
            if path.is_file() and (path.parent / FINAL_MODEL).is_file():
                fields = dict(line.split(": ", 1) for line in path.read_text().splitlines() if ": " in line)
                commit, plus, suffix = fields.get("commit", "?").partition("+")
                line = (f"{fields.get('cpu', '?')}, gpu {fields.get('gpu', '?')}, threads {fields.get('threads', '?')}, "
                        f"commit {commit[:12]}{plus}{suffix}")
                if line not in seen:
                    seen.append(line)
    return "Machine: " + "; ".join(seen) + "." if seen else ""


def parse_seeds(text: str) -> list[int]:
    """--seeds N (seeds 0..N-1) or A-B (seeds A..B, both included)."""
    first, dash, last = text.partition("-")
    try:
        seeds = list(range(int(first), int(last) + 1)) if dash else list(range(int(first)))
    except ValueError:
        seeds = []
    if not seeds or seeds[0] < 0:
        raise argparse.ArgumentTypeError(f"a count N >= 1 or a range A-B with 0 <= A <= B, not {text!r}")
    return seeds


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", help="a grid file, e.g. configs/ablations/uda_loop.yaml")
    parser.add_argument("--seeds", type=parse_seeds, default=[0, 1, 2],
                        help="N: seeds 0..N-1 per variant (default 3); A-B: seeds A..B, e.g. the ones another machine has not run")
    parser.add_argument("--runs-dir", type=output_folder, default=Path("runs/grid"), help="where the runs go (default runs/grid)")
    parser.add_argument("--only", nargs="+", help="run and report only these variants")
    parser.add_argument("--report-only", action="store_true", help="write the table and plots from the runs there are")
    parser.add_argument("--jobs", type=positive_int, default=1, help="stages run at once, each with cores / jobs CPU threads (default 1)")
    args = parser.parse_args(argv)
    grid = load_grid(args.grid)
    if args.only:
        unknown = set(args.only) - {v.name for v in grid.variants}
        if unknown:
            raise ConfigError(f"--only {sorted(unknown)}: not variants of {grid.name} ({', '.join(v.name for v in grid.variants)})")
        grid.variants = [v for v in grid.variants if v.name in args.only]
    seeds = args.seeds
    runs_dir = args.runs_dir.absolute()
    if not args.report_only:
        run_grid(grid, seeds, runs_dir, jobs=args.jobs)
    rows = summarise(grid, seeds, runs_dir)
    out_dir = runs_dir / grid.name
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(grid, rows, machines(grid, seeds, runs_dir))
    (out_dir / f"{grid.name}.md").write_text(table)
    pictures = plot(curves(grid, seeds, runs_dir), out_dir, grid.name)
    print(table)
    print(f"wrote {out_dir / (grid.name + '.md')}, " + ", ".join(str(p) for p in pictures))
    return rows
