"""booster_fast: Booster (arXiv 2409.01586) alignment with a merged pass, flat buffers and fused kernels."""
import logging as _logging
import warnings as _warnings

# Quiet two messages that every run would print and that say nothing about the run: bitsandbytes' CPU backend
# looks for an optional kernel package at import, and peft reads a transformers attribute that is deprecated.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
_warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

from .booster import Booster  # noqa: E402
from .config import BoosterConfig  # noqa: E402
from .lora import add_lora  # noqa: E402
from .models import ModelError, load_model  # noqa: E402

__all__ = ["Booster", "BoosterAlignmentTrainer", "BoosterConfig", "BoosterTrainer", "BoosterTrainingArguments",
           "FixedLengthCollator", "ModelError", "add_lora", "load_model"]
__version__ = "0.1.0"

_LAZY = {"BoosterTrainer": "hf_trainer", "BoosterAlignmentTrainer": "hf_trainer",
         "BoosterTrainingArguments": "hf_trainer", "FixedLengthCollator": "hf_batches"}


def __getattr__(name):
    """The HF Trainer integration is imported on first use, so `import booster_fast` stays light."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
