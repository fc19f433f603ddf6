"""Methods that replay inputs drawn from a generative model: generative replay, negative replay."""
