"""Training objectives, one module each: `make_loss(graphdef, config, null_caption)` returns a pure
`loss(params, batch, rngs) -> (loss, metrics)`, rngs = {'t', 'noise', 'drop'} keys of one step.
training/update.py picks the one a config trains."""
