"""VBench scoring through vbench's real code (``compute_<dimension>``, ``init_submodules``, its model
loaders), on stand-in weights: files of each network's real architecture with random values, written
once per session exactly where VBench reads them. Nothing is mocked but the network's weights, so
the numbers asserted are VBench's arithmetic on real forward passes.

Two stand-ins are not weights of a network VBench ships: the ``facebookresearch/dino`` repository
VBench loads DINO from (through ``torch.hub``) cannot be cloned offline, so a minimal ``hubconf.py``
with DINO's entry point, ViT-B/16 parameter names and weight loading is written in its place; and
the CLIP ViT-L/14 file is written as a TorchScript archive holding the real model's tensors, as
OpenAI's file is (openai-clip reads a plain state dict only from such an archive).
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from wanexp.errors import WanexpError
from wanexp.evaluate import vbench as vb
from wanexp.generate import write_mp4

# vbench, pyiqa (both installed --no-deps) and what the vbench extra adds for their scoring code
HAVE_VBENCH = all(importlib.util.find_spec(m) is not None
                  for m in ("vbench", "pyiqa", "clip", "decord", "cv2", "timm", "einops"))
needs_vbench = pytest.mark.skipif(not HAVE_VBENCH, reason=f"vbench or its dependencies are not installed ({vb.INSTALL})")

PROMPTS = {"static": "a red ball lying still on a wooden table", "moving": "a striped flag sliding to the left"}
# the stand-in heads: MUSIQ's regression head and the LAION aesthetic head are a random unit / 2-norm
# direction plus a bias, so VBench's normalisation of their outputs can be checked against bounds
MUSIQ_BIAS, MUSIQ_W_NORM = 50.0, 1.0
AES_BIAS, AES_W_NORM = 5.0, 2.0


# ---------------------------------------------------------------------------------------------
# stand-in weights
# ---------------------------------------------------------------------------------------------
DINO_HUBCONF = '''"""Stand-in for facebookresearch/dino's hubconf.py, written by wanexp's tests (the repository cannot
be cloned offline): DINO's entry point, a ViT-B/16 with DINO's parameter names, and DINO's weight
loading through torch.hub.load_state_dict_from_url; extra keyword arguments are ignored, as DINO's
VisionTransformer does."""
import torch

dependencies = ["torch", "timm"]


def dino_vitb16(pretrained=True, **kwargs):
    import timm
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True)
    if pretrained:
        state_dict = torch.hub.load_state_dict_from_url(
            url="https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
            map_location="cpu")
        model.load_state_dict(state_dict, strict=True)
    return model
'''


def _target(cache: Path, rel: str) -> Path:
    path = cache / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _direction(n: int, norm: float, seed: int) -> torch.Tensor:
    w = torch.randn(1, n, generator=torch.Generator().manual_seed(seed))
    return w * (norm / w.norm())


def write_musiq(cache: Path) -> None:
    from pyiqa.archs.musiq_arch import MUSIQ
    torch.manual_seed(1)
    model = MUSIQ(pretrained=False)  # the SPAQ checkpoint's architecture: one regression output
    with torch.no_grad():
        model.head.weight.copy_(_direction(model.head.in_features, MUSIQ_W_NORM, 2))
        model.head.bias.fill_(MUSIQ_BIAS)
    torch.save(model.state_dict(), _target(cache, "pyiqa_model/musiq_spaq_ckpt-358bb6af.pth"))


def write_clip_l14_and_aesthetic_head(cache: Path) -> None:
    with vb._pkg_resources_shim():
        from clip.model import CLIP
    torch.manual_seed(3)
    model = CLIP(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024, vision_patch_size=14,
                 context_length=77, vocab_size=49408, transformer_width=768, transformer_heads=12,
                 transformer_layers=12)
    tensors = {k: v.half() for k, v in model.state_dict().items()}
    del model
    tensors |= {"input_resolution": torch.tensor(224), "context_length": torch.tensor(77),
                "vocab_size": torch.tensor(49408)}

    class Holder(nn.Module):  # a TorchScript module whose state dict is the model's tensors
        def forward(self) -> int:
            return 0

    root = Holder()
    for key, t in tensors.items():
        *parents, name = key.split(".")
        mod = root
        for p in parents:
            if not hasattr(mod, p):
                mod.add_module(p, Holder())
            mod = getattr(mod, p)
        mod.register_buffer(name, t)
    with warnings.catch_warnings():  # (TorchScript is deprecated, but it is the format of OpenAI's file)
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(root), str(_target(cache, "clip_model/ViT-L-14.pt")))
    head = nn.Linear(768, 1)
    with torch.no_grad():
        head.weight.copy_(_direction(768, AES_W_NORM, 4))
        head.bias.fill_(AES_BIAS)
    torch.save(head.state_dict(), _target(cache, "aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth"))


def write_dino(cache: Path) -> None:
    import timm
    torch.manual_seed(5)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    torch.save(model.state_dict(), _target(cache, "dino_model/dino_vitbase16_pretrain.pth"))
    _target(cache, "dino_model/facebookresearch_dino_main/hubconf.py").write_text(DINO_HUBCONF)


def write_amt_s(cache: Path, zero: bool = False) -> None:
    import vbench
    from omegaconf import OmegaConf
    from vbench.third_party.amt.utils.build_utils import build_from_cfg
    torch.manual_seed(6)
    model = build_from_cfg(OmegaConf.load(Path(vbench.__file__).parent / "third_party/amt/cfgs/AMT-S.yaml").network)
    state = {k: torch.zeros_like(v) if zero else v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state}, _target(cache, "amt_model/amt-s.pth"))


def write_viclip(cache: Path) -> None:
    with vb._pkg_resources_shim():
        import clip
    # the tokenizer vocabulary is the real one: openai-clip ships the file VBench fetches
    shutil.copyfile(Path(clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz",
                    _target(cache, "ViCLIP/bpe_simple_vocab_16e6.txt.gz"))
    vb.import_vbench(["overall_consistency"], cache)  # ViCLIP's tokenizer resolves the vocabulary on import
    from vbench.third_party.ViCLIP.viclip import ViCLIP
    g = torch.Generator().manual_seed(7)
    state = {}
    for k, v in ViCLIP(pretrain=None).state_dict().items():  # (ViCLIP leaves some tensors uninitialised)
        if v.ndim == 1 and k.endswith("weight"):
            t = torch.ones(v.shape)              # layer norms
        elif v.ndim == 1 and k.endswith("bias"):
            t = torch.zeros(v.shape)
        else:
            t = torch.randn(v.shape, generator=g) * 0.02
        state[k] = t.half()
    torch.save({"model": state}, _target(cache, "ViCLIP/ViClip-InternVid-10M-FLT.pth"))


@pytest.fixture(scope="session")
def standin_cache(tmp_path_factory) -> Path:
    """A VBench cache directory with stand-in weights for the seed paper's four dimensions (~1.2 GB,
    removed at the end of the session)."""
    if not HAVE_VBENCH:
        pytest.skip(f"vbench or its dependencies are not installed ({vb.INSTALL})")
    cache = tmp_path_factory.mktemp("vbench_cache")
    write_musiq(cache)
    write_clip_l14_and_aesthetic_head(cache)
    write_dino(cache)
    write_amt_s(cache)
    yield cache
    shutil.rmtree(cache, ignore_errors=True)


def _frames(kind: str, side: int = 128, n: int = 3) -> np.ndarray:
    rng = np.random.default_rng(11)
    base = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    if kind == "static":                      # n identical frames
        return np.repeat(base[None], n, axis=0)
    return np.stack([np.roll(base, 9 * k, axis=1) for k in range(n)])  # a pattern sliding right


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("vbench_videos")
    out = {}
    for kind in ("static", "moving"):
        out[kind] = d / f"{kind}.mp4"
        write_mp4(out[kind], _frames(kind), fps=16)
    return out


@pytest.fixture(scope="module")
def paper_scores(standin_cache, videos, tmp_path_factory):
    work = tmp_path_factory.mktemp("vbench_work")
    start = time.perf_counter()
    scores = vb.score_videos(videos, PROMPTS, vb.PAPER_DIMENSIONS, standin_cache, "cpu", work)
    return scores, work, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# scoring on stand-in weights
# ---------------------------------------------------------------------------------------------
@needs_vbench
@pytest.mark.slow
def test_paper_dimensions_run_on_standin_weights(paper_scores, videos):
    scores, work, seconds = paper_scores
    print(f"VBench, four dimensions, 2 videos of 3 frames, CPU: {seconds:.1f} s")
    assert set(scores) == set(videos)
    for vid, s in scores.items():
        assert set(s) == set(vb.PAPER_DIMENSIONS), vid
        for dim, value in s.items():
            lo, hi = vb.RANGES[dim]
            assert math.isfinite(value) and lo - 1e-6 <= value <= hi + 1e-6, (vid, dim, value)  # (float32 cosines)
        assert vb.average(s, vb.PAPER_DIMENSIONS) == pytest.approx(np.mean([s[d] for d in vb.PAPER_DIMENSIONS]))
    # VBench's own record: its dimension score is the mean of the per-video values (MUSIQ's included,
    # which VBench divides by 100 only in the aggregate and wanexp per video)
    raw = json.loads((work / "eval_results.json").read_text())
    for dim in vb.PAPER_DIMENSIONS:
        assert raw[dim][0] == pytest.approx(np.mean([scores[v][dim] for v in scores]), rel=1e-6), dim
        assert {Path(r["video_path"]).name for r in raw[dim][1]} == {"static.mp4", "moving.mp4"}
    # each video went to VBench with its own prompt
    info = json.loads((work / "full_info.json").read_text())
    assert {Path(e["video_list"][0]).stem: e["prompt_en"] for e in info} == PROMPTS
    # MUSIQ: a score is the head's bias plus a unit direction on a layer-normed 384-d feature, /100
    bound = MUSIQ_W_NORM * math.sqrt(384) / 100
    for s in scores.values():
        assert abs(s["imaging_quality"] - MUSIQ_BIAS / 100) <= bound + 1e-6
    # aesthetic: the head sees L2-normalised CLIP features, VBench divides by 10
    for s in scores.values():
        assert abs(s["aesthetic_quality"] - AES_BIAS / 10) <= AES_W_NORM / 10 + 1e-6
    # the networks see the content: the two videos score differently
    for dim in ("imaging_quality", "aesthetic_quality", "subject_consistency"):
        assert scores["static"][dim] != scores["moving"][dim], dim
    # DINO: identical frames have identical features, so cosine 1 to the first and previous frame
    assert scores["static"]["subject_consistency"] == pytest.approx(1.0, abs=1e-6)
    assert scores["moving"]["subject_consistency"] < scores["static"]["subject_consistency"]


def _decoded(path: Path) -> list[np.ndarray]:
    import cv2
    cap, frames = cv2.VideoCapture(str(path)), []
    ok, frame = cap.read()
    while ok:
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB).astype(np.float64))
        ok, frame = cap.read()
    return frames


@needs_vbench
def test_motion_smoothness_is_vbench_interpolation_error(videos, tmp_path):
    """With all-zero AMT-S weights the flows are zero, the blend mask 1/2 and the residual 0, so AMT
    predicts each odd frame as the mean of its neighbours; VBench's score must then be
    1 − mean|frame − prediction| / 255 over the odd frames."""
    write_amt_s(tmp_path / "cache", zero=True)
    scores = vb.score_videos(videos, PROMPTS, ["motion_smoothness"], tmp_path / "cache", "cpu", tmp_path / "work")
    for vid, path in videos.items():
        f = _decoded(path)
        err = np.mean([np.abs(f[i] - np.floor((f[i - 1] + f[i + 1]) / 2)).mean() for i in range(1, len(f) - 1, 2)])
        # (AMT rounds its prediction down after float arithmetic: at most one level off)
        assert scores[vid]["motion_smoothness"] == pytest.approx(1 - err / 255, abs=1 / 255), vid
    assert scores["static"]["motion_smoothness"] > 0.99
    assert scores["moving"]["motion_smoothness"] < 0.9


@needs_vbench
@pytest.mark.slow
def test_overall_consistency_runs_on_standin_viclip(standin_cache, videos, tmp_path):
    """The HiFloat4 paper's fifth dimension: ViCLIP video-text cosine (ViT-L over 8 frames; ~30 s a video here)."""
    write_viclip(standin_cache)
    try:
        scores = vb.score_videos({"moving": videos["moving"]}, PROMPTS, ["overall_consistency"], standin_cache, "cpu",
                                 tmp_path)
    finally:  # 0.9 GB that no other test reads
        shutil.rmtree(standin_cache / "ViCLIP")
    value = scores["moving"]["overall_consistency"]
    assert math.isfinite(value) and -1.0 <= value <= 1.0 and value != 0.0
    raw = json.loads((tmp_path / "eval_results.json").read_text())
    assert raw["overall_consistency"][0] == pytest.approx(value)


