"""The reference implementation's flags and checkpoints, read one way.

`adm_lib.compat.guided_diffusion` reads the command-line flags and the released
checkpoints of `openai/guided-diffusion` into adm_lib's networks, diffusions,
configurations and trained-model type; nothing below it imports it.
"""
