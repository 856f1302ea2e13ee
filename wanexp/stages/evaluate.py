"""The evaluate stage: fidelity of every video of the method to its BF16 twin, and with
``evaluate=vbench`` VBench's dimensions of both; per-video lines resume after a crash."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from wanexp.errors import WanexpError
from wanexp.evaluate.fidelity import score_pair, summarize
from wanexp.evaluate.vbench import score_into, weights_key
from wanexp.generate import done_records
from wanexp.io import append_jsonl, read_json, read_jsonl, write_json
from wanexp.stages.state import Run


def twin_vbench_file(ref_dir: Path, vcfg: dict) -> Path:
    """The BF16 twin's per-video VBench scores, kept beside the shared reference videos (one file per
    set of VBench weights)."""
    return Path(ref_dir) / f"vbench-{weights_key(vcfg['cache_dir'])}.jsonl"


def evaluate(state: Run) -> dict:
    """Fidelity of every video of this method to its BF16 twin; per-video lines resume after a crash."""
    gen_file = state.dir.generated
    if not gen_file.is_file():
        raise WanexpError(f"{state.run_dir} has no generated videos yet (run stage=generate first)")
    gen = read_json(gen_file)
    ref_dir, quant_dir = state.recorded(gen, "reference_dir"), state.recorded(gen, "quant_dir")
    refs, quants = done_records(ref_dir), done_records(quant_dir)
    wanted = [s.id for s in state.splits.eval]
    missing = [i for i in wanted if i not in refs or i not in quants]
    if missing:
        raise WanexpError(f"videos missing for {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}; "
                          "re-run stage=generate to fill the gaps")
    out = state.dir.fidelity
    scored = {r["id"]: r for r in read_jsonl(out)}
    for sid in state.progress([i for i in wanted if i not in scored], "fidelity"):
        row = score_pair(ref_dir, refs[sid], quant_dir, quants[sid])
        append_jsonl(out, row)
        scored[sid] = row
    summary = {"fidelity": summarize(scored[i] for i in wanted)}
    write_json(state.dir.eval_summary, summary)  # kept if VBench below refuses
    if "vbench" in state.cfg.evaluate.get("metrics", ()):
        vcfg = OmegaConf.to_container(state.cfg.evaluate.vbench, resolve=True)
        samples = {s.id: s for s in state.splits.eval}
        device = vcfg.get("device") or state.device
        summary["vbench"] = score_into(state.dir.vbench, {i: quant_dir / quants[i]["video"] for i in wanted},
                                       samples, vcfg, device, state.dir.vbench_work(),
                                       lambda it: state.progress(it, "vbench"))
        write_json(state.dir.eval_summary, summary)
        # The BF16 twin's scores, kept beside the shared reference videos (scored once per sweep), so
        # every run's row carries its own VBench deltas.
        summary["vbench_bf16"] = summary["vbench"] if quant_dir == ref_dir else score_into(
            twin_vbench_file(ref_dir, vcfg), {i: ref_dir / refs[i]["video"] for i in wanted},
            samples, vcfg, device, state.dir.vbench_work("bf16"), lambda it: state.progress(it, "vbench bf16"))
        write_json(state.dir.eval_summary, summary)
    return summary
