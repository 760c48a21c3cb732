"""The UNet memory estimate (slimtune.memory.unet*): parameter counts against diffusers' own models, LoRA
counts against slimtune.inject and PEFT's published SD 1.5 figure, activations against a measured step."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import typer
from typer.testing import CliRunner

import slimtune
from slimtune.memory.commands import register
from slimtune.memory.spec import Method, Precision
from slimtune.memory.unet import UNET_ATTENTION, UNetWorkload, unet_from_config, unet_layers, unet_lora_params, unet_params
from slimtune.memory.unet_estimate import estimate_unet
from slimtune.memory.unet_measure import measure_unet_step

from .conftest import UNET_CONFIG

SD15 = {"sample_size": 64, "cross_attention_dim": 768}  # diffusers' defaults are SD 1.x's otherwise
CONFIGS = {
    "tiny": UNET_CONFIG,
    "linear-proj, labels, deeper": dict(UNET_CONFIG, num_class_embeds=10, use_linear_projection=True,
                                        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4),
                                        layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
    "three blocks, no mid": dict(UNET_CONFIG, mid_block_type=None, block_out_channels=(8, 16, 16),
                                 down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3),
    "sd15": SD15,
    "sd2": dict(SD15, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, cross_attention_dim=1024),
}


def diffusers_unet(cfg: dict, device: str = "cpu"):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        return UNet2DConditionModel(**cfg)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_layers_and_parameters_equal_diffusers(name):
    unet = diffusers_unet(CONFIGS[name], "meta")  # shapes only: SD 1.5's 860M parameters take no memory
    per_module: dict[str, int] = {}
    for key, p in unet.named_parameters():
        module = key.rsplit(".", 1)[0]
        per_module[module] = per_module.get(module, 0) + p.numel()
    arch = unet_from_config(dict(unet.config))
    assert {layer.name: layer.params for layer in unet_layers(arch)} == per_module
    assert unet_params(arch) == sum(p.numel() for p in unet.parameters())


def test_sd15_figures():
    """SD 1.5's UNet has 859,520,964 parameters; diffusers' LoRA script (r=4 on to_q/k/v/out.0) trains
    797,184 of them (PEFT's print_trainable_parameters: 797,184 || all params: 860,318,148)."""
    arch = unet_from_config(SD15)
    assert unet_params(arch) == 859_520_964
    assert unet_lora_params(arch, 4, UNET_ATTENTION) == 797_184


@pytest.mark.parametrize("targets", [UNET_ATTENTION, UNET_ATTENTION + ("conv1", "proj_in", "ff.net.2"), ("all-linear",)])
def test_lora_count_equals_inject(targets):
    unet = diffusers_unet(CONFIGS["linear-proj, labels, deeper"])
    report = slimtune.inject(unet, slimtune.LoraConfig(r=3, target_modules="all-linear" if targets == ("all-linear",)
                                                       else targets))
    arch = unet_from_config(dict(unet.config))
    assert unet_lora_params(arch, 3, targets) == report.trainable_params


DORA_CONV = UNET_ATTENTION + ("conv1", "conv2")  # DoRA on resnet convs (DoraConv) as well as the attention


@pytest.mark.parametrize("targets", [DORA_CONV, ("conv1", "conv2", "conv_shortcut", "proj_in", "conv_out")])
def test_dora_conv_count_equals_inject(targets):
    """DoRA on conv targets trains LoRA's conv pair plus a magnitude per output channel of each conv."""
    unet = diffusers_unet(CONFIGS["linear-proj, labels, deeper"])
    report = slimtune.inject(unet, slimtune.LoraConfig(r=3, target_modules=targets, use_dora=True))
    arch = unet_from_config(dict(unet.config))
    assert estimate_unet(arch, Method("dora", rank=3, targets=targets)).trainable_params == report.trainable_params


CASES = [("tiny", "full", None, "fp32"), ("tiny", "lora", None, "bf16"),
         ("tiny", "lora", UNET_ATTENTION + ("conv1", "proj_in"), "fp32"),
         ("linear-proj, labels, deeper", "full", None, "bf16"), ("linear-proj, labels, deeper", "lora", None, "fp32"),
         ("three blocks, no mid", "lora", ("all-linear",), "bf16"), ("tiny", "dora", None, "fp32"),
         ("linear-proj, labels, deeper", "dora", UNET_ATTENTION + ("ff.net.2",), "bf16"),
         ("tiny", "dora", DORA_CONV, "fp32"), ("tiny", "dora", DORA_CONV, "bf16"),
         ("linear-proj, labels, deeper", "dora", DORA_CONV + ("conv_shortcut", "conv_in"), "bf16"),
         ("three blocks, no mid", "dora", ("conv2", "proj_in", "proj_out", "conv"), "fp32")]


@pytest.mark.parametrize("name, method, targets, dtype", CASES)
def test_estimate_equals_measured_step(name, method, targets, dtype):
    """On CPU the estimate's weights, gradients and activations are the measured bytes exactly; the optimizer
    differs by AdamW's 4-byte step counter per trainable tensor."""
    m = Method(method, rank=4, targets=targets)
    p = Precision(weight_dtype=dtype, optim_dtype=dtype if method == "full" else "fp32")  # torch keeps moments in the param dtype
    w = UNetWorkload(batch=2, resolution=16, text_tokens=7, device="cpu")
    unet = diffusers_unet(CONFIGS[name])
    est = estimate_unet(dict(unet.config), m, p, w).as_dict()
    meas = measure_unet_step(unet, m, p, w)
    got = meas.as_dict()
    for part in ("weights", "gradients", "activations"):
        assert est[part] == got[part], part
    tensors = sum(1 for q in unet.parameters() if q.requires_grad)
    assert got["optimizer"] - est["optimizer"] == 4 * tensors
    assert meas.trainable_params == estimate_unet(dict(unet.config), m, p, w).trainable_params


def test_unet_estimate_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from slimtune.memory.unet_estimate import estimate_unet\n"
            f"assert estimate_unet({SD15!r}, 'lora').total > 0\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("change, field", [
    ({"down_block_types": ["AttnDownBlock2D", "DownBlock2D"]}, "down_block_types"),
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"block_out_channels": [8]}, "block_out_channels"),
    ({"attention_head_dim": [4, 4, 4]}, "attention_head_dim"),
])
def test_unsupported_config_is_a_named_error(change, field):
    with pytest.raises(ValueError, match=field):
        unet_from_config(dict(UNET_CONFIG, **change))


