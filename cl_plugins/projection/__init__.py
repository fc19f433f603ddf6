"""Projection methods: each step is projected so that old tasks' layer outputs do not change
(Adam-NSCL, RGO, GPM, OGD)."""
