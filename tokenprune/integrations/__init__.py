"""Bridges to other tools' plug-in systems (the top room: it may import everything below, the lab included).

`tokenprune.integrations.lmms_eval`: the `tokenprune` model of lmms-eval and its `tokenprune_toy_vqa` task.
Each bridge imports its tool only when that tool loads it; `import tokenprune` never loads this room.
"""
