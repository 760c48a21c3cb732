"""Run config of `slimtune train`: every shipped file loads, every problem is reported at once and named."""

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from slimtune.config import BottleneckConfig, FullConfig, LoraConfig
from slimtune.train.config import (DataSection, ModelSection, RunConfig, RunConfigError, TrainSection,
                                   default_config_path, describe, load_run_config, run_config_from_dict,
                                   run_config_to_dict, save_run_config)
from slimtune.train.image_rules import IMAGE_FIELDS
from slimtune.train.overrides import apply_overrides, parse_override

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs" / "train").glob("*.yaml"))
METHOD_FILES = {"lora", "dora", "qlora", "bottleneck", "prompt", "freeze", "full"}
FORMAT_FILES = {"alpaca", "chat", "text", "classification"}
IMAGE_FILES = {"diffusion"}  # data.format: images; its model is the UNet the digits recipe writes


def issues_of(d, **kw):
    with pytest.raises(RunConfigError) as err:
        run_config_from_dict(d, **kw)
    return err.value.issues


# -- the shipped configs ---------------------------------------------------------------------------------

def test_configs_cover_every_method_and_format():
    assert {p.stem for p in CONFIGS} == METHOD_FILES | FORMAT_FILES | IMAGE_FILES


@pytest.mark.parametrize("path", CONFIGS + [default_config_path()], ids=lambda p: p.stem)
def test_every_shipped_config_loads_with_its_files(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # data paths in configs/train are relative to the repository root
    name = path.stem
    cfg = load_run_config(path, check_files=name not in IMAGE_FILES)  # tests/diffusion runs it on a tiny UNet
    if name in METHOD_FILES:
        assert cfg.adapter.method == ("lora" if name == "qlora" else name)
        assert cfg.quantize == ("nf4" if name == "qlora" else "none")
        assert cfg.data.train is None and cfg.data.format == "chat"  # the default task, the bundled BBC News
    elif name in FORMAT_FILES:
        assert cfg.data.format == name and Path(cfg.data.train).is_file()
    elif name in IMAGE_FILES:
        assert cfg.data.format == "images" and cfg.adapter.method == "lora"


@pytest.mark.parametrize("path", CONFIGS + [default_config_path()], ids=lambda p: p.stem)
def test_every_field_is_written_and_commented(path):
    """Field by field documentation: each section lists all its fields, each `key: value` line has a comment."""
    d = yaml.safe_load(path.read_text())
    for section, cls in (("model", ModelSection), ("data", DataSection), ("train", TrainSection)):
        fields = {f.name for f in dataclasses.fields(cls)}
        if section == "data":  # the columns a format does not read are left out
            fields -= {"text_field", "label_field", "messages_field"}
        if d["data"].get("format") != "images":  # nor the image fields when it is not images
            fields -= set(IMAGE_FIELDS.get(section, ()))
        assert fields <= set(d[section]), (section, fields - set(d[section]))
    for line in path.read_text().splitlines():
        if re.match(r"^\s*[a-z_]+:\s*\S", line):
            assert "#" in line, f"{path.name}: no comment on {line!r}"


def test_default_run_is_packaged_and_is_the_bbc_chat_task():
    import importlib.resources

    packaged = importlib.resources.files("slimtune.train").joinpath("default.yaml")
    assert packaged.is_file()
    cfg = load_run_config(None)
    assert cfg == load_run_config(default_config_path())
    assert (cfg.model.name, cfg.data.train, cfg.data.format) == ("smollm2-135m", None, "chat")
    assert cfg.adapter == LoraConfig(r=8, alpha=16, dropout=0.05, target_modules="all-linear")


def test_pyproject_ships_the_default_as_package_data():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["slimtune"]
    assert any(Path("train/default.yaml").match(p) for p in patterns)


# -- defaults and normalisation ----------------------------------------------------------------------------

def test_empty_config_is_the_contract_defaults():
    cfg = run_config_from_dict({})
    assert cfg == RunConfig()
    assert cfg.adapter == LoraConfig(r=8, alpha=16, target_modules="all-linear")
    assert cfg.train.max_steps == 100 and cfg.train.epochs is None  # neither given: 100 steps
    assert cfg.data.format == "chat" and cfg.quantize == "none" and cfg.output_dir == "runs/train"


def test_epochs_alone_leaves_max_steps_unset():
    cfg = run_config_from_dict({"train": {"epochs": 2}})
    assert cfg.train.max_steps is None and cfg.train.epochs == 2.0


def test_yaml11_exponent_strings_are_numbers():
    """PyYAML reads `lr: 1e-4` as the string '1e-4'; it must still be the number 1e-4, in train and adapter."""
    d = yaml.safe_load("train: {lr: 1e-4, weight_decay: 1e-2}\nadapter: {method: lora, dropout: 5e-2}\n")
    assert d["train"]["lr"] == "1e-4"  # the trap
    cfg = run_config_from_dict(d)
    assert cfg.train.lr == 1e-4 and cfg.train.weight_decay == 0.01 and cfg.adapter.dropout == 0.05


@pytest.mark.parametrize("warmup, value, steps, want", [
    (0.1, 0.1, 10, 1), (5, 5, 7, 5), (5.0, 5, 7, 5), (0, 0.0, 10, 0), ("0.5", 0.5, 10, 5), ("5e-1", 0.5, 4, 2)])
def test_warmup_fraction_or_step_count(warmup, value, steps, want):
    t = run_config_from_dict({"train": {"warmup": warmup, "max_steps": 100}}).train
    assert t.warmup == value and type(t.warmup) is type(value)  # a step count is an int, a fraction a float
    assert t.warmup_steps(steps) == want


def test_adapter_section_without_targets_gets_all_linear_but_keeps_given_ones():
    assert run_config_from_dict({"adapter": {"r": 4}}).adapter.target_modules == "all-linear"
    cfg = run_config_from_dict({"adapter": {"method": "dora", "target_modules": ["q_proj"]}})
    assert cfg.adapter.target_modules == ("q_proj",) and cfg.adapter.use_dora


def test_sections_are_frozen():
    cfg = run_config_from_dict({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.quantize = "nf4"


def test_direct_construction_is_validated_too():
    with pytest.raises(RunConfigError) as err:
        TrainSection(lr=-1, keep_last=0)
    assert err.value.issues == ("train.lr=-1: must be a positive number",
                                "train.keep_last=0: must be a positive integer")
    with pytest.raises(RunConfigError) as err:
        RunConfig(quantize="nf4", adapter=FullConfig())
    assert err.value.issues[0].startswith("quantize='nf4': cannot be used with adapter.method='full'")


# -- every issue kind, by the library function -------------------------------------------------------------

CASES = [
    ({"trian": {}}, "trian: unknown section; did you mean train?"),
    ({"zzz": 1}, "zzz: unknown section; allowed: model, quantize, adapter, data, train, output_dir"),
    ({"train": {"lrr": 1}}, "train.lrr: unknown field; did you mean train.lr?"),
    ({"data": {"pack": True}}, "data.pack: unknown field; did you mean data.packing?"),
    ({"train": 5}, "train=5: must be a mapping of field names to values"),
    ({"train": {"lr": -1}}, "train.lr=-1: must be a positive number"),
    ({"train": {"lr": "fast"}}, "train.lr='fast': must be a positive number"),
    ({"train": {"batch_size": 2.5}}, "train.batch_size=2.5: must be a positive integer"),
    ({"train": {"grad_accum": 0}}, "train.grad_accum=0: must be a positive integer"),
    ({"train": {"keep_last": 0}}, "train.keep_last=0: must be a positive integer"),
    ({"train": {"max_steps": True}}, "train.max_steps=True: must be a positive integer (or null)"),
    ({"train": {"scheduler": "step"}}, "train.scheduler='step': must be one of cosine, linear, constant"),
    ({"train": {"optimizer": "sgd"}}, "train.optimizer='sgd': must be one of adamw, adamw8bit, offload"),
    ({"train": {"precision": "int8"}}, "train.precision='int8': must be one of fp32, bf16, fp16"),
    ({"train": {"grad_checkpointing": "yes"}}, "train.grad_checkpointing='yes': must be true or false"),
    ({"train": {"warmup": 1.5}},
     "train.warmup=1.5: must be a fraction of the steps in [0, 1) or a whole number of steps >= 1"),
    ({"train": {"warmup": -0.1}},
     "train.warmup=-0.1: must be a fraction of the steps in [0, 1) or a whole number of steps >= 1"),
    ({"train": {"seed": -1}}, "train.seed=-1: must be an integer >= 0"),
    ({"train": {"weight_decay": -0.1}}, "train.weight_decay=-0.1: must be a number >= 0"),
    ({"train": {"max_steps": 10, "epochs": 1}},
     "train.epochs=1.0: cannot be set with train.max_steps=10; set exactly one"),
    ({"train": {"max_steps": 10, "warmup": 10}}, "train.warmup=10: must be fewer steps than train.max_steps=10"),
    ({"data": {"format": "xml"}}, "data.format='xml': must be one of alpaca, chat, text, classification, images"),
    ({"data": {"train": "rows.xml"}}, "data.train='rows.xml': must be a .json, .jsonl, .csv, .parquet or .txt "
                                      "file path (or null)"),
    ({"data": {"eval_fraction": 1.0}}, "data.eval_fraction=1.0: must be a number in [0, 1)"),
    ({"data": {"max_length": 0}}, "data.max_length=0: must be a positive integer"),
    ({"data": {"text_field": ""}}, "data.text_field='': must be a non-empty string"),
    ({"data": {"eval": "e.jsonl", "eval_fraction": 0.1}},
     "data.eval_fraction=0.1: must be 0 when data.eval is set (the eval file is the held-out set)"),
    ({"data": {"train": "t.txt", "format": "chat"}}, "data.train='t.txt': a .txt file holds raw text, so "
                                                     "data.format must be text (got 'chat')"),
    ({"data": {"format": "classification"}}, "data.packing=True: classification rows are not packed"),
    ({"model": {"dtype": "fp8"}}, "model.dtype='fp8': must be one of float32, bfloat16, float16"),
    ({"model": {"name": ""}}, "model.name='': must be a non-empty string"),
    ({"quantize": "int4"}, "quantize='int4': must be one of none, nf4"),
    ({"output_dir": None}, "output_dir=None: must be a non-empty string"),
    ({"adapter": {"r": 0}}, "adapter.r=0: must be a positive integer"),
    ({"adapter": {"method": "bottleneck", "size": -1}}, "adapter.size=-1: must be a positive integer"),
    ({"adapter": {"rank": 4}}, "adapter.rank: unknown field; did you mean adapter.r?"),
    ({"adapter": {"method": "lora2"}},
     "adapter.method='lora2': must be one of lora, dora, bottleneck, prompt, freeze, full"),
    ({"adapter": {"method": "qlora"}}, "adapter.method='qlora': QLoRA is LoRA on a 4-bit base; write "
                                       "adapter.method: lora and quantize: nf4"),
    ({"adapter": [1]}, "adapter=[1]: must be a mapping with a method"),
    ({"adapter": {"method": "dora", "use_dora": False}}, "adapter.use_dora=False: must be true for method dora"),
    ({"quantize": "nf4", "adapter": {"method": "full"}}, "quantize='nf4': cannot be used with adapter.method='full'"),
    ({"quantize": "nf4", "adapter": {"method": "freeze"}},
     "quantize='nf4': cannot be used with adapter.method='freeze'"),
    ({"adapter": {"method": "prompt"}}, "data.packing=True: prompt tuning prepends its virtual tokens"),
    ({"adapter": {"method": "bottleneck"}, "train": {"loraplus_ratio": 16}},
     "train.loraplus_ratio=16.0: LoRA+ needs adapter.method lora or dora (got 'bottleneck')"),
]


@pytest.mark.parametrize("d, line", CASES, ids=[c[1][:40] for c in CASES])
def test_each_problem_is_one_issue_naming_field_value_and_allowed(d, line):
    issues = issues_of(d)
    assert len(issues) == 1, issues
    assert issues[0].startswith(line), issues


def test_every_problem_is_reported_at_once():
    d = {"trian": {}, "train": {"lr": 0, "scheduler": "step"}, "data": {"format": "xml"},
         "adapter": {"r": 0, "dropout": 2.0, "alpah": 1}, "quantize": "nf4"}
    issues = issues_of(d)
    assert issues == ("trian: unknown section; did you mean train?",
                      "adapter.alpah: unknown field; did you mean adapter.alpha?",
                      "adapter.r=0: must be a positive integer",
                      "adapter.dropout=2.0: must be a number in [0, 1)",
                      "data.format='xml': must be one of alpaca, chat, text, classification, images",
                      "train.lr=0: must be a positive number",
                      "train.scheduler='step': must be one of cosine, linear, constant")
    assert str(RunConfigError(issues)).splitlines() == list(issues)


def test_adapter_problems_are_collected_past_the_first():
    """slimtune.config stops at its first error; the run config reports each independent bad field."""
    issues = issues_of({"adapter": {"method": "bottleneck", "size": -1, "nonlinearity": "x", "scale": 0}})
    assert issues == ("adapter.size=-1: must be a positive integer",
                      "adapter.nonlinearity='x': must be one of relu, gelu, silu, tanh",
                      "adapter.scale=0: must be a positive number")
    issues = issues_of({"adapter": {"method": "prompt", "init": "text"}, "data": {"packing": False}})
    assert issues == ("adapter.init_text=None: must be a non-empty string when init='text'",)


def test_sections_of_the_wrong_type_are_named():
    with pytest.raises(RunConfigError) as err:
        RunConfig(model={"name": "x"}, adapter={"r": 8}, output_dir="")
    assert err.value.issues == (
        "model={'name': 'x'}: must be a ModelSection",
        "adapter={'r': 8}: must be a method config (slimtune.LoraConfig, BottleneckConfig, ...)",
        "output_dir='': must be a non-empty string")


def test_four_errors_give_four_issues():
    issues = issues_of({"train": {"lr": -1, "batch_size": 0}, "data": {"max_length": 0}, "quantize": "x"})
    assert len(issues) == 4


def test_check_files_names_missing_data_and_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()  # a folder without config.json is not a model
    issues = issues_of({"model": {"name": "model"}, "data": {"train": "rows.jsonl", "general": "g.txt"}},
                       check_files=True)
    assert issues[0].startswith("model.name='model': must be the bundled smollm2-135m, a folder holding")
    assert issues[1:] == (f"data.train='rows.jsonl': no such file (relative to {tmp_path})",
                          f"data.general='g.txt': no such file (relative to {tmp_path})")
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "rows.jsonl").write_text("")
    (tmp_path / "g.txt").write_text("")
    (tmp_path / "m.gguf").write_text("")
    run_config_from_dict({"model": {"name": "model"}, "data": {"train": "rows.jsonl", "general": "g.txt"}},
                         check_files=True)
    run_config_from_dict({"model": {"name": "m.gguf"}}, check_files=True)
    run_config_from_dict({"data": {"train": "absent.jsonl"}})  # no disk checks unless asked


# -- files: load, save, round trip ----------------------------------------------------------------------------

def test_round_trip_through_dict_and_yaml(tmp_path):
    d = {"model": {"dtype": "bfloat16"}, "quantize": "nf4",
         "adapter": {"method": "dora", "r": 4, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v": 8}},
         "data": {"train": "x.jsonl", "format": "alpaca", "eval_fraction": 0.1},
         "train": {"epochs": 1.5, "warmup": 10, "loraplus_ratio": 16, "save_every": 5}, "output_dir": "out"}
    cfg = run_config_from_dict(d)
    assert run_config_from_dict(run_config_to_dict(cfg)) == cfg
    save_run_config(cfg, tmp_path / "config.yaml")
    assert load_run_config(tmp_path / "config.yaml") == cfg
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temp file left


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    path.write_text("old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(yaml, "safe_dump", boom)
    with pytest.raises(OSError, match="disk full"):
        save_run_config(RunConfig(), path)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


@pytest.mark.parametrize("text, problem", [
    (None, "no such config file"),
    ("train: {lr: [1\n", "not valid YAML: line 2, column 1"),
    ("- 1\n- 2\n", "must be a mapping of sections (model, quantize, adapter, data, train, output_dir), not a list"),
])
def test_bad_files_are_named(tmp_path, text, problem):
    path = tmp_path / "run.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(RunConfigError) as err:
        load_run_config(path)
    assert err.value.source == str(path)
    assert str(err.value).startswith(f"{path}: {problem}")


def test_non_utf8_file_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"output_dir: caf\xe9\n")
    with pytest.raises(RunConfigError, match="cannot be read as UTF-8"):
        load_run_config(path)


def test_empty_file_is_the_defaults(tmp_path):
    (tmp_path / "run.yaml").write_text("# nothing\n")
    assert load_run_config(tmp_path / "run.yaml") == RunConfig()


# -- overrides ----------------------------------------------------------------------------------------------

def test_overrides_of_each_kind(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train: {lr: 2.0e-4}\n")
    cfg = load_run_config(path, ["train.lr=1e-4", "adapter.target_modules=[q_proj,v_proj]", "data.packing=false",
                                 "model.name=path/to/folder", "adapter.rank_pattern.q_proj=16", "quantize=nf4",
                                 "train.eval_every=", "output_dir=runs/x"])
    assert cfg.train.lr == 1e-4 and cfg.adapter.target_modules == ("q_proj", "v_proj")
    assert cfg.data.packing is False and cfg.model.name == "path/to/folder"
    assert cfg.adapter.rank_pattern == {"q_proj": 16} and cfg.quantize == "nf4"
    assert cfg.train.eval_every is None and cfg.output_dir == "runs/x"


def test_override_applies_in_order_and_leaves_the_input_untouched():
    d = {"train": {"lr": 1.0}, "adapter": {"method": "lora", "rank_pattern": {"a": 1}}}
    before = copy.deepcopy(d)
    out = apply_overrides(d, ["train.lr=2", "train.lr=3", "adapter.rank_pattern.b=2"])
    assert out["train"]["lr"] == 3 and out["adapter"]["rank_pattern"] == {"a": 1, "b": 2}
    assert d == before


def test_adapter_override_keys_follow_the_overridden_method():
    out = apply_overrides({"adapter": {"method": "lora"}}, ["adapter.size=32", "adapter.method=bottleneck"])
    cfg = run_config_from_dict(out)
    assert isinstance(cfg.adapter, BottleneckConfig) and cfg.adapter.size == 32


@pytest.mark.parametrize("override, issue", [
    ("trainlr", "override 'trainlr': must look like key.path=value"),
    ("=5", "override '=5': must look like key.path=value"),
    ("train..lr=1", "override 'train..lr=1': must look like key.path=value"),
    ("train.lr=[1", "override 'train.lr=[1': the value is not valid YAML: "),
    ("train.lrr=1", "train.lrr: unknown field; did you mean train.lr?"),
    ("trian.lr=1", "trian: unknown section; did you mean train?"),
    ("adapter.size=32", "adapter.size: unknown field; allowed: method, r, alpha"),
    ("quantize.kind=nf4", "quantize.kind: quantize is a single value, not a section (write quantize=VALUE)"),
])
def test_bad_override_is_an_issue_naming_it(override, issue):
    with pytest.raises(RunConfigError) as err:
        apply_overrides({}, [override])
    assert len(err.value.issues) == 1 and err.value.issues[0].startswith(issue), err.value.issues


def test_override_through_a_scalar_is_named():
    with pytest.raises(RunConfigError, match=r"adapter.rank_pattern.q: adapter.rank_pattern=5 is not a mapping"):
        apply_overrides({"adapter": {"rank_pattern": 5}}, ["adapter.rank_pattern.q=1"])


def test_parse_override_uses_yaml_safe_load():
    assert parse_override("adapter.target_modules=[q_proj, v_proj]") == (("adapter", "target_modules"),
                                                                         ["q_proj", "v_proj"])
    assert parse_override("data.packing=false") == (("data", "packing"), False)


def test_override_cannot_build_python_objects():
    with pytest.raises(RunConfigError, match="not valid YAML"):
        parse_override("output_dir=!!python/object/apply:os.system [echo]")


def test_override_and_file_problems_are_reported_together(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train: {lr: -1}\n")
    with pytest.raises(RunConfigError) as err:
        load_run_config(path, ["trainlr", "data.format=xml"])
    assert err.value.issues == ("override 'trainlr': must look like key.path=value (e.g. train.lr=1e-4)",
                                "data.format='xml': must be one of alpaca, chat, text, classification, images",
                                "train.lr=-1: must be a positive number")


def test_describe_names_model_method_data_steps_and_effective_batch():
    cfg = load_run_config(None, ["train.grad_accum=4", "train.batch_size=2"])
    text = describe(cfg)
    for needle in ("smollm2-135m", "lora r=8 alpha=16 on all-linear", "the bundled BBC News set", "chat format",
                   "30 steps", "effective batch 8 (batch_size 2 x grad_accum 4)", "runs/train"):
        assert needle in text, (needle, text)
    assert "1.5 epochs" in describe(run_config_from_dict({"train": {"epochs": 1.5}}))
