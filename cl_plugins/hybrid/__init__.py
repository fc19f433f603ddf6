"""Hybrid methods: one method combining mechanisms of several families (architecture, regularisation, distillation)."""
