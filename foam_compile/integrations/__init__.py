"""FOAM in the training tools people configure rather than write: HF Trainer, torchtune,
Lightning, torchtitan-style FSDP2.

``foam_compile.FOAM`` applies the folding policy to bare tensors itself (names from the live
module that owns them), which is what every trainer passes; ``PolicyFOAM`` is kept as another
name for it. The Hugging Face helpers live in ``foam_compile.integrations.hf`` (imports
transformers); nothing here imports a trainer. The guard that turns "a stock AdamW stepping on a
FOAM checkpoint's state" into an error that names the fix is installed by ``import foam_compile``
(``foam_compile/guard.py``).
"""

from ..guard import install_folded_state_guard
from .policy_foam import PolicyFOAM

__all__ = ["PolicyFOAM", "install_folded_state_guard"]
