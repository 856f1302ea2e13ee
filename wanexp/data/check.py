"""The data check: what a data root holds, and whether a run's splits can be read from it.

``python -m wanexp.data check ROOT [OVERRIDE ...]`` prints the files, ids per file and per category,
the ids the files share (identical or differing), missing or undecodable images, empty prompts, and
the split the configuration given by the overrides would produce; it exits 1 on a problem. A
problem is something broken in a file of the root, or a split the configuration cannot produce (a
conflict between files it reads, say). Differing records in files the configuration does not merge
are the published state of OpenS2V-Eval and only reported.

``check_run_data`` is the same check for one run, at its start, before any model is loaded: every
sample of both splits read, its image decoded.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Iterable, Mapping

from wanexp.data import Splits, load_splits
from wanexp.data.opens2v import (CATEGORIES, KNOWN_FILES, category_of, differing_fields, image_paths, load_records,
                                 natural_key)
from wanexp.errors import WanexpError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def decode_problem(path: Path) -> str | None:
    """Why the image at ``path`` cannot be used (missing, undecodable), or None."""
    from PIL import Image
    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))  # JPEG decodes at reduced scale: the whole stream is still read
            im.load()
    except Exception as err:  # PIL raises many types for broken files; each is the file's problem
        return f"undecodable ({type(err).__name__}: {err})"
    return None


def decode_problems(paths: Iterable[Path]) -> dict[Path, str]:
    paths = list(dict.fromkeys(paths))
    with ThreadPoolExecutor(max_workers=4) as pool:  # PIL decodes outside the GIL
        found = pool.map(decode_problem, paths)
    return {p: why for p, why in zip(paths, found) if why}


def check_run_data(data_cfg: Mapping[str, Any], cache_dir: str | Path) -> Splits:
    """The run's splits, every sample read (JSON, ids, non-empty prompt) and the image each is
    conditioned on decoded; one WanexpError naming what is wrong otherwise."""
    splits = load_splits(data_cfg, cache_dir)
    samples = [s for s in splits.calib + splits.eval if not s.extra.get("blank_image")]
    bad = decode_problems(s.image_path for s in samples)
    if bad:
        owner = {s.image_path: s for s in samples}
        items = [f"{p} of {owner[p].id!r} ({Path(owner[p].source).name}) is {why}" for p, why in bad.items()]
        raise WanexpError(f"{len(bad)} image(s) of the run's samples cannot be used: {'; '.join(items[:3])}"
                          f"{' …' if len(items) > 3 else ''} (python -m wanexp.data check ROOT lists them all)")
    return splits


# ---------------------------------------------------------------------------------------------
# the report of a whole root
# ---------------------------------------------------------------------------------------------
@dataclass
class FileReport:
    name: str
    records: dict[str, dict] = field(default_factory=dict)
    error: str | None = None       # the file cannot be read at all
    absent: bool = False           # one of the published files, not in this copy

    @property
    def categories(self) -> Counter:
        out = Counter()
        for sid in self.records:
            try:
                out[category_of(sid)] += 1
            except WanexpError:
                out["unknown"] += 1
        return out


@dataclass
class RootReport:
    root: Path
    files: list[FileReport]
    problems: list[str]
    lines: list[str]


def scan_root(root: Path) -> RootReport:
    root = Path(root).expanduser()
    if not root.is_dir():
        return RootReport(root, [], [f"{root} is not a directory"], [])
    names = list(KNOWN_FILES) + sorted(p.name for p in root.glob("*.json") if p.name not in KNOWN_FILES)
    files, problems = [], []
    for name in names:
        report = FileReport(name, absent=not (root / name).is_file())
        if not report.absent:
            try:
                report.records = load_records(root / name)
            except WanexpError as err:
                report.error = str(err)
                problems.append(str(err))
        files.append(report)
    lines = ["files"] + [_file_line(f) for f in files]
    record_problems, empty = _record_problems(files)
    images: dict[Path, str] = {}  # each referenced image, and the first record that uses it
    for f in files:
        for sid, rec in f.records.items():
            for p in image_paths(rec):
                images.setdefault(root / p, f"{f.name}: {sid!r}")
    bad_images = decode_problems(images)
    problems += record_problems + [f"image {os.path.relpath(p, root)} ({images[p]}) is {why}"
                                   for p, why in sorted(bad_images.items())]
    lines += ["overlaps"] + (_overlap_lines(files) or ["  none"])
    missing = sum(why == "missing" for why in bad_images.values())
    lines.append(f"images: {len(images)} referenced, {missing} missing, {len(bad_images) - missing} undecodable")
    lines.append(f"prompts: {empty} empty or missing")
    return RootReport(root, files, problems, lines)


def _file_line(f: FileReport) -> str:
    if f.absent:
        return f"  {f.name:<26} absent"
    if f.error:
        return f"  {f.name:<26} unreadable"
    cats = _counts(f.categories)
    per = Counter(len(image_paths(r)) for r in f.records.values())
    images = ", ".join(f"{k}: {per[k]}" for k in sorted(per))
    return f"  {f.name:<26} {len(f.records):>4} ids  ({cats}); samples by number of images {images}"


def _counts(categories: Counter) -> str:
    """Category counts in the seed paper's order (unknown prefixes last)."""
    order = {c: i for i, c in enumerate(CATEGORIES)}
    return ", ".join(f"{c} {n}" for c, n in sorted(categories.items(), key=lambda cn: order.get(cn[0], len(order))))