@needs_vbench
def test_resumable_scoring_skips_scored_videos(standin_cache, videos, tmp_path):
    from wanexp.data import Sample
    samples = {i: Sample(id=i, category=f"cat_{i}", prompt=p, image_path=None) for i, p in PROMPTS.items()}
    vcfg = {"dimensions": ["motion_smoothness"], "cache_dir": str(standin_cache), "chunk_size": 1}
    out = tmp_path / "vbench.jsonl"
    first = vb.score_into(out, videos, samples, vcfg, "cpu", tmp_path / "work")
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["id"] for r in lines] == list(videos)
    assert all(r["vbench_avg"] == r["motion_smoothness"] and r["category"] == f"cat_{r['id']}" for r in lines)
    assert first["motion_smoothness"] == pytest.approx(np.mean([r["motion_smoothness"] for r in lines]))
    assert first["vbench_avg"] == first["motion_smoothness"] and first["num_videos"] == 2
    assert set(first["per_category"]) == {"cat_static", "cat_moving"}
    # a crash lost the second line: only that video is scored again, to the same value
    out.write_text(json.dumps(lines[0]) + "\n")
    again = vb.score_into(out, videos, samples, vcfg, "cpu", tmp_path / "work2")
    info = json.loads((tmp_path / "work2" / "full_info.json").read_text())
    assert [Path(e["video_list"][0]).stem for e in info] == ["moving"]
    assert again["motion_smoothness"] == pytest.approx(first["motion_smoothness"], abs=1e-6)


