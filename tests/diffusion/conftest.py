"""Tiny diffusers UNet / CLIP text encoder / Stable Diffusion pipeline with random weights (no download)."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("diffusers")

UNET_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
                   attention_head_dim=4, norm_num_groups=4)


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIG).eval()


def tiny_text_encoder(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=50, hidden_size=12, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, projection_dim=12,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(cfg).eval()


def tiny_pipeline(unet=None, text_encoder=None):
    """A StableDiffusionPipeline around the tiny parts (no tokenizer: the tests feed token ids)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the default scheduler config's deprecation notes
        return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder or tiny_text_encoder(),
                                       tokenizer=None, unet=unet or tiny_unet(),
                                       scheduler=DDPMScheduler(steps_offset=1, clip_sample=False),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def unet_inputs(seed: int = 3):
    """(sample (2, 4, 8, 8), timesteps (2,), encoder_hidden_states (2, 5, 12))."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 500]), torch.randn(2, 5, 12, generator=g)


def unet_out(unet) -> torch.Tensor:
    with torch.no_grad():
        return unet(*unet_inputs()).sample


def te_out(te) -> torch.Tensor:
    ids = torch.tensor([[0, 5, 9, 17, 1, 1], [0, 30, 2, 1, 1, 1]])
    with torch.no_grad():
        return te(ids).last_hidden_state


def randomize(model, seed: int = 1, std: float = 0.3) -> None:
    """Random values for every trainable tensor (so B != 0 and the adapter changes outputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def state(model) -> dict:
    """A deep snapshot: every state-dict tensor and requires_grad flag, for 'model untouched' checks."""
    return {"sd": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "grad": {k: p.requires_grad for k, p in model.named_parameters()},
            "configs": dict(getattr(model, "slimtune_configs", {}))}


def assert_same_state(model, before: dict) -> None:
    now = state(model)
    assert now["sd"].keys() == before["sd"].keys()
    for k, v in before["sd"].items():
        assert torch.equal(now["sd"][k], v), k
    assert now["grad"] == before["grad"]
    assert now["configs"] == before["configs"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
