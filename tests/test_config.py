"""The typed config groups (cqil/config.py): every file of every group builds its dataclass, a key a dataclass lacks is
refused, and the objects hold exactly what the files say (what the jobs read and finetune fingerprints is unchanged)."""
from __future__ import annotations

import dataclasses
import typing

import pytest
from omegaconf import OmegaConf

from cqil import CqilError, checks, cli, config, finetune, paths, planning

GROUPS = {"model": config.model_config, "data": config.data_config, "plan": config.plan_config}


def raw(group: str, name: str) -> dict:
    """conf/<group>/<name>.yaml as written (interpolations and ??? unresolved: they resolve in a job's config)."""
    return OmegaConf.to_container(OmegaConf.load(paths.conf_dir() / group / f"{name}.yaml"), resolve=False)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (paths.conf_dir() / group).glob("*.yaml"))


@pytest.mark.parametrize("group,name", [(g, n) for g in GROUPS for n in options(g)])
def test_every_group_file_builds_its_dataclass_with_every_key(group, name):
    values = raw(group, name)
    built = GROUPS[group](values)
    assert {k: v for k, v in dataclasses.asdict(built).items() if k in values} == values
    with pytest.raises(CqilError, match=rf"^{group}\.blok_size is not a setting .*check its spelling"):
        GROUPS[group]({**values, "blok_size": 3})


@pytest.mark.parametrize("name", options("recipe"))
def test_every_recipe_builds_and_reads_back_as_its_file(name):
    node = config.recipe_node(name)
    recipe = config.recipe_config(node)
    assert recipe.recipe_name == name
    # what cqil.distill and finetune's run fingerprint read: the file itself, no key added (unset loss keys absent)
    assert recipe.as_dict() == OmegaConf.to_container(node, resolve=True) == planning.load_recipe(name)
    spelt = OmegaConf.to_container(node)
    spelt["loss"]["kl_wieght"] = 0.5
    with pytest.raises(CqilError, match=r"^recipe\.loss\.kl_wieght is not a setting"):
        config.recipe_config(spelt)


def test_job_configs_build_every_group_they_compose():
    cfg = cli.compose("finetune", ["model=hf", "model.path=some/where", "plan=auto"])
    assert config.model_config(cfg.model).name == "where"  # interpolations resolve when built
    assert config.plan_config(cfg.plan).probe.recipe == "kl"
    assert config.data_config(cfg.ood_data, "ood_data").name == "english_ood"
    # finetune's train section holds its own keys beside the recipe's: named, so a stray key still fails
    recipe = config.recipe_config(cfg, own=finetune.OWN_TRAIN).as_dict()
    assert recipe == planning.load_recipe("kl")
    # the run fingerprint's lora and loss: the composed sections as they are (a resumed run matches its old one)
    assert {k: recipe[k] for k in ("lora", "loss")} == {k: OmegaConf.to_container(cfg[k]) for k in ("lora", "loss")}
    with pytest.raises(CqilError, match=r"^recipe\.train\.save_steps is not a setting"):
        config.recipe_config(cfg)


def test_plan_config_gives_the_plan_of_its_file():
    manual = config.plan_config(raw("plan", "manual"))
    assert manual.given(30).groups == tuple((i, i + 1) for i in range(12, 24, 2))
    assert config.plan_config(raw("plan", "none")).given(30).groups == ()


def test_a_misspelt_group_key_is_still_one_line_and_exit_2(capsys):
    for args in (["data.blok_size=3"], ["+data.blok_size=3"], ["plan.probe.overides=[]", "plan=auto"],
                 ["plan=auto", "plan.probe.overrides=['train.lrr=1']"]):
        with pytest.raises(SystemExit) as e:
            cli.main(["convert", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("cqil convert: error: "), (args, err)


def fields_of(cls: type, prefix: str) -> set[str]:
    """The dotted keys of a group's dataclass, nested sections spelled out (plan.probe.steps)."""
    out = set()
    for name, hint in typing.get_type_hints(cls).items():
        inner = config.nested(hint)
        out |= fields_of(inner, f"{prefix}{name}.") if inner else {f"{prefix}{name}"}
    return out


def test_every_field_has_its_check_and_every_check_its_field():
    """One schema per group: the dataclass the jobs read and the checks cqil.checks runs name the same keys."""
    assert fields_of(config.ModelConfig, "model.") == set(checks.MODEL)
    assert fields_of(config.DataConfig, "data.") == set(checks.data_checks(()))
    assert fields_of(config.PlanConfig, "plan.") == set(checks.PLAN)
    assert fields_of(config.RecipeConfig, "") == set(checks.RECIPE)
