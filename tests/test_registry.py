"""The method registry (wanexp.quant.recipes) against conf/quant, and README "Adding a method" run as written."""

import re
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from torch import nn

from wanexp.errors import WanexpError
from wanexp.quant import recipes
from wanexp.quant.methods import LayerStats, MethodConfig, effective_weight
from wanexp.run import validate
from wanexp.stages.quantize import method_for

ROOT = Path(__file__).resolve().parents[1]


def _compose(conf_dir: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            return compose("config", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def _method_name(option: str) -> str:
    """A conf/quant option's ``name``: its own, else the one it inherits through its defaults list."""
    cfg = OmegaConf.load(ROOT / "conf" / "quant" / f"{option}.yaml")
    if cfg.get("name"):
        return str(cfg.name)
    return _method_name(next(d for d in cfg.defaults if d != "_self_"))


def test_every_conf_quant_method_is_registered_and_every_registered_one_has_a_yaml():
    names = {_method_name(p.stem) for p in (ROOT / "conf" / "quant").glob("*.yaml")}
    assert names == set(recipes.method_names())
    for name in recipes.method_names():
        assert (ROOT / "conf" / "quant" / f"{name}.yaml").is_file(), name
    assert recipes.method_names()[:3] == ("bf16", "w4a16", "rtn")  # the tables' order: Table I's ladder first
    assert recipes.table_rank("viditq") == len(recipes.method_names()) - 1
    assert recipes.table_rank("unregistered") == len(recipes.method_names())
    with pytest.raises(WanexpError, match="quant=nope is not implemented; available: bf16, w4a16, rtn, "):
        recipes.check_method("nope")


def _readme_example() -> tuple[str, str]:
    section = (ROOT / "README.md").read_text().split("### Adding a method", 1)[1].split("\n### ", 1)[0]
    yaml_block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    registry_line = re.search(r"```python\n(.*?)```", section, re.S).group(1).strip()
    return yaml_block, registry_line


def test_the_readme_example_adds_a_method_with_one_yaml_file_and_one_registry_line(tmp_path, monkeypatch):
    yaml_block, registry_line = _readme_example()
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    target = yaml_block.splitlines()[0].removeprefix("# ").strip()
    assert target == "conf/quant/gptq.yaml" and not (ROOT / target).exists()
    (tmp_path / target).write_text(yaml_block)
    cfg = _compose(conf, ["quant=gptq", "logger=none"])
    with pytest.raises(WanexpError, match="quant=gptq is not implemented"):
        validate(cfg)  # the yaml alone is not enough: the registry names every method

    monkeypatch.setattr(recipes, "REGISTRY", dict(recipes.REGISTRY))
    exec(registry_line, vars(recipes))  # the README's one line, in the registry module
    validate(cfg)
    assert recipes.method_names()[-1] == "gptq"
    assert MethodConfig.needs(cfg.quant) == ["hessian"]  # calibration records what the steps need

    method = method_for(cfg, num_bins=1)
    assert (method.residual, method.smoothing, method.rank, method.act_format is not None) == ("gptq", None, 0, True)
    g = torch.Generator().manual_seed(0)
    mix = torch.eye(64) + 0.5 * torch.randn(64, 64, generator=g) / 8
    x = torch.randn(512, 64, generator=g) @ mix  # correlated inputs: where GPTQ beats rounding each weight alone
    lin = nn.Linear(64, 32)
    method.compute_dtype = torch.float32
    method.stats = {"l": LayerStats(hessian=x.T @ x)}
    rtn = method_for(_compose(conf, ["quant=rtn", "logger=none"]), num_bins=1)
    rtn.compute_dtype = torch.float32
    w = lin.weight.detach()

    def output_error(m):
        return float(((x @ (effective_weight(m.build("l", lin)) - w).T) ** 2).sum())
    assert output_error(method) < 0.9 * output_error(rtn)
