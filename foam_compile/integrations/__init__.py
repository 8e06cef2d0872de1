"""FOAM in the training tools people configure rather than write: HF Trainer, torchtune,
Lightning, torchtitan-style FSDP2.

``PolicyFOAM`` is FOAM for optimizers built from bare tensors (what every trainer passes): it
keeps embeddings, the output head and norms at level 0. The Hugging Face helpers live in
``foam_compile.integrations.hf`` (imports transformers); nothing here imports a trainer.
Importing this package installs a step pre-hook that turns "a stock AdamW stepping on a FOAM
checkpoint's state" into an error that names the fix (``guard.py``).
"""

from .guard import install_folded_state_guard
from .policy_foam import PolicyFOAM

__all__ = ["PolicyFOAM", "install_folded_state_guard"]

install_folded_state_guard()
