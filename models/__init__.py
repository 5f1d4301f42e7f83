"""Stable Diffusion 1.5 models in flame.nn (issue 4)."""
from flame.models.loading import load_unet, load_vae  # noqa: E402,F401
from flame.models.unet import UNet2DConditionModel  # noqa: E402,F401
from flame.models.vae import AutoencoderKL, SCALING_FACTOR  # noqa: E402,F401
from flame.models.loading_clip import load_text_encoder  # noqa: E402,F401
from flame.models.tokenizer import load_tokenizer  # noqa: E402,F401
from flame.models.clip import CLIPTextModel  # noqa: E402,F401
