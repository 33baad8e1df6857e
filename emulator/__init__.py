"""An engine replica that behaves like vLLM V1, without a GPU.

The model (``request``, ``kv_cache``, ``scheduler``, ``step_time``, ``engine``) is clock-agnostic and
does no I/O: the live HTTP replica (``emulator.server``) drives it in wall-clock time and the fleet
simulator drives it in virtual time.
"""
