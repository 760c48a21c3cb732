import dataclasses

import pytest

from slimtune import ConfigError, LoraConfig, config_from_dict


@pytest.mark.parametrize("field, value, message", [
    ("r", 0, "lora.r=0: must be a positive integer"),
    ("r", 2.5, "lora.r=2.5: must be a positive integer"),
    ("alpha", -1, "lora.alpha=-1: must be a positive number"),
    ("dropout", 1.0, "lora.dropout=1.0: must be a number in [0, 1)"),
    ("init", "xavier", "lora.init='xavier': must be one of kaiming, gaussian"),
    ("bias", "some", "lora.bias='some': must be one of none, all, lora_only"),
    ("target_modules", "q_proj(", "is not a valid regular expression"),
    ("target_modules", (), "must name at least one module"),
    ("target_types", ("Dense",), "lora.target_types='Dense': must be one of"),
    ("layers_to_transform", (-1,), "must be a list of block indices >= 0"),
    ("rank_pattern", {"q_proj": 0}, "lora.rank_pattern['q_proj']=0: must be a positive int"),
])
def test_bad_values_name_field_value_and_allowed(field, value, message):
    with pytest.raises(ConfigError) as err:
        LoraConfig(**{field: value})
    assert message in str(err.value)


def test_config_is_frozen_and_lists_become_tuples():
    cfg = LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["score"])
    assert cfg.target_modules == ("q_proj", "v_proj") and cfg.modules_to_save == ("score",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.r = 4
    assert hash(cfg.target_modules)


def test_round_trip_through_dict():
    cfg = LoraConfig(r=4, alpha=8, target_modules="all-linear", rank_pattern={"down_proj": 16}, use_rslora=True)
    assert config_from_dict(cfg.to_dict()) == cfg


def test_unknown_field_and_method_are_named():
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['rank'\]"):
        config_from_dict({"method": "lora", "rank": 8})
    with pytest.raises(ConfigError, match="method='lora2': must be one of lora"):
        config_from_dict({"method": "lora2"})


def test_rank_and_alpha_patterns_match_name_ends():
    cfg = LoraConfig(r=8, alpha=16, rank_pattern={"down_proj": 32, r"layers\.0\.self_attn\.q_proj": 4},
                     alpha_pattern={"down_proj": 64})
    assert cfg.rank_for("model.layers.3.mlp.down_proj") == 32
    assert cfg.alpha_for("model.layers.3.mlp.down_proj") == 64
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 4
    assert cfg.rank_for("model.layers.10.self_attn.q_proj") == 8
    assert cfg.rank_for("model.layers.3.mlp.xdown_proj") == 8


# -- the method family: one schema, YAML in and out ---------------------------------------------

from slimtune.config import (BottleneckConfig, FreezeConfig, FullConfig, PromptTuningConfig,  # noqa: E402
                             load_config, save_config)


@pytest.mark.parametrize("cfg", [LoraConfig(r=4, use_dora=True, target_modules="all-linear"),
                                 LoraConfig(init="pissa"), BottleneckConfig(size=16, positions=("mlp",)),
                                 PromptTuningConfig(num_virtual_tokens=8, init="text", init_text="Hi"),
                                 FreezeConfig(last_n_blocks=2, modules=("lm_head",)), FullConfig()])
def test_every_method_round_trips_through_yaml(cfg, tmp_path):
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert config_from_dict(cfg.to_dict()) == cfg


def test_methods_are_one_field_apart_and_errors_name_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("method: dora  # LoRA plus a trained magnitude per row\nr: 16\n")
    cfg = load_config(tmp_path / "a.yaml")
    assert isinstance(cfg, LoraConfig) and cfg.use_dora and cfg.r == 16
    (tmp_path / "b.yaml").write_text("method: bottleneck\nsize: 0\n")
    with pytest.raises(ConfigError, match=r"b.yaml: bottleneck.size=0: must be a positive integer"):
        load_config(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("!!python/object/apply:os.system ['echo unsafe']\n")
    with pytest.raises(ConfigError, match="c.yaml: not valid YAML: line 1, column 1: could not determine a "
                                          "constructor"):  # safe_load only
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="method='adapterz': must be one of lora, dora, bottleneck"):
        config_from_dict({"method": "adapterz"})


@pytest.mark.parametrize("build, message", [
    (lambda: PromptTuningConfig(num_virtual_tokens=0), "prompt.num_virtual_tokens=0: must be a positive integer"),
    (lambda: PromptTuningConfig(init="vocab"), "prompt.init='vocab': must be one of random, text"),
    (lambda: FreezeConfig(last_n_blocks=-1), "freeze.last_n_blocks=-1: must be an integer >= 0"),
    (lambda: FullConfig(freeze_embeddings="yes"), "full.freeze_embeddings='yes': must be true or false"),
    (lambda: BottleneckConfig(nonlinearity="swish"), "bottleneck.nonlinearity='swish': must be one of relu"),
    (lambda: LoraConfig(use_dora=1), "lora.use_dora=1: must be true or false"),
])
def test_new_configs_name_field_value_and_allowed(build, message):
    with pytest.raises(ConfigError) as err:
        build()
    assert message in str(err.value)


# -- one vocabulary: the same method names in configs, the estimator, reports and files ---------------

def test_config_methods_are_the_estimators_names():
    from slimtune.config import CONFIG_TYPES
    from slimtune.memory.spec import METHODS as ESTIMATOR_METHODS
    from slimtune.vocab import METHODS

    assert set(CONFIG_TYPES) == set(METHODS) - {"qlora"}  # qlora: a config method on a 4-bit base
    assert ESTIMATOR_METHODS == METHODS == ("full", "freeze", "lora", "qlora", "dora", "bottleneck", "prompt")


@pytest.mark.parametrize("alias, cls, canonical", [
    ("adapter", BottleneckConfig, "bottleneck"), ("prompt-tuning", PromptTuningConfig, "prompt"),
    ("prompt_tuning", PromptTuningConfig, "prompt"), ("DoRA", LoraConfig, "dora"), (" Full ", FullConfig, "full"),
])
def test_old_spellings_are_aliases_that_read_back_canonical(alias, cls, canonical):
    cfg = config_from_dict({"method": alias})
    assert type(cfg) is cls and cfg.method == canonical and cfg.to_dict()["method"] == canonical


def test_dora_calls_itself_dora_in_config_errors_and_dicts():
    cfg = LoraConfig(use_dora=True)
    assert cfg.method == "dora" and cfg.to_dict()["method"] == "dora" and LoraConfig().method == "lora"
    with pytest.raises(ConfigError, match=r"^dora\.r=0: must be a positive integer"):
        config_from_dict({"method": "dora", "r": 0})


def test_qlora_in_a_config_says_how_to_get_it():
    with pytest.raises(ConfigError, match=r"method='qlora': QLoRA is lora .* on a 4-bit base; write method: lora"):
        config_from_dict({"method": "qlora"})


@pytest.mark.parametrize("data, message", [
    ({"method": ["lora"]}, "method=['lora']: must be one of lora, dora, bottleneck, prompt, freeze, full"),
    ({"method": "lora", "rank_pattern": 5}, "lora.rank_pattern=5: must be a mapping"),
    ({"method": "lora", "alpha_pattern": ["q"]}, "lora.alpha_pattern=['q']: must be a mapping"),
    ({"method": "lora", 1: 2, "x": 3}, "unknown field(s) [1, 'x']"),
])
def test_yaml_shaped_bad_values_are_config_errors(data, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert message in str(err.value)


@pytest.mark.parametrize("text, message", [
    ("method: lora\nr: [8\n", "bad.yaml: not valid YAML: line 3, column 1: expected ',' or ']'"),
    ("method: lora\n  r: 8\n", "bad.yaml: not valid YAML: line 2, column 4: mapping values are not allowed here"),
])
def test_yaml_syntax_errors_are_config_errors_with_line_and_column(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "bad.yaml")
    assert message in str(err.value) and "\n" not in str(err.value)
