"""The engine: descriptors, segment layout, running top-k state, backends and search.
No nn.Module and no files here; everything above (features, al, cli) builds on it."""
