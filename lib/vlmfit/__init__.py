"""vlmfit: fit small vision-language models with LoRA/QLoRA SFT and DPO, within memory.

The package behind the notebooks and Make targets. Modules:

- ``vlmfit.models``: the registry (one entry per supported model, all of its quirks), loading.
- ``vlmfit.budget``: visual-token arithmetic for each family, and resizing to a budget.
- ``vlmfit.data``: readers for peers' dataset formats, validation, the bundled dataset.
- ``vlmfit.models.builders``: tiny offline models and full-size random-weight architectures.
- ``vlmfit.train``: SFT and DPO through TRL, runs, evaluation.
- ``vlmfit.report``: papermill + nbconvert report runner, figures, the reports index.
"""

__version__ = "0.1.0"
