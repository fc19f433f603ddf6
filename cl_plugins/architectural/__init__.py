"""Architectural methods: per-task model parts (heads, columns, masks, gates, generated weights) chosen by the task label."""