@needs_vbench
def test_small_frames_are_refused_for_motion_smoothness(standin_cache, tmp_path):
    small = tmp_path / "small.mp4"
    write_mp4(small, _frames("moving", side=64), fps=16)
    with pytest.raises(WanexpError, match=r"motion_smoothness needs frames of at least 113 pixels.*64×64"):
        vb.score_videos({"small": small}, {"small": "x"}, ["motion_smoothness"], standin_cache, "cpu", tmp_path)


# ---------------------------------------------------------------------------------------------
# refusals (no vbench needed)
# ---------------------------------------------------------------------------------------------
def test_missing_weights_name_every_file(tmp_path):
    cache = tmp_path / "vbcache"
    (cache / "amt_model").mkdir(parents=True)
    (cache / "amt_model" / "amt-s.pth").write_bytes(b"present")
    missing = vb.missing_files(vb.HIF4_DIMENSIONS, cache)
    expected = {cache / wf.path for d in vb.HIF4_DIMENSIONS for wf in vb.WEIGHTS[d]} - {cache / "amt_model/amt-s.pth"}
    assert {m.path for m in missing} == expected and len(missing) == 7
    with pytest.raises(WanexpError) as err:
        vb.check_weights(vb.HIF4_DIMENSIONS, cache)
    msg = str(err.value)
    for m in missing:
        assert str(m.path) in msg and m.source in msg
    assert "amt-s.pth" not in msg and "evaluate.vbench.cache_dir" in msg
    assert msg.count("\n") == len(missing) + 1  # a header, one line per file, a hint
    vb.check_weights(["motion_smoothness"], cache)  # all there: no error
    # the DINO repository counts as present only with its hubconf.py
    (cache / "dino_model/facebookresearch_dino_main").mkdir(parents=True)
    assert cache / "dino_model/facebookresearch_dino_main/hubconf.py" in {m.path for m in vb.missing_files(
        ["subject_consistency"], cache)}


