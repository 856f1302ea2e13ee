"""VBench scores of generated videos, computed by the real ``vbench`` package (an optional extra).

VBench scores a video by running pretrained networks over its frames: MUSIQ (imaging quality),
CLIP ViT-L/14 with the LAION aesthetic head (aesthetic quality), DINO ViT-B/16 (subject
consistency), AMT-S frame interpolation (motion smoothness), ViCLIP (overall consistency). VBench
fetches those weights into its cache directory on first use, with ``wget``. Here nothing is ever
fetched: every file a dimension needs is checked first (:func:`check_weights`), and a missing one is
reported with its full expected path and the address VBench itself would fetch it from.

Scoring goes through VBench's own code: ``vbench.utils.init_submodules`` (local mode, so CLIP and
DINO load from files) and each dimension's ``compute_<dimension>``, fed a VBench full-info JSON
written here with one entry per video and its own prompt (what VBench's custom-input mode does for a
folder, but for exactly the videos asked for). The per-video values come from VBench's
``video_results``, on the scale of VBench's own dimension score; the one place VBench scales only
its aggregate (imaging quality, MUSIQ's 0–100 divided by 100) is scaled per video the same way, so a
dimension's score is the mean of its per-video values.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import math
import os
import sys
import traceback
import types
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

from wanexp.errors import WanexpError

# The seed paper's four dimensions; their unweighted mean is "VBench avg".
PAPER_DIMENSIONS = ("imaging_quality", "aesthetic_quality", "subject_consistency", "motion_smoothness")
# The HiFloat4 paper adds the video-text consistency of ViCLIP.
HIF4_DIMENSIONS = PAPER_DIMENSIONS + ("overall_consistency",)

INSTALL = 'pip install --no-deps vbench==0.1.5 pyiqa==0.1.16 && pip install -e ".[vbench]"'
CACHE_KEY = "evaluate.vbench.cache_dir"


class WeightFile(NamedTuple):
    path: str            # relative to the VBench cache directory
    source: str          # where VBench itself fetches it from


_DINO_REPO = "dino_model/facebookresearch_dino_main"
_DINO_CKPT = "dino_model/dino_vitbase16_pretrain.pth"
_BPE = "ViCLIP/bpe_simple_vocab_16e6.txt.gz"

# Every file each supported dimension reads from the cache directory (paths as in vbench 0.1.5's
# ``init_submodules`` and dimension modules), with the address VBench's own download would use.
WEIGHTS: dict[str, tuple[WeightFile, ...]] = {
    "imaging_quality": (
        WeightFile("pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",
                   "https://github.com/chaofengc/IQA-PyTorch/releases/download/v0.1-weights/musiq_spaq_ckpt-358bb6af.pth"),
    ),
    "aesthetic_quality": (
        WeightFile("clip_model/ViT-L-14.pt",
                   "https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt"),
        WeightFile("aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth",
                   "https://github.com/LAION-AI/aesthetic-predictor/blob/main/sa_0_4_vit_l_14_linear.pth?raw=true"),
    ),
    "subject_consistency": (
        WeightFile(f"{_DINO_REPO}/hubconf.py",
                   f"git clone https://github.com/facebookresearch/dino <cache_dir>/{_DINO_REPO}"),
        WeightFile(_DINO_CKPT, "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"),
    ),
    "motion_smoothness": (
        WeightFile("amt_model/amt-s.pth", "https://huggingface.co/lalala125/AMT/resolve/main/amt-s.pth"),
    ),
    "overall_consistency": (
        WeightFile("ViCLIP/ViClip-InternVid-10M-FLT.pth",
                   "https://huggingface.co/OpenGVLab/VBench_Used_Models/resolve/main/ViClip-InternVid-10M-FLT.pth"),
        WeightFile(_BPE, "https://raw.githubusercontent.com/openai/CLIP/main/clip/bpe_simple_vocab_16e6.txt.gz"),
    ),
}
SUPPORTED = tuple(WEIGHTS)

# The range of each dimension's score with the real weights (overall consistency is a cosine).
RANGES = {"imaging_quality": (0.0, 1.0), "aesthetic_quality": (0.0, 1.0), "subject_consistency": (0.0, 1.0),
          "motion_smoothness": (0.0, 1.0), "overall_consistency": (-1.0, 1.0)}

# vbench 0.1.5's dimensions: those VBench refuses for custom prompts (they need its own prompt suite's
# auxiliary info), and those it can score but this integration does not (untested here).
_NEEDS_EXTRA_INFO = ("object_class", "multiple_objects", "scene", "appearance_style", "color", "spatial_relationship")
_NOT_INTEGRATED = ("background_consistency", "temporal_flickering", "dynamic_degree", "human_action", "temporal_style")


# AMT-S looks motion up in a 4-level correlation pyramid at 1/8 of the frame (padded to a multiple of
# 16); below 128 pixels a side its coarsest level is one pixel wide and AMT divides by zero, which
# VBench turns into a meaningless score instead of an error.
MOTION_MIN_SIDE = 128


class MissingFile(NamedTuple):
    dimension: str
    path: Path           # the full expected path
    source: str


# ---------------------------------------------------------------------------------------------
# configuration checks (no vbench needed)
# ---------------------------------------------------------------------------------------------
def validate_dimensions(dimensions: Iterable[str]) -> tuple[str, ...]:
    """The dimensions as a tuple, or one error naming what is wrong and what is supported."""
    dims = tuple(str(d) for d in dimensions)
    if not dims:
        raise WanexpError(f"evaluate.vbench.dimensions is empty; choose from {', '.join(SUPPORTED)}")
    dupes = sorted({d for d in dims if dims.count(d) > 1})
    if dupes:
        raise WanexpError(f"evaluate.vbench.dimensions lists {', '.join(dupes)} more than once")
    for d in dims:
        if d in SUPPORTED:
            continue
        if d in _NEEDS_EXTRA_INFO:
            why = "needs the auxiliary info of VBench's own prompt suite, so VBench cannot score it on custom prompts"
        elif d in _NOT_INTEGRATED:
            why = "is a VBench dimension this integration does not run (its weights and inputs are not checked or tested here)"
        else:
            why = "is not a VBench dimension"
        raise WanexpError(f"evaluate.vbench.dimensions: {d!r} {why}; supported: {', '.join(SUPPORTED)}")
    return dims


def missing_files(dimensions: Iterable[str], cache_dir: str | os.PathLike) -> list[MissingFile]:
    """Each file the dimensions need that is not under ``cache_dir`` (a file shared by two dimensions once)."""
    cache = Path(cache_dir).expanduser()
    out, seen = [], set()
    for dim in validate_dimensions(dimensions):
        for wf in WEIGHTS[dim]:
            path = cache / wf.path
            if path in seen or path.is_file():
                continue
            seen.add(path)
            out.append(MissingFile(dim, path, wf.source.replace("<cache_dir>", str(cache))))
    return out


def weights_key(cache_dir: str | os.PathLike) -> str:
    """A short hash of the weight files present (path, size, mtime): scores cached under this key
    are reused only while the same weights are in place."""
    import hashlib
    cache = Path(cache_dir).expanduser()
    items = sorted({(w.path, (cache / w.path).stat().st_size, (cache / w.path).stat().st_mtime_ns)
                    for files in WEIGHTS.values() for w in files if (cache / w.path).is_file()})
    return hashlib.sha256(repr(items).encode()).hexdigest()[:12]


def check_weights(dimensions: Iterable[str], cache_dir: str | os.PathLike) -> None:
    """Raise one error naming every missing file (full path, dimension, where to get it)."""
    missing = missing_files(dimensions, cache_dir)
    if not missing:
        return
    cache = Path(cache_dir).expanduser()
    lines = []
    for m in missing:
        src = m.source if m.source.startswith("git clone") else f"from {m.source}"
        if m.path.name == Path(_BPE).name:
            bundled = _clip_bpe()
            if bundled:
                src += f" (or copy {bundled}, the same file shipped with openai-clip)"
        lines.append(f"  {m.path}  [{m.dimension}]  {src}")
    raise WanexpError(
        f"VBench needs {len(missing)} file(s) missing from its cache directory {cache} "
        f"({CACHE_KEY}, default $VBENCH_CACHE_DIR or ~/.cache/vbench; nothing is downloaded at run time):\n"
        + "\n".join(lines)
        + f"\nFetch them on a machine with internet and copy them to those paths (README, \"VBench offline\"), "
          f"or set {CACHE_KEY}=<dir> to a directory that has them.")


def _clip_bpe() -> str | None:
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    return str(path) if path.is_file() else None


# ---------------------------------------------------------------------------------------------
# importing vbench
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _pkg_resources_shim():
    """openai-clip and VBench's ViCLIP run ``from pkg_resources import packaging`` (to compare torch
    versions); setuptools ≥ 81 no longer has ``pkg_resources``. While they import, and only if the
    real module is absent, a stand-in module provides exactly that one name."""
    if "pkg_resources" in sys.modules or importlib.util.find_spec("pkg_resources") is not None:
        yield
        return
    import packaging.version  # noqa: F401  (the attribute clip reads is packaging.version)
    shim = types.ModuleType("pkg_resources")
    shim.packaging = sys.modules["packaging"]
    sys.modules["pkg_resources"] = shim
    try:
        yield
    finally:
        if sys.modules.get("pkg_resources") is shim:
            del sys.modules["pkg_resources"]


def import_vbench(dimensions: Sequence[str], cache_dir: str | os.PathLike) -> dict[str, Callable]:
    """Import vbench with ``cache_dir`` as its cache and return ``compute_<dim>`` for each dimension.

    vbench reads its cache directory from ``VBENCH_CACHE_DIR`` when first imported and some modules
    copy it then (``from vbench.utils import CACHE_DIR``); the copies are set here, before the
    dimension modules import. ViCLIP's tokenizer resolves its vocabulary file when first imported,
    so within one process overall consistency keeps the vocabulary of the first cache directory.
    """
    cache = str(Path(cache_dir).expanduser())
    try:
        with _pkg_resources_shim():
            import vbench.utils as vutils
    except ImportError as err:
        raise WanexpError(f"VBench scoring (evaluate.metrics has vbench) needs the vbench package, which cannot be "
                          f"imported ({err}); install it with: {INSTALL}") from None
    _set_cache_dir(cache)
    logging.getLogger("vbench").setLevel(logging.WARNING)  # its modules log at INFO on every model load
    funcs = {}
    for dim in dimensions:
        try:
            with _pkg_resources_shim():
                module = importlib.import_module(f"vbench.{dim}")
        except ImportError as err:
            raise WanexpError(f"VBench's {dim} cannot be imported ({err}); install its dependencies with: "
                              f"{INSTALL}") from None
        funcs[dim] = getattr(module, f"compute_{dim}")
    assert vutils.CACHE_DIR == cache
    return funcs


def _set_cache_dir(cache: str) -> None:
    for name in ("vbench.utils", "vbench.overall_consistency", "vbench.temporal_style",
                 "vbench.third_party.ViCLIP.simple_tokenizer"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "CACHE_DIR"):
            module.CACHE_DIR = cache


def check_ready(dimensions: Iterable[str], cache_dir: str | os.PathLike) -> tuple[str, ...]:
    """Everything that can be refused before scoring: dimension names, the vbench install, the weights."""
    dims = validate_dimensions(dimensions)
    check_weights(dims, cache_dir)
    import_vbench(dims, cache_dir)
    return dims


# ---------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _dino_weights_from_cache(cache: Path, work_dir: Path):
    """The DINO repository's ``dino_vitb16`` ignores the ``path`` VBench passes and loads its weights
    with ``torch.hub.load_state_dict_from_url``, from ``<torch hub dir>/checkpoints/`` or else from
    the internet. For the time of the call the hub directory is a scratch one whose checkpoint is a
    link to VBench's cache file, so the file VBench names is the one loaded and nothing is fetched."""
    import torch

    hub = work_dir / "torch_hub"
    link = hub / "checkpoints" / Path(_DINO_CKPT).name
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    try:
        link.symlink_to(cache / _DINO_CKPT)
    except OSError:  # a filesystem without symlinks
        import shutil
        shutil.copyfile(cache / _DINO_CKPT, link)
    before = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))
    try:
        yield
    finally:
        torch.hub.set_dir(before)
        link.unlink()