def _record_problems(files: list[FileReport]) -> tuple[list[str], int]:
    """Problems of the records themselves (prefix, prompt, img_paths), and the number of empty prompts."""
    problems, empty = [], 0
    for f in files:
        for sid, rec in f.records.items():
            try:
                category_of(sid)
            except WanexpError as err:
                problems.append(f"{f.name}: {err}")
            if not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
                problems.append(f"{f.name}: {sid!r} has an empty or missing prompt")
                empty += 1
            if not image_paths(rec):
                problems.append(f"{f.name}: {sid!r} has no img_paths")
    return problems, empty


def _overlap_lines(files: list[FileReport]) -> list[str]:
    lines = []
    for a, b in combinations([f for f in files if f.records], 2):
        shared = sorted(a.records.keys() & b.records.keys(), key=natural_key)
        if not shared:
            continue
        differ = [s for s in shared if a.records[s] != b.records[s]]
        fields = sorted({k for s in differ for k in differing_fields(a.records[s], b.records[s])})
        line = f"  {a.name} & {b.name}: {len(shared)} shared ids, {len(shared) - len(differ)} identical"
        if differ:
            line += f", {len(differ)} differ (fields: {', '.join(fields)}; e.g. {', '.join(differ[:3])})"
        lines.append(line)
    return lines


# ---------------------------------------------------------------------------------------------
# the split a configuration would produce
# ---------------------------------------------------------------------------------------------
def compose_data_config(root: Path, overrides: list[str]) -> dict:
    """The composed ``data`` config of ``python -m wanexp data=opens2v_eval OVERRIDES data.root=ROOT``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    quoted = str(root).replace("\\", "\\\\").replace("'", "\\'")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="wanexp_data_check"):
        cfg = compose("config", overrides=["data=opens2v_eval", *overrides, f"data.root='{quoted}'"])
    return {"data": OmegaConf.to_container(cfg.data, resolve=True), "cache_dir": cfg.paths.cache_dir}


def split_lines(data_cfg: Mapping[str, Any], cache_dir: str) -> tuple[list[str], list[str]]:
    """(lines describing the split, problems)."""
    files = data_cfg.get("files")
    head = (f"split (data.files={list(files) if files else 'default'}, on_conflict={data_cfg.get('on_conflict')}, "
            f"split_seed={data_cfg.get('split_seed')}, image_condition={data_cfg.get('image_condition')}, calib.overlap_eval={bool((data_cfg.get('calib') or {}).get('overlap_eval'))})")
    try:
        splits = check_run_data(data_cfg, cache_dir)
    except WanexpError as err:
        return [head, f"  cannot be produced: {err}"], [f"split: {err}"]
    cats = Counter(s.category for s in splits.eval)
    calib = " ".join(s.id for s in splits.calib)
    return [head,
            f"  calibration: {len(splits.calib)} samples from {splits.calib_source}: {calib or '-'}",
            f"  evaluation:  {len(splits.eval)} samples ({_counts(cats)})",
            f"  calibrated and evaluated: {len(splits.overlap)}"
            + (" (data.calib.overlap_eval=true)" if splits.overlap else "")], []


def check(root: str | Path, overrides: Iterable[str] = (), out=sys.stdout) -> int:
    """Print the report of ``root`` and the split of the configuration; 0 when there is no problem."""
    root = Path(root).expanduser().resolve()
    report = scan_root(root)
    lines = [f"OpenS2V-Eval data check: {root}", *report.lines]
    problems = list(report.problems)
    if root.is_dir():
        composed = compose_data_config(root, list(overrides))
        more, bad = split_lines(composed["data"], composed["cache_dir"])
        lines += more
        problems += bad
    lines.append(f"problems: {len(problems)}" if problems else "problems: none")
    lines += [f"  {p}" for p in problems]
    print("\n".join(lines), file=out)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wanexp.data", description="Check an OpenS2V-Eval data root.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="what a data root holds, its problems, and the split a config would produce")
    p.add_argument("root", help="the OpenS2V-Eval folder (Images/ and the *_Eval.json files)")
    p.add_argument("overrides", nargs="*", help="config overrides of the run to check, e.g. +experiment=paper_table1")
    args = parser.parse_args(argv)
    try:
        return check(args.root, args.overrides)
    except Exception as err:  # a bad override: Hydra's message on one line
        if type(err).__module__.startswith(("hydra", "omegaconf")) or isinstance(err, WanexpError):
            print(f"wanexp.data: error: {err}".replace("\n", " "), file=sys.stderr)
            return 2
        raise
