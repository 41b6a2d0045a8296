"""The planner: architecture facts, memory arithmetic and layouts. Pure Python; never imports torch.

    arch.py       config.json -> ArchSpec (parameter counts, KV bytes per token)
    memory.py     bytes per precision, per GPU of a layout, overhead
    layout.py     TP/PP/EP/DP layouts and what each costs a GPU
    planner.py    `moeserve plan` (plan, warnings, suggestion); commands.py, render.py print it
    fit.py        the engine's start-up check
"""