def _scale(dim: str, value: float) -> float:
    # VBench divides MUSIQ's 0–100 by 100 for the dimension score but not per video.
    return float(value) / 100.0 if dim == "imaging_quality" else float(value)


def score_videos(videos: Mapping[str, str | os.PathLike], prompts: Mapping[str, str], dimensions: Iterable[str],
                 cache_dir: str | os.PathLike, device, work_dir: str | os.PathLike) -> dict[str, dict[str, float]]:
    """VBench scores ``{video id: {dimension: score}}`` of ``videos`` (id → mp4), each with its prompt.

    ``work_dir`` receives VBench's inputs and outputs of the call: ``full_info.json`` (the videos and
    prompts as VBench reads them), ``eval_results.json`` (VBench's result per dimension: its score and
    its per-video list) and ``vbench.log`` (what VBench printed, appended).
    """
    dims = validate_dimensions(dimensions)
    check_weights(dims, cache_dir)
    cache, work = Path(cache_dir).expanduser(), Path(work_dir)
    funcs = import_vbench(dims, cache)
    if not videos:
        return {}
    lost = [i for i in videos if i not in prompts or not str(prompts[i]).strip()]
    if lost:
        raise WanexpError(f"no prompt for video(s) {', '.join(lost[:5])}: VBench needs each video's own prompt")
    paths = {}
    for vid, path in videos.items():
        path = Path(path).resolve()
        if not path.is_file():
            raise WanexpError(f"video {vid}: {path} does not exist")
        paths[str(path)] = vid
        if "motion_smoothness" in dims:
            w, h = frame_size(path)
            if -(-min(w, h) // 16) * 16 < MOTION_MIN_SIDE:
                raise WanexpError(f"motion_smoothness needs frames of at least {MOTION_MIN_SIDE - 15} pixels a side "
                                  f"(AMT-S's correlation pyramid), but video {vid} is {w}×{h}; generate larger videos "
                                  "or leave motion_smoothness out of evaluate.vbench.dimensions")
    work.mkdir(parents=True, exist_ok=True)
    info_path = work / "full_info.json"
    info = [{"prompt_en": str(prompts[vid]), "dimension": list(dims), "video_list": [p]} for p, vid in paths.items()]
    info_path.write_text(json.dumps(info, indent=1))

    import vbench.utils as vutils
    import torch

    log_path = work / "vbench.log"
    results: dict[str, dict[str, float]] = {vid: {} for vid in videos}
    raw: dict = {}
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        submodules = vutils.init_submodules(list(dims), local=True)  # every file exists: nothing to fetch
        for dim in dims:
            guard = _dino_weights_from_cache(cache, work) if dim == "subject_consistency" else contextlib.nullcontext()
            try:
                with guard, torch.no_grad():
                    aggregate, per_video = funcs[dim](str(info_path), str(device), submodules[dim])
            except Exception as err:
                traceback.print_exc(file=log)
                raise WanexpError(f"VBench failed on {dim}: {type(err).__name__}: {err} (VBench's output and the "
                                  f"traceback are in {log_path}; are the files in {cache} the right ones?)") from None
            raw[dim] = [float(aggregate), per_video]
            for rec in per_video:
                results[paths[str(rec["video_path"])]][dim] = _scale(dim, rec["video_results"])
    (work / "eval_results.json").write_text(json.dumps(raw, indent=1, default=str))
    for vid in results:
        for d in dims:
            if d not in results[vid]:
                raise WanexpError(f"VBench returned no {d} score for video {vid} (see {log_path})")
            if not math.isfinite(results[vid][d]):
                raise WanexpError(f"VBench's {d} score of video {vid} is {results[vid][d]} (see {log_path}; "
                                  f"are the files in {cache} the right ones?)")
    return results


def frame_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of a video, from its header."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        return tuple(next(reader)["size"])
    finally:
        reader.close()


def average(scores: Mapping[str, float], dimensions: Iterable[str]) -> float:
    """"VBench avg": the unweighted mean of the given dimensions' scores."""
    dims = tuple(dimensions)
    return float(sum(float(scores[d]) for d in dims) / len(dims))


def summarize(rows: Iterable[Mapping], dimensions: Iterable[str]) -> dict:
    """Per-dimension means over videos, their unweighted mean ``vbench_avg``, and the same per category."""
    rows, dims = list(rows), tuple(dimensions)

    def means(rs):
        out = {d: float(sum(r[d] for r in rs) / len(rs)) for d in dims}
        return out | {"vbench_avg": average(out, dims), "num_videos": len(rs)}

    if not rows:
        return {"num_videos": 0, "dimensions": list(dims)}
    cats: dict = {}
    for r in rows:
        cats.setdefault(r.get("category", "all"), []).append(r)
    return means(rows) | {"dimensions": list(dims),
                          "per_category": {c: means(rs) for c, rs in sorted(cats.items())}}


def score_into(out: Path, videos: Mapping[str, Path], samples: Mapping, vcfg: Mapping, device, work_dir: Path,
               progress: Callable[[Iterable], Iterable] = lambda it: it) -> dict:
    """Score the videos not yet in ``out`` (one JSON line per video, appended as each chunk finishes);
    returns :func:`summarize` over all ``videos``. ``samples`` maps an id to its sample (prompt, category)."""
    from wanexp.io import append_jsonl, read_jsonl

    dims = check_ready(vcfg["dimensions"], vcfg["cache_dir"])
    scored = {r["id"]: r for r in read_jsonl(out) if all(isinstance(r.get(d), (int, float)) for d in dims)}
    todo = [i for i in videos if i not in scored]
    chunk = max(1, int(vcfg.get("chunk_size") or 16))
    for k in progress(range(0, len(todo), chunk)):
        ids = todo[k:k + chunk]
        scores = score_videos({i: videos[i] for i in ids}, {i: samples[i].prompt for i in ids}, dims,
                              vcfg["cache_dir"], device, work_dir)
        for i in ids:
            row = {"id": i, "category": samples[i].category, **scores[i], "vbench_avg": average(scores[i], dims)}
            append_jsonl(out, row)
            scored[i] = row
    return summarize((scored[i] for i in videos), dims)