def test_bad_method_and_targets_are_named_errors():
    with pytest.raises(ValueError, match="method='prompt'"):
        estimate_unet(SD15, "prompt")
    with pytest.raises(ValueError, match="method.targets=\\['q_proj'\\]"):
        estimate_unet(SD15, Method("lora", targets=("q_proj",)))
    with pytest.raises(ValueError, match="workload.resolution=0"):
        UNetWorkload(resolution=0)


app = typer.Typer()
register(app)


@app.callback()
def _root() -> None:
    """A group, so that subcommands are addressed by name."""


def test_cli_estimate_and_measure_a_unet_config(tmp_path):
    diffusers_unet(UNET_CONFIG).save_config(tmp_path)
    runner = CliRunner()
    out = runner.invoke(app, ["estimate", "--model", str(tmp_path), "--method", "lora", "--rank", "4", "--batch", "2",
                              "--resolution", "16", "--text-tokens", "7", "--weight-dtype", "fp32", "--measure"])
    assert out.exit_code == 0, out.output
    assert "2,624 trainable" in out.output and "latent 16x16" in out.output
    assert [line.split()[-1] for line in out.output.splitlines() if line.startswith("activations")][-1] == "+0.0%"
    data = json.loads(runner.invoke(app, ["estimate", "--model", str(tmp_path / "config.json"), "--compare",
                                          "full,lora", "--json"]).output)
    # bf16 base; default rank 8: 5,248 fp32 adapter parameters on top
    assert data["full"]["weights"] == 2 * 51_684 and data["lora"]["weights"] == 2 * 51_684 + 4 * 5_248
    bad = runner.invoke(app, ["estimate", "--model", str(tmp_path), "--method", "qlora"])
    assert bad.exit_code == 2 and bad.output.startswith("error: precision.weight_dtype='nf4'")
    unused = runner.invoke(app, ["estimate", "--model", str(tmp_path), "--seq", "128"])
    assert unused.exit_code == 2 and unused.output.startswith("error: --seq: not used for a diffusers UNet config")
