"""Distillation: feature, attention, relational and subspace distillation from a frozen teacher."""
