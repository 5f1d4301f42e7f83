"""kohya's rule for which layers of an SD 1.x UNet get a LoRA, applied to diffusers' own
module tree: the independent reference for the names and shapes flame writes."""
import torch


def kohya_reference(tu, rank, conv_rank):
    """kohya's networks/lora.py rule applied to diffusers' own module tree: every Linear/Conv2d
    inside a Transformer2DModel (and, with conv, ResnetBlock2D/Downsample2D/Upsample2D; 3x3
    convs get conv_rank) -> {name: (down shape, up shape)}."""
    classes = {"Transformer2DModel"} | ({"ResnetBlock2D", "Downsample2D", "Upsample2D"} if conv_rank else set())
    out = {}
    for name, mod in tu.named_modules():
        if type(mod).__name__ not in classes:
            continue
        for cn, ch in mod.named_modules():
            key = "lora_unet_" + f"{name}.{cn}".replace(".", "_")
            if isinstance(ch, torch.nn.Linear):
                out[key] = ((rank, ch.in_features), (ch.out_features, rank))
            elif isinstance(ch, torch.nn.Conv2d):
                r = rank if ch.kernel_size == (1, 1) else conv_rank
                if r:
                    out[key] = ((r, ch.in_channels, *ch.kernel_size), (ch.out_channels, r, 1, 1))
    return out
