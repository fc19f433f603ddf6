"""Replay methods: a memory of past samples (``cl_plugins.core.buffer.ReplayBuffer``) fed back
into training, either appended to each incoming minibatch (ER, DER) or through the dataloader
(one owner per strategy: ``cl_plugins.core.replay_loader``)."""
