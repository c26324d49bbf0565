"""One module per backend, named after it; importing a module registers its backend.

    cpu     fused C++ kernel, pyfk._C (csrc/cpu)
    torch   the pure-torch reference and oracle (CPU, CUDA)
    triton  fused Triton kernel (CUDA)
    cuda    torch GEMMs + CUDA k-selection, pyfk._C_cuda (csrc/cuda)
    faiss       exact search over explicit Kronecker features (faiss-cpu / faiss-gpu), shared faiss plumbing
    faiss_ann   approximate: TensorSketch + IVF/HNSW candidates, exact re-ranking (never chosen by "auto")
"""

# Registration order is the order pyfk.backends() lists them in.
# isort: off
from pyfk.engine.kernels import cpu  # noqa: F401
from pyfk.engine.kernels import torch  # noqa: F401
from pyfk.engine.kernels import triton  # noqa: F401
from pyfk.engine.kernels import cuda  # noqa: F401
from pyfk.engine.kernels import faiss  # noqa: F401
from pyfk.engine.kernels import faiss_ann  # noqa: F401
# isort: on
