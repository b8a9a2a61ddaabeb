"""convmf_core: ConvMF (Kim et al., RecSys 2016) and baselines as a standalone library.

Depends on numpy, torch, pandas and pyarrow only; it never imports prefect or mlflow. Import what you need from
the submodules (``convmf_core.models.convmf``, ``convmf_core.text``, ...); nothing is done at import time.
"""

__version__ = "0.1.0"
