"""Triton kernels of pydistill_ext, selected with ``_backend="triton"`` or
``PYDISTILL_CUDA_BACKEND=triton``. Triton is optional: nothing here is imported by the package
itself; ``pydistill_ext.ops`` imports ``pydistill_ext.triton.<op>`` lazily when the Triton
backend is chosen. The kernels run on CUDA tensors, and on CPU tensors only when
``TRITON_INTERPRET=1`` is set before triton is first imported (tests on tiny shapes).
"""
