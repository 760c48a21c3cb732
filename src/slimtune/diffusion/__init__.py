"""LoRA for diffusion models: diffusers UNets and their CLIP text encoders.

    import slimtune
    from slimtune import diffusion
    slimtune.inject(pipe.unet, slimtune.LoraConfig(r=4, alpha=8, target_modules=diffusion.UNET_ATTENTION))
    ...train...
    diffusion.save_lora_weights("out", unet=pipe.unet)        # out/pytorch_lora_weights.safetensors
    pipe.load_lora_weights("out")                              # in diffusers, outputs equal to slimtune's

This package uses the core and is never imported by it. diffusers itself is needed only by what runs
diffusers' models (the ``diffusion`` extra); saving and loading files here do not import it.
"""

from slimtune.diffusion.parts import (TEXT_ENCODER_ATTENTION, TEXT_ENCODER_MLP, UNET_ATTENTION, UNET_CONV,
                                      UNET_FEEDFORWARD, load_lora_weights, save_lora_weights)

__all__ = ["TEXT_ENCODER_ATTENTION", "TEXT_ENCODER_MLP", "UNET_ATTENTION", "UNET_CONV", "UNET_FEEDFORWARD",
           "load_lora_weights", "save_lora_weights"]
