"""The end-to-end CPU demo behind `megatron-eaft demo` (see :mod:`.pipeline`)."""
