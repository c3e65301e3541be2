"""booster_fast: Booster (arXiv 2409.01586) alignment with a merged pass, flat buffers and fused kernels."""
from .booster import Booster
from .config import BoosterConfig
from .models import ModelError, add_lora, load_model

__all__ = ["Booster", "BoosterConfig", "ModelError", "add_lora", "load_model"]
__version__ = "0.1.0"
