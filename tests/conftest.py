"""The suite checks CPU semantics on every machine: several tests compare outputs (labels,
stores, resumed runs) with an fp32 CPU reference, which a GPU's mixed precision would not
match. GPU runs are checked with the ``gpu_smoke`` experiment instead. Set
CUDA_VISIBLE_DEVICES yourself to run the suite with a GPU visible."""

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
