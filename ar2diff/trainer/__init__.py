"""The trainer: DeepSpeed engine set-up (ZeRO, AutoEP, sequence parallel), LR schedules, distributed start-up.

The only package (with ``ar2diff.checkpoint`` and ``ar2diff.export``) that imports DeepSpeed: the model,
objective and decoder run on a bare ``nn.Module``.
"""
