"""megatron-latent: Megatron-Core pretraining for language models that think beyond the next token."""

__version__ = "0.1.0"

from .compat import quiet_expected_notices

quiet_expected_notices()
