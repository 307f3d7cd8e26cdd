"""What makes the network fast on each device, kept out of `model/` so the network reads as on paper.

`ops.py`: the fused lm_head + cross-entropy, the cheaper CPU dropout mask and blocked causal attention.
`decode.py`: per-dtype weight copies for one-token decode steps and the CPU one-row kernel switch.
`device.py`: device resolution, autocast, CPU threads and the allocator tuning every command shares. This
layer sits below `model/` and never imports it (docs/architecture.md).

    from nanogpt.kernels.device import autocast, resolve_device
"""
