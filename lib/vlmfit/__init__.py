"""vlmfit: fit small vision-language models with LoRA/QLoRA SFT and DPO, within memory.

The package behind the notebooks and Make targets, one subpackage per stage (``data``,
``budget``, ``preprocess``, ``models``, ``memory``, ``train``, ``report``; ``cli``):
docs/architecture.md.
"""

__version__ = "0.1.0"
