"""EAFT for Megatron-Core."""
