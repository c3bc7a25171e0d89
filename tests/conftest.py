"""The suite checks CPU semantics on every machine: several tests compare outputs (labels,
stores, resumed runs) with an fp32 CPU reference, which a GPU's mixed precision would not
match. GPU runs are checked with the ``gpu_smoke`` experiment instead. Set
CUDA_VISIBLE_DEVICES yourself to run the suite with a GPU visible. ``precision: auto`` picks
bf16 on a CPU with native bf16; the suite pins fp32 (MUST_CPU_BF16=0) so that it checks the
same numbers on every CPU (the tests that want bf16 ask for it)."""

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("MUST_CPU_BF16", "0")
