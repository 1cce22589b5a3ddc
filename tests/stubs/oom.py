"""Stub trainer: runs out of GPU memory the way torch reports it."""


class OutOfMemoryError(RuntimeError):
    """Stands in for torch.OutOfMemoryError."""


print("step 00000 (10.0%) | loss 5.000000 | dt 10ms | tok/sec 1,000 | mfu 0.1% | remaining 9s")
raise OutOfMemoryError(
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.11 GiB"
)
