"""Regularization methods: quadratic parameter penalties and distillation losses."""
