"""The trainer: `PhaseTrainer` (phase.py) with its callbacks (callbacks.py: the hooks; standard_callbacks.py: the
built-ins), DeepSpeed engine set-up (ZeRO, AutoEP, sequence parallel), LR schedules, distributed start-up.

The only package (with ``ar2diff.checkpoint``) that imports DeepSpeed: the model, objective and decoder run on a
bare ``nn.Module``.
"""
