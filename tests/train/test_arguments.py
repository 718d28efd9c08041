"""`deelm train`'s flags come from TrainingArguments: every field has one, with its default."""
import argparse
from dataclasses import fields

import pytest

from deelm.adapters.lora import MODULES, LoraConfig
from deelm.train import TrainingArguments
from deelm.train.arguments import add_cli_flags, from_cli

MODEL_SETTINGS = {"bidirectional_from": 5, "threads": 2}  # the CLI's model flags give these


def parse(*argv):
    p = argparse.ArgumentParser()
    add_cli_flags(p)
    return from_cli(p.parse_args(list(argv)), **MODEL_SETTINGS)


def test_no_flags_give_the_dataclass_defaults():
    assert parse() == TrainingArguments(**MODEL_SETTINGS)
    assert parse().lora == LoraConfig(r=8, alpha=16, dropout=0.05, target_modules=MODULES)


@pytest.mark.parametrize("f", [f for f in fields(TrainingArguments)
                               if f.metadata.get("flag", "") is not None],
                         ids=lambda f: f.name)
def test_every_field_has_a_flag_that_sets_it(f):
    base = TrainingArguments(**MODEL_SETTINGS)
    if f.name == "lora":
        got = parse("--lora-r", "4", "--lora-alpha", "3", "--lora-dropout", "0.2",
                    "--lora-modules", "q_proj", "v_proj").lora
        assert got == LoraConfig(r=4, alpha=3.0, dropout=0.2, target_modules=("q_proj", "v_proj"))
        return
    if "keys" in f.metadata:
        for key, (flag, _) in f.metadata["keys"].items():
            got = getattr(parse(flag, "0.25"), f.name)
            assert got[key] == 0.25
            assert {k: v for k, v in got.items() if k != key} == \
                {k: getattr(base, f.name).get(k, 0.0) for k in got if k != key}
        return
    flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
    value = {"adapter_dtype": "float16"}.get(f.name)
    if value is None:
        value = 7 if "int" in str(f.type) else 0.375
    got = parse(flag, str(value))
    assert getattr(got, f.name) == value
    assert got == TrainingArguments(**{**MODEL_SETTINGS, f.name: value})


def test_model_settings_have_no_training_flag():
    p = argparse.ArgumentParser()
    add_cli_flags(p)
    flags = {s for a in p._actions for s in a.option_strings}
    assert "--threads" not in flags and "--bidirectional-from" not in flags
    assert "--lr" in flags and "--micro-batch-size" in flags


def test_unknown_lora_module_is_an_argument_error(capsys):
    with pytest.raises(SystemExit):
        parse("--lora-modules", "q_proj", "not_a_module")
    assert "not_a_module" in capsys.readouterr().err