@pytest.mark.parametrize("dims, match", [
    (["imaging_quality", "sharpness"], r"'sharpness' is not a VBench dimension; supported: imaging_quality, "
                                       r"aesthetic_quality, subject_consistency, motion_smoothness, overall_consistency"),
    (["color"], r"'color' needs the auxiliary info of VBench's own prompt suite"),
    (["dynamic_degree"], r"'dynamic_degree' is a VBench dimension this integration does not run"),
    ([], r"dimensions is empty"),
    (["motion_smoothness", "motion_smoothness"], r"motion_smoothness more than once"),
])
def test_bad_dimensions_are_refused(dims, match, tmp_path):
    with pytest.raises(WanexpError, match=match):
        vb.validate_dimensions(dims)
    with pytest.raises(WanexpError, match=match):  # before any file or package is looked at
        vb.score_videos({"a": tmp_path / "a.mp4"}, {"a": "x"}, dims, tmp_path / "nowhere", "cpu", tmp_path)


def test_vbench_not_installed_is_one_clear_error(monkeypatch, tmp_path):
    for name in {m for m in sys.modules if m == "vbench" or m.startswith("vbench.")} | {"vbench", "vbench.utils"}:
        monkeypatch.setitem(sys.modules, name, None)  # `import vbench…` now fails as if it were absent
    for wf in vb.WEIGHTS["imaging_quality"]:
        (tmp_path / wf.path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / wf.path).write_bytes(b"")
    with pytest.raises(WanexpError, match=r"needs the vbench package.*pip install --no-deps vbench==0\.1\.5"):
        vb.check_ready(["imaging_quality"], tmp_path)


