"""Adapters between adm_lib and other implementations' flags and checkpoints.

`adm_lib.compat.guided_diffusion` reads the command-line flags and the released
checkpoints of the reference implementation, `openai/guided-diffusion`.
"""
