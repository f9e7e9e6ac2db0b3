"""Triton kernels of OneRef, one module per op family (installed as ``oneref.kernels``).

Importing a kernel module imports triton (:mod:`oneref.kernels.geometry`, the LayerNorms'
launch geometry, does not); :mod:`oneref.ops.triton_backend` loads them lazily so
``import oneref`` never needs triton. On a machine without a GPU set ``TRITON_INTERPRET=1``
before triton is first imported to run the kernels in the interpreter.
"""