def test_average_and_summary():
    rows = [{"id": "a", "category": "x", "p": 0.2, "q": 0.6}, {"id": "b", "category": "y", "p": 0.4, "q": 1.0}]
    assert vb.average(rows[0], ["p", "q"]) == pytest.approx(0.4)
    s = vb.summarize(rows, ["p", "q"])
    assert s["p"] == pytest.approx(0.3) and s["q"] == pytest.approx(0.8) and s["vbench_avg"] == pytest.approx(0.55)
    assert s["num_videos"] == 2 and s["per_category"]["y"]["vbench_avg"] == pytest.approx(0.7)


# ---------------------------------------------------------------------------------------------
# end to end through the CLI
# ---------------------------------------------------------------------------------------------
@needs_vbench
@pytest.mark.slow
def test_cli_missing_weights_then_scores_after_they_arrive(cli, standin_cache, tmp_path):
    """evaluate=vbench without the weights stops after fidelity with one error naming each missing
    file; once the files are there, the same command resumes and scores (the tiny model's 64×64
    videos are too small for AMT-S, so motion smoothness is left out here)."""
    cache, run_dir = tmp_path / "vbcache", tmp_path / "run"
    args = ("+experiment=smoke", "evaluate=vbench", f"evaluate.vbench.cache_dir={cache}",
            "evaluate.vbench.dimensions=[imaging_quality,subject_consistency]", f"hydra.run.dir={run_dir}")
    proc = cli(*args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    need = ["pyiqa_model/musiq_spaq_ckpt-358bb6af.pth", "dino_model/facebookresearch_dino_main/hubconf.py",
            "dino_model/dino_vitbase16_pretrain.pth"]
    for rel in need:
        assert str(cache / rel) in proc.stderr
    fidelity = run_dir / "eval" / "fidelity.jsonl"
    assert len(fidelity.read_text().splitlines()) == 2 and not (run_dir / "stages" / "evaluate.json").exists()
    before = fidelity.stat().st_mtime_ns

    for rel in ("pyiqa_model/musiq_spaq_ckpt-358bb6af.pth", "dino_model/dino_vitbase16_pretrain.pth",
                "dino_model/facebookresearch_dino_main"):
        _target(cache, rel).symlink_to(standin_cache / rel)
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert fidelity.stat().st_mtime_ns == before  # fidelity was not recomputed
    lines = [json.loads(l) for l in (run_dir / "eval" / "vbench.jsonl").read_text().splitlines()]
    ids = [json.loads(l)["id"] for l in fidelity.read_text().splitlines()]
    assert [r["id"] for r in lines] == ids
    for r in lines:
        assert 0 <= r["imaging_quality"] <= 1 and 0 <= r["subject_consistency"] <= 1
        assert r["vbench_avg"] == pytest.approx((r["imaging_quality"] + r["subject_consistency"]) / 2)
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())["vbench"]
    assert summary["num_videos"] == 2 and summary["vbench_avg"] == pytest.approx(np.mean([r["vbench_avg"] for r in lines]))
    import pandas as pd
    row = pd.read_csv(run_dir / "results.csv").iloc[0]
    assert row["vbench_avg"] == pytest.approx(summary["vbench_avg"])
    assert row["imaging_quality"] == pytest.approx(summary["imaging_quality"])
    per_sample = pd.read_csv(run_dir / "eval" / "per_sample.csv")
    assert {"psnr", "imaging_quality", "subject_consistency", "vbench_avg"} <= set(per_sample.columns)
    # the BF16 twin is scored too, once, beside the shared reference videos: each row has its own delta
    refs = list((tmp_path / "outputs" / "reference_cache").glob("*/vbench-*.jsonl"))
    assert len(refs) == 1 and len(refs[0].read_text().splitlines()) == 2
    assert 0 <= row["vbench_avg_bf16"] <= 1 and row["imaging_quality_bf16"] != row["imaging_quality"]
    assert "VBench avg" in proc.stdout
