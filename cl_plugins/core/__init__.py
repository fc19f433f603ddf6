"""Mechanics shared by several methods and by the experiment runner. Nothing method-specific."""
